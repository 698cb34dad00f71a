#!/usr/bin/env bash
# GPU check for the engine: on a machine with one NVIDIA GPU, run the collective conformance suite on NCCL (world
# size 1), then NCCL world-size-1 training steps of RadiT-B latent in bf16, printing tokens/s, MFU and peak device
# memory as one JSON line (`radit engine bench`). Record the result in BENCHMARKS.md with the machine and date.
# Usage: scripts/gpu-check.sh [BATCH] [PEAK_TFLOPS]   (defaults 16 and 989, the dense bf16 peak of H100/GH200)
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
batch=${1:-16}
peak=${2:-989}
"$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to PyTorch"'
# cudarc opens libnccl.so; the torch wheel ships libnccl.so.2 under nvidia/nccl/lib.
nccl_dir=$("$py" -c 'import nvidia.nccl as m; print(list(m.__path__)[0] + "/lib")')
link_dir="$RADIT_CACHE/nccl-link"
mkdir -p "$link_dir"
ln -sf "$nccl_dir/libnccl.so.2" "$link_dir/libnccl.so"
export LD_LIBRARY_PATH="$link_dir:$nccl_dir:${LD_LIBRARY_PATH:-}"
"$radit" info
"$radit" selftest collectives --device cuda
"$radit" engine bench b-latent --device cuda --precision bf16 --batch "$batch" --steps 10 --warmup 3 \
  --peak-tflops "$peak"
"$radit" engine bench b-latent --device cuda --precision bf16 --batch "$batch" --steps 10 --warmup 3 \
  --peak-tflops "$peak" --mode zero2

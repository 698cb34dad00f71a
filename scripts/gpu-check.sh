#!/usr/bin/env bash
# The GPU check, run ON a machine with one NVIDIA GPU, in one call of under 10 minutes: radit info (libtorch, CUDA
# build, GPUs, which NCCL), the collective conformance suite on NCCL (world of one), RadiT-B latent bf16 steps in
# ZeRO-3 and ZeRO-2 (tokens/s, MFU against --peak, the caching allocator's peak, a checkpoint's stall and write
# bandwidth), and `radit selftest parity`: the same steps on the GPU and on the CPU in fp32 compared, and a
# checkpoint save/restore round trip on the GPU. Each part's output goes to $OUT/<part>.log; exit 1 if any failed.
#
# Two ways to run it:
#  - the lent, offline GPU machine (no Rust; its Python has torch 2.11): build the bundle here with
#    scripts/gpu-bundle.sh, carry gpu-bundle/, and run `bash gpu-bundle/gpu-check.sh` there; radit then loads
#    that machine's torch libraries, which must be the version the bundle was built against;
#  - a cluster node with this repository built: RADIT_BIN=target/release/radit scripts/gpu-check.sh
# Usage: gpu-check.sh [BATCH] [PEAK_TFLOPS]   (defaults 16 per GPU and 989, the dense bf16 peak of H100/H200/GH200)
# DEVICE=cpu PRESET=tiny runs the same parts on the CPU with a small model: how the bundle and this script are
# tested on a machine without a GPU.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
batch=${1:-16}
peak=${2:-989}
out=${OUT:-$here/gpu-check-out}
scratch=${TMPDIR:-/tmp}/radit-gpu-check
mkdir -p "$out" "$scratch"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
preset=${PRESET:-b-latent}
if [ -n "${RADIT_BIN:-}" ]; then
  radit=$RADIT_BIN
else
  radit="$here/radit"
  # The bundle links against libtorch by name: this machine's torch provides it (or TORCH_LIB names its lib/
  # directory), and must be the version the bundle was built against.
  built=$(cut -d' ' -f2 "$here/BUILT_AGAINST")
  if [ -n "${TORCH_LIB:-}" ]; then
    torch_lib=$TORCH_LIB
    have=$(sed -n "s/^__version__ = '\([0-9.]*\).*/\1/p" "$torch_lib/../version.py")
  else
    torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
    have=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
  fi
  if [ "$built" != "$have" ]; then
    echo "gpu-check: the bundle was built against torch $built but $torch_lib is torch $have" >&2
    exit 2
  fi
  export LD_LIBRARY_PATH="$here/lib:$torch_lib:${LD_LIBRARY_PATH:-}"
fi
if [ "$device" = cuda ]; then
  "$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to PyTorch"; print("python torch", torch.__version__, "on", torch.cuda.get_device_name(0))' \
    | tee "$out/python.log" || exit 2
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia-smi.log"
fi

failed=()
part() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local started=$SECONDS
  if timeout "$limit" "$@" >"$out/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - started)) s"
  else
    echo "   FAILED ($?) in $((SECONDS - started)) s"
    failed+=("$name")
  fi
  # The JSON reports (and the last lines of anything else) on the terminal too.
  grep -E '^\{' "$out/$name.log" || tail -n 5 "$out/$name.log"
}
export RUST_LOG=${RUST_LOG:-info}
part info 60 "$radit" info
part collective-conformance 90 "$radit" selftest collectives --device "$device"
for mode in zero3 zero2; do
  part "bench-$preset-bf16-$mode" 120 "$radit" engine bench "$preset" --device "$device" --precision bf16 \
    --batch "$batch" --steps 10 --warmup 3 --peak-tflops "$peak" --mode "$mode" --checkpoint "$scratch/bench-$mode"
done
part "parity-$preset-fp32" 180 "$radit" selftest parity "$preset" --device "$device" --steps 3 --batch 2 \
  --checkpoint "$scratch/parity"
rm -rf "$scratch"
if ((${#failed[@]})); then
  echo "gpu-check: FAILED: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "gpu-check: all parts passed (logs in $out)"

#!/usr/bin/env bash
# The GPU check, run ON a machine with one NVIDIA GPU, in one call of under 10 minutes: radit info (libtorch, CUDA
# build, GPUs, which NCCL), the collective conformance suite on NCCL (world of one), RadiT-B latent bf16 steps in
# ZeRO-3 and ZeRO-2 (tokens/s, MFU against --peak, the caching allocator's peak, a checkpoint's stall and write
# bandwidth), and `radit selftest parity`: the same steps on the GPU and on the CPU in fp32 compared, and a
# checkpoint save/restore round trip on the GPU, and `radit encode` with FLUX.2's encoder in fp32 and bf16 (images/s,
# and the two precisions' latent statistics compared). Each part's output goes to $OUT/<part>.log; exit 1 if any failed.
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
# The encode job's rank on the device: FLUX.2's encoder (random weights of its shape) over a small 512x512 store
# in fp32 and in bf16 (the GPU default), batched; the two stores' channel statistics must agree.
if [ "$device" = cuda ]; then ae=flux2 side=512; else ae=tiny side=16; fi
part encode-store 180 bash -c "set -e; '$radit' synth --out '$scratch/synth' --images 64 --sizes 512x512 >/dev/null
  '$radit' shard --no-progress --table '$scratch/synth/table.csv' --images '$scratch/synth/images' \
    --out '$scratch/store-fp32' --image-size $side --shard-images 16
  cp -r '$scratch/store-fp32' '$scratch/store-bf16'
  '$radit' vae init $ae --out '$scratch/ae.safetensors'"
for p in fp32 bf16; do
  part "encode-$ae-$p" 180 "$radit" encode --store "$scratch/store-$p" --weights "$scratch/ae.safetensors" \
    --autoencoder "$ae" --image-size "$side" --precision "$p" --batch "$batch" --device "$device"
done
part encode-bf16-vs-fp32 30 "$py" -c '
import json, sys
a, b = (json.load(open(f))["latents"] for f in sys.argv[1:])
worst = max(abs(x - y) / max(abs(s), 1e-6) for x, y, s in zip(a["channel_mean"], b["channel_mean"], a["channel_std"]))
ratio = max(abs(x / y - 1) for x, y in zip(a["channel_std"], b["channel_std"]))
print(json.dumps({"mean_shift_in_stds": worst, "std_ratio_off": ratio}))
sys.exit(0 if worst < 0.05 and ratio < 0.05 else 1)
' "$scratch/store-fp32/manifest.json" "$scratch/store-bf16/manifest.json"
rm -rf "$scratch"
if ((${#failed[@]})); then
  echo "gpu-check: FAILED: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "gpu-check: all parts passed (logs in $out)"

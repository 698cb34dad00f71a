#!/usr/bin/env bash
# The GPU check, made for the machine it runs on: one call of one command, at most 4 files back, a few minutes of
# device time in all and no second try. So it has one hard deadline (DEADLINE seconds, at most 480), runs the
# parts that matter most first, gives each part what is left of the deadline (never more than its own limit),
# skips what no longer fits, and always ends by writing its two files:
#   $OUT/summary.json  every part's status (ok, failed, timeout, skipped), seconds, limit, exit code and numbers
#                      (the JSON report the part printed), plus the machine;
#   $OUT/check.log     every part's command and whole output, in order.
#
# The parts, most valuable first:
#   1 info          python's torch and the GPU (nvidia-smi), then `radit info` (libtorch, CUDA, which NCCL);
#   2 step-bf16     one bf16 engine step of RadiT-B latent on one GPU: a world of one, no NCCL involved;
#   3 nccl          the collective conformance suite on NCCL at world 1, with NCCL_DEBUG=WARN;
#   4 bench-xl      RadiT-XL latent, bf16, batch 16 per GPU (512 over 32 GPUs): tokens/s per GPU, MFU, peak
#                   allocated and reserved memory, and the ratio to the paper's 31,250 tokens/s per GPU;
#   5 bench-b       RadiT-B latent, bf16, with a checkpoint's stall and write bandwidth;
#   5b bench-unet   RadUNet pixel (512x512, 6 levels), bf16, data-parallel, batch 12 (72 over 6 GPUs, Table 12):
#                   the design note's largest risk, the pixel U-Net's throughput and memory;
#   6 parity        `radit selftest parity`: fp32 steps on the GPU and on the CPU, every tensor within bound,
#                   and a checkpoint round trip on the GPU;
#   7 encode        FLUX.2's encoder over a small 512x512 store in fp32 and bf16, the two stores' statistics
#                   compared.
#
# Usage: gpu-check.sh [--dry-run] [BATCH] [PEAK_TFLOPS]   (defaults 16 per GPU and 989, dense bf16 of H100/GH200)
#  --dry-run      needs no GPU, torch or radit: prints the plan, checks that the parts' limits fit the deadline
#                 and writes the two files with every part `planned` (exit 1 if the budget does not hold).
#  DEVICE=cpu     runs the same parts on the CPU with tiny models (PRESET, XL_PRESET; default tiny): how this
#                 script and the bundle are tested without a GPU.
# Where radit comes from:
#  - the lent, offline GPU machine (no Rust; its Python has torch 2.11): build the bundle here with
#    scripts/gpu-bundle.sh, carry gpu-bundle/, and run `bash gpu-bundle/gpu-check.sh` there; radit then loads
#    that machine's torch libraries, which must be the version the bundle was built against;
#  - a cluster node with this repository built: RADIT_BIN=target/release/radit scripts/gpu-check.sh
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dry_run=0
if [ "${1:-}" = --dry-run ]; then
  dry_run=1
  shift
fi
batch=${1:-16}
peak=${2:-989}
deadline=${DEADLINE:-480}
# Kept back from the deadline for writing the summary.
reserve=10
out=${OUT:-$here/gpu-check-out}
scratch=${TMPDIR:-/tmp}/radit-gpu-check
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
if [ "$device" = cuda ]; then
  preset=${PRESET:-b-latent}
  xl_preset=${XL_PRESET:-xl-latent}
  unet_preset=${UNET_PRESET:-unet-pixel} unet_batch=12
  ae=flux2 side=512
else
  preset=${PRESET:-tiny}
  xl_preset=${XL_PRESET:-tiny}
  unet_preset=${UNET_PRESET:-unet-tiny} unet_batch=2
  ae=tiny side=16
fi
if [ "$deadline" -gt 480 ]; then
  echo "gpu-check: DEADLINE=$deadline is over the 480 s this check is made for" >&2
  exit 2
fi
rm -rf "$scratch"
mkdir -p "$out" "$scratch/logs"
log="$out/check.log"
: >"$log"
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export RUST_LOG=${RUST_LOG:-info}

# Every part: NAME LIMIT_SECONDS COMMAND... (run in order; see the header).
names=() limits=() commands=()
plan() {
  names+=("$1")
  limits+=("$2")
  commands+=("$3")
}
plan info 20 "\"\$py\" -c 'import torch; print(\"python torch\", torch.__version__, \"cuda\", torch.cuda.is_available())'
  if [ \"\$device\" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; fi
  \"\$radit\" info"
plan step-bf16 45 "\"\$radit\" engine bench $preset --device \$device --precision bf16 --batch 2 --steps 1 --warmup 0 \
  --peak-tflops $peak"
plan nccl 45 "\"\$radit\" selftest collectives --device \$device $([ "$device" = cuda ] && echo --nccl)"
plan bench-xl 110 "\"\$radit\" engine bench $xl_preset --device \$device --precision bf16 --batch $batch --steps 10 \
  --warmup 3 --peak-tflops $peak"
plan bench-b 60 "\"\$radit\" engine bench $preset --device \$device --precision bf16 --batch $batch --steps 10 \
  --warmup 3 --peak-tflops $peak --checkpoint \"\$scratch/bench\""
plan bench-unet 35 "\"\$radit\" engine bench $unet_preset --mode ddp --device \$device --precision bf16 \
  --batch $unet_batch --steps 5 --warmup 2 --peak-tflops $peak"
plan parity 80 "\"\$radit\" selftest parity $preset --device \$device --steps 3 --batch 2 --checkpoint \"\$scratch/parity\""
plan encode 70 "set -e
  \"\$radit\" synth --out \"\$scratch/synth\" --images 64 --sizes 512x512 >/dev/null
  \"\$radit\" shard --no-progress --table \"\$scratch/synth/table.csv\" --images \"\$scratch/synth/images\" \
    --out \"\$scratch/store-fp32\" --image-size $side --shard-images 16
  cp -r \"\$scratch/store-fp32\" \"\$scratch/store-bf16\"
  \"\$radit\" vae init $ae --out \"\$scratch/ae.safetensors\"
  for p in fp32 bf16; do
    \"\$radit\" encode --store \"\$scratch/store-\$p\" --weights \"\$scratch/ae.safetensors\" --autoencoder $ae \
      --image-size $side --precision \$p --batch $batch --device \$device
  done
  \"\$py\" -c '
import json, sys
a, b = (json.load(open(f))[\"latents\"] for f in sys.argv[1:])
shift = max(abs(x - y) / max(abs(s), 1e-6) for x, y, s in zip(a[\"channel_mean\"], b[\"channel_mean\"], a[\"channel_std\"]))
ratio = max(abs(x / y - 1) for x, y in zip(a[\"channel_std\"], b[\"channel_std\"]))
print(json.dumps({\"mean_shift_in_stds\": shift, \"std_ratio_off\": ratio}))
sys.exit(0 if shift < 0.05 and ratio < 0.05 else 1)
' \"\$scratch/store-fp32/manifest.json\" \"\$scratch/store-bf16/manifest.json\""

total=0
for l in "${limits[@]}"; do total=$((total + l)); done

# One line a part for the summary: name status seconds limit code (tab-separated); the numbers come from its log.
results="$scratch/results.tsv"
: >"$results"
summarise() {
  "$py" - "$results" "$scratch/logs" "$deadline" "$total" "$dry_run" "$device" "$SECONDS" >"$out/summary.json" <<'EOF'
import json, os, sys
results, logs, deadline, total, dry_run, device, elapsed = sys.argv[1:]
parts = []
for line in open(results):
    name, status, seconds, limit, code = line.rstrip("\n").split("\t")
    part = {"name": name, "status": status, "seconds": int(seconds), "limit": int(limit),
            "exit_code": None if code == "" else int(code), "numbers": []}
    path = os.path.join(logs, name + ".log")
    if os.path.exists(path):
        for text in open(path, errors="replace"):
            text = text.strip()
            if text.startswith("{") and text.endswith("}"):
                try:
                    part["numbers"].append(json.loads(text))
                except ValueError:
                    pass
    parts.append(part)
failed = [p["name"] for p in parts if p["status"] not in ("ok", "planned")]
print(json.dumps({"device": device, "dry_run": dry_run == "1", "deadline_seconds": int(deadline),
                  "planned_seconds": int(total), "elapsed_seconds": int(elapsed),
                  "passed": not failed, "not_ok": failed, "parts": parts}, indent=1))
EOF
}

if [ "$dry_run" = 1 ]; then
  for i in "${!names[@]}"; do
    printf '== %s (limit %s s)\n%s\n' "${names[$i]}" "${limits[$i]}" "${commands[$i]}" >>"$log"
    printf '%s\tplanned\t0\t%s\t\n' "${names[$i]}" "${limits[$i]}" >>"$results"
  done
  summarise
  echo "gpu-check: dry run: ${#names[@]} parts, limits ${total} s against a deadline of ${deadline} s less ${reserve} s for the summary; files in $out: $(ls "$out" | tr '\n' ' ')"
  if [ $((total + reserve)) -gt "$deadline" ]; then
    echo "gpu-check: the parts' limits (${total} s) do not fit the deadline" >&2
    exit 1
  fi
  exit 0
fi

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
    echo "gpu-check: the bundle was built against torch $built but $torch_lib is torch $have" | tee -a "$log" >&2
    exit 2
  fi
  export LD_LIBRARY_PATH="$here/lib:$torch_lib:${LD_LIBRARY_PATH:-}"
fi
export py radit device scratch

for i in "${!names[@]}"; do
  name=${names[$i]} limit=${limits[$i]}
  left=$((deadline - reserve - SECONDS))
  budget=$((limit < left ? limit : left))
  printf '\n== %s (limit %s s, given %s s)\n%s\n' "$name" "$limit" "$budget" "${commands[$i]}" >>"$log"
  if [ "$budget" -lt 5 ]; then
    echo "   skipped: the deadline is near" >>"$log"
    printf '%s\tskipped\t0\t%s\t\n' "$name" "$limit" >>"$results"
    echo "== $name: skipped (deadline)"
    continue
  fi
  started=$SECONDS
  timeout -k 5 "$budget" bash -c "${commands[$i]}" >"$scratch/logs/$name.log" 2>&1
  code=$?
  took=$((SECONDS - started))
  case $code in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  cat "$scratch/logs/$name.log" >>"$log"
  echo "   $status (exit $code) in $took s" >>"$log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$limit" "$code" >>"$results"
  echo "== $name: $status in $took s"
  grep -E '^\{' "$scratch/logs/$name.log" || tail -n 3 "$scratch/logs/$name.log"
done
summarise
rm -rf "$scratch"
if grep -q '"passed": true' "$out/summary.json"; then
  echo "gpu-check: all parts passed in $SECONDS s ($out/summary.json, $out/check.log)"
  exit 0
fi
echo "gpu-check: not all parts passed in $SECONDS s: see $out/summary.json and $out/check.log"
exit 1

#!/usr/bin/env bash
# RadVAE (LoRA) benchmark (issue 34): one step of the decoder fine-tune and one reconstruction, full-size FLUX.2
# autoencoder (random weights), in radit (`radit vae bench --mode finetune|recon`) and in its PyTorch twin
# (tests/python/flux2_ae_twin.py bench --mode ..., the twin of the LoRA parity test), same threads, same run. The
# step is the frozen encoder's mean, the decoder with LoRA (Up-Blocks, 8, 8) and the RGB head in full, L1, backward
# and Adam; the Rad-DINO perceptual distance is not in it. Then the GH200 hours that 50K steps at batch 16 and
# reconstructing the 106,513 test images would take at a given share of bf16 peak.
# Usage: scripts/bench-vae-finetune.sh [THREADS] [STEPS] [IMAGE_SIZE]   (defaults: all cores, 2 timed after 1
# warm-up, 512).
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
threads=${1:-$(nproc)}
steps=${2:-2}
side=${3:-512}
field() { "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, d))' "$1" "$2"; }

machine_line
echo
echo "| what | implementation | threads | seconds per ${side}x${side} image | images/s | GFLOP/s |"
echo "|---|---|---|---|---|---|"
declare -A gflop
for mode in recon finetune; do
  rust=$("$radit" vae bench flux2 --mode "$mode" --threads "$threads" --steps "$steps" --image-size "$side")
  twin=$("$py" "$root/tests/python/flux2_ae_twin.py" bench --mode "$mode" --threads "$threads" --steps "$steps" \
    --image-size "$side")
  gflop[$mode]=$(field "$rust" gflop_per_image)
  for json in "$rust" "$twin"; do
    awk -v what="$mode" -v name="$(field "$json" impl)" -v th="$threads" -v s="$(field "$json" median_s)" \
      -v g="${gflop[$mode]}" 'BEGIN{printf "| %s | %s | %d | %.2f | %.3f | %.0f |\n", what, name, th, s, 1/s, g/s}'
  done
done
echo
echo "FLOPs per ${side}x${side} image: reconstruction $(printf %.0f "${gflop[recon]}") GFLOP, fine-tuning step" \
  "$(printf %.0f "${gflop[finetune]}") GFLOP (encoder + 2 x decoder; the perceptual network's not included)"
for u in 0.2 0.4; do
  awk -v f="${gflop[finetune]}" -v r="${gflop[recon]}" -v u="$u" 'BEGIN{
    printf "at %.0f%% of a GH200'"'"'s 989 bf16 TFLOP/s: 50K steps of 16 images %.2f GPU-hours; 106,513 test images reconstructed %.3f GPU-hours\n",
      100*u, 50000*16*f*1e9/(989e12*u)/3600, 106513*r*1e9/(989e12*u)/3600}'
done

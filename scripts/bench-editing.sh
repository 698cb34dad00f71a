#!/usr/bin/env bash
# Editing benchmark (issue 35): a predictor's training step and counterfactual edits, radit beside its PyTorch
# twin on this machine, same threads, same run.
# - Predictor step: attention pooling over a ViT-B/14 at 518 (Rad-DINO's shape, random weights: the twin's
#   make-base) on 512x512 images, the backbone frozen; radit's `predictors train` (median step of its log) against
#   tests/python/dinov2_twin.py bench-predictor (the same step in PyTorch).
# - Edits: `radit edit` of a synthetic store with the twin's RadiT (--perturb, so the metadata moves the velocity),
#   then tests/python/radit_twin.py bench-edit redoing the same edits from the originals and edits.csv (torchdiffeq
#   dopri5 1e-5, the same batches): images/s of the solves, model evaluations per image, and the largest
#   difference of the two edits in 16-bit levels.
# Then the GH200 hours of the paper's 5,000 patients x 6 interventions with RadiT XL.
# Usage: scripts/bench-editing.sh [THREADS] [PRESET] [PATIENTS]   (defaults: all cores, tiny, 64; a B preset's
# edits take hours on a CPU)
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
threads=${1:-$(nproc)}
preset=${2:-tiny}
patients=${3:-64}
field() { "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, d))' "$1" "$2"; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

machine_line
echo
# The predictor's step.
"$py" tests/python/dinov2_twin.py make-base "$work/vit-b" >/dev/null
"$radit" synth --out "$work/synth512" --images 24 --sizes 512x512 >/dev/null
"$radit" shard --no-progress --table "$work/synth512/table.csv" --images "$work/synth512/images" \
  --out "$work/store512" --image-size 512 --shard-images 8 >/dev/null
batch=2
cat > "$work/predictor.toml" <<TOML
[data]
url = "$work/store512"
window_shards = 2

[model.predictor]
variant = "attention-pool"
backbone = "$work/vit-b"
image_size = 512

[engine]
mode = "ddp"

[engine.adam]
lr = 1e-4
weight_decay = 1e-4

[train]
steps = 4
global_batch = $batch
seed = 0
log_every = 1
TOML
rust_steps=$("$radit" predictors train --threads "$threads" --config "$work/predictor.toml" 2>/dev/null |
  grep '^{"step"' | "$py" -c 'import json,sys; s=sorted(json.loads(l)["images_per_second"] for l in list(sys.stdin)[1:]); print(s[len(s)//2])')
twin=$("$py" tests/python/dinov2_twin.py bench-predictor "$work/vit-b" "$batch" 3 "$threads")
echo "| what | implementation | threads | batch | seconds per step | images/s |"
echo "|---|---|---|---|---|---|"
awk -v b="$batch" -v th="$threads" -v ips="$rust_steps" \
  'BEGIN{printf "| predictor step (Rad-DINO AP, 512 -> 518) | radit | %d | %d | %.2f | %.3f |\n", th, b, b/ips, ips}'
awk -v b="$batch" -v th="$threads" -v s="$(field "$twin" median_s)" \
  'BEGIN{printf "| predictor step (Rad-DINO AP, 512 -> 518) | pytorch | %d | %d | %.2f | %.3f |\n", th, b, s, b/s}'

# The edits.
"$py" tests/python/radit_twin.py export --preset "$preset" --perturb --out "$work/twin" >/dev/null
side=$("$py" -c 'import json,sys; from safetensors import safe_open; print(json.loads(safe_open(sys.argv[1],"pt").metadata()["radit.config"])["input_size"])' "$work/twin/weights.safetensors")
"$radit" synth --out "$work/synth" --images 96 --sizes 40x48 >/dev/null
"$radit" shard --no-progress --table "$work/synth/table.csv" --images "$work/synth/images" --out "$work/store" \
  --image-size "$side" --shard-images 16 >/dev/null
"$radit" scm train --preset tiny --steps 50 --batch 64 --store "$work/store" --out "$work/scm.safetensors" >/dev/null
rust=$("$radit" edit --threads "$threads" --split train --weights "$work/twin/weights.safetensors" --store "$work/store" \
  --scm "$work/scm.safetensors" --patients "$patients" --batch 8 --interventions sex,age --out "$work/edits" \
  2>&1 >/dev/null | grep '^{"rank"' | tail -1)
twin=$("$py" tests/python/radit_twin.py bench-edit --dir "$work/twin" --edits "$work/edits" --batch 8 --threads "$threads")
n=$(field "$rust" edits_written)
echo
echo "| edits ($preset, ${side}x${side}, dopri5 1e-5, batch 8) | implementation | threads | images/s (solves) | model evaluations per image | SCM seconds | largest difference (levels of 65,536) |"
echo "|---|---|---|---|---|---|---|"
awk -v n="$n" -v th="$threads" -v s="$(field "$rust" solve_seconds)" -v nfe="$(field "$rust" nfe_per_image)" \
  -v scm="$(field "$rust" scm_seconds)" \
  'BEGIN{printf "| %d edits | radit | %d | %.3f | %.1f | %.2f | - |\n", n, th, n/s, nfe, scm}'
awk -v n="$n" -v th="$threads" -v ips="$(field "$twin" images_per_second)" -v nfe="$(field "$twin" nfe_per_image)" \
  -v d="$(field "$twin" max_level_difference)" \
  'BEGIN{printf "| %d edits | pytorch | %d | %.3f | %.1f | - | %d |\n", n, th, ips, nfe, d}'
# RadiT XL's forward per image: FLOPs per token x tokens, as `radit model info xl-latent` prints them.
info=$("$radit" model info xl-latent)
xl=$(awk -v t="$(grep -o '[0-9]* tokens' <<<"$info" | head -1 | awk '{print $1}')" \
  -v g="$(grep -o '[0-9.]* G forward' <<<"$info" | head -1 | awk '{print $1}')" 'BEGIN{print g*t}')
echo
for nfe in 150 300; do
  for u in 0.3 0.5; do
    awk -v g="$xl" -v nfe="$nfe" -v u="$u" 'BEGIN{
      printf "RadiT XL (%.0f GFLOP per forward), 5,000 patients x 6 interventions at %d model evaluations per edit (abduction + prediction), %.0f%% of a GH200'"'"'s 989 bf16 TFLOP/s: %.1f GPU-hours\n", g,
        nfe, 100*u, 30000*nfe*g*1e9/(989e12*u)/3600}'
  done
done

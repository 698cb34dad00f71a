#!/usr/bin/env bash
# The lambda sweep of Table 8 (radvae.md: the swept values were lost; {0, 50, 100, 250, 500, 1000}): one job per
# lambda from lora-up-8-8.toml, each with its own name, run directory, checkpoints and best weights.
#   examples/vae-lora/sweep-lambda.sh --dry-run     # the plans only
#   examples/vae-lora/sweep-lambda.sh               # submit them
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
radit="${RADIT:-radit}"
out="${SWEEP_DIR:-$here/sweep}"
mkdir -p "$out"
for lambda in 0 50 100 250 500 1000; do
    spec="$out/lora-up-8-8-lambda-$lambda.toml"
    sed -e "s/^perceptual = .*/perceptual = $lambda.0/" \
        -e "s/lora-up-8-8/lora-up-8-8-lambda-$lambda/g" \
        "$here/lora-up-8-8.toml" > "$spec"
    "$radit" run "$spec" "$@"
done

#!/usr/bin/env bash
# libtorch threads on a small CPU run, side by side in one run: the README's tiny training config (100 steps on the
# quickstart's 32x32 store) and the SCM example (300 steps of 256 profiles), each with one thread, two threads and
# radit's own choice (no --threads), on an idle machine and with one core held by another process (a busy loop:
# a login node, a second job, the loader's decode threads). Prints a Markdown table of wall seconds.
# Usage: scripts/bench-threads.sh
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${hog:-}" ] && kill "$hog" 2>/dev/null || true' EXIT
cd "$work"
"$radit" quickstart --no-train > /dev/null 2>&1
sed 's/^steps = 400/steps = 100/' "$root/examples/radit-tiny-cpu.toml" > tiny.toml
seconds() { # COMMAND...: wall seconds of a clean run
  rm -rf radit-quickstart/checkpoints-tiny-cpu scm.safetensors scm.ckpt
  local t0 t1
  t0=$(now)
  "$@" > /dev/null 2>&1
  t1=$(now)
  echo "$t1 - $t0" | bc -l | xargs printf "%.2f"
}
row() { # LABEL ARGS...: one row for each load
  local label=$1
  shift
  local idle busy
  idle=$(seconds "$@")
  sh -c 'while :; do :; done' &
  hog=$!
  busy=$(seconds "$@")
  kill $hog
  hog=
  echo "| $label | $idle | $busy |"
}
machine_line
echo
echo "| run | idle (s) | one core busy (s) |"
echo "|---|---|---|"
for t in 1 2 auto; do
  flag=()
  [ "$t" = auto ] || flag=(--threads "$t")
  row "tiny training, 100 steps, threads $t" "$radit" train --config tiny.toml "${flag[@]}"
done
for t in 1 2 auto; do
  flag=()
  [ "$t" = auto ] || flag=(--threads "$t")
  row "SCM tiny, 300 steps x 256, threads $t" "$radit" scm train --store radit-quickstart/store --preset tiny \
    --steps 300 --batch 256 --out scm.safetensors "${flag[@]}"
done

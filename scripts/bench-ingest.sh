#!/usr/bin/env bash
# Ingest benchmark: radit shard (1 thread and all cores) against its ceiling (`radit shard --ceiling`: the same
# reads, decodes, resizes and compression, nothing else) and a straightforward Python pipeline (PIL + numpy +
# zarr-python) over the same files, for 512x512 16-bit inputs and for large inputs that are resized. Every side
# times itself in its own process (radit from reading the table to writing the manifest; Python after its imports).
# Usage: scripts/bench-ingest.sh [N_512] [N_LARGE]   (defaults 512 and 96). Prints a Markdown table.
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
n512=${1:-512}
nlarge=${2:-96}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

machine_line
echo
echo "| input | pipeline | threads | images | seconds | images/s | images/s/core | input MB/s | output raw MB/s | stored/raw |"
echo "|---|---|---|---|---|---|---|---|---|---|"
summaries=()
for spec in "512x512:$n512" "2048x2500:$nlarge"; do
  size=${spec%%:*}
  n=${spec##*:}
  data="$work/data-$size"
  "$radit" synth --out "$data" --images "$n" --sizes "$size" --seed 11 >/dev/null
  in_mb=$(input_mb "$data/images")
  raw_mb=$(awk -v n="$n" 'BEGIN{printf "%.1f", n*512*512*2/1048576}')
  for threads in 1 "$(nproc)"; do
    # The ceiling: the same reads, decodes, resizes and compression with nothing else, timed in its process.
    c=$("$radit" shard --ceiling --table "$data/table.csv" --images "$data/images" --threads "$threads")
    cs=$(echo "$c" | sed -n 's/.* shards, \([0-9.]*\) s, .*/\1/p')
    cst=$(echo "$c" | sed -n 's/.*images\/s, \([0-9]*\) stored bytes.*/\1/p')
    awk -v n="$n" -v s="$cs" -v th="$threads" -v inmb="$in_mb" -v raw="$raw_mb" -v st="$cst" -v sz="$size" \
      'BEGIN{printf "| %s | ceiling: read + decode + preprocess + compress | %d | %d | %.2f | %.1f | %.1f | %.1f | %.1f | %.3f |\n", sz, th, n, s, n/s, n/s/th, inmb/s, raw/s, st/(raw*1048576)}'
    out="$work/radit-$size-$threads"
    # radit times itself (from reading the table to the manifest), as the Python pipeline does after its imports.
    s=$("$radit" shard --no-progress --table "$data/table.csv" --images "$data/images" --out "$out" --threads "$threads" |
      sed -n 's/^ *\([0-9.]*\) s, about .*/\1/p')
    stored=$(du -sb --exclude=.ingest "$out" | cut -f1)
    [ "$threads" = 1 ] && radit_one=$(awk -v n="$n" -v s="$s" 'BEGIN{printf "%.2f", n/s}')
    awk -v n="$n" -v s="$s" -v th="$threads" -v inmb="$in_mb" -v raw="$raw_mb" -v st="$stored" -v sz="$size" \
      'BEGIN{printf "| %s | radit shard | %d | %d | %.2f | %.1f | %.1f | %.1f | %.1f | %.3f |\n", sz, th, n, s, n/s, n/s/th, inmb/s, raw/s, st/(raw*1048576)}'
    summaries+=("$(awk -v a="$s" -v c="$cs" -v sz="$size" -v th="$threads" \
      'BEGIN{printf "SUMMARY|ingest %s, %d threads: radit shard vs its ceiling|%.2f s|%.2f s|%.2f|>= 0.9", sz, th, a, c, c/a}')")
  done
  out="$work/python-$size"
  json=$("$RADIT_VENV/bin/python" "$root/bench/python_ingest.py" --table "$data/table.csv" --images "$data/images" --out "$out")
  s=$(echo "$json" | "$RADIT_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["seconds"])')
  stored=$(echo "$json" | "$RADIT_VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["stored_bytes"])')
  awk -v n="$n" -v s="$s" -v inmb="$in_mb" -v raw="$raw_mb" -v st="$stored" -v sz="$size" \
    'BEGIN{printf "| %s | Python (PIL+numpy+zarr-python) | 1 | %d | %.2f | %.1f | %.1f | %.1f | %.1f | %.3f |\n", sz, n, s, n/s, n/s, inmb/s, raw/s, st/(raw*1048576)}'
  target=">= 2"
  [ "$size" = 512x512 ] || target=">= 4"
  summaries+=("$(awk -v a="$radit_one" -v n="$n" -v s="$s" -v sz="$size" -v target="$target" \
    'BEGIN{printf "SUMMARY|ingest %s: 1 core vs the Python pipeline (1 process)|%.2f img/s|%.2f img/s|%.2f|%s", sz, a, n/s, a/(n/s), target}')")
done
echo
printf '%s\n' "${summaries[@]}"

#!/usr/bin/env bash
# DICOM ingest and harmonise benchmark. Ingest: radit shard (1 thread and all cores) against a straightforward
# Python pipeline (pydicom + numpy + PIL + zarr-python, bench/python_dicom_ingest.py) over the same 2048x2500 12-bit
# MONOCHROME1 DX files (bench/make_dicom_inputs.py), in Explicit VR Little Endian and RLE Lossless. Harmonise: radit
# harmonise nih / padchest --no-check-files on synthetic release tables (bench/harmonise_inputs.py) against a
# plain-Python NIH harmoniser (bench/python_harmonise.py).
# Usage: scripts/bench-dicom.sh [N_IMAGES] [HARMONISE_SCALE]   (defaults 96 and 1: 112,120 NIH and 160,000 PadChest
# rows; the scale multiplies both). Prints the machine line and two Markdown tables; the generation times, the
# Python pipeline's split of its time by stage and a check that the Python NIH table equals radit's go to stderr.
# radit is timed from outside (process start to exit); the Python scripts time themselves after their imports.
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
n=${1:-96}
scale=${2:-1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

field() { "$py" -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

machine_line
echo
echo "| input | pipeline | threads | images | seconds | images/s | images/s/core | input MB/s | stored/raw |"
echo "|---|---|---|---|---|---|---|---|---|"
raw_mb=$(awk -v n="$n" 'BEGIN{printf "%.1f", n*512*512*2/1048576}')
for syntax in explicit rle; do
  case $syntax in
    explicit) label="2048x2500 12-bit DICOM, explicit VR LE" ;;
    rle) label="2048x2500 12-bit DICOM, RLE Lossless" ;;
  esac
  data="$work/dicom-$syntax"
  gen=$("$py" "$root/bench/make_dicom_inputs.py" "$data" --images "$n" --syntax "$syntax")
  echo "generated $n $syntax inputs in $(field "$gen" seconds) s" >&2
  in_mb=$(input_mb "$data/images")
  for threads in 1 "$(nproc)"; do
    out="$work/radit-$syntax-$threads"
    t0=$(now)
    "$radit" shard --no-progress --table "$data/table.csv" --images "$data/images" --out "$out" --threads "$threads" >/dev/null
    t1=$(now)
    stored=$(du -sb --exclude=.ingest "$out" | cut -f1)
    awk -v n="$n" -v t0="$t0" -v t1="$t1" -v th="$threads" -v inmb="$in_mb" -v raw="$raw_mb" -v st="$stored" -v lbl="$label" \
      'BEGIN{s=t1-t0; printf "| %s | radit shard | %d | %d | %.2f | %.1f | %.1f | %.1f | %.3f |\n", lbl, th, n, s, n/s, n/s/th, inmb/s, st/(raw*1048576)}'
    rm -rf "$out"
  done
  out="$work/python-$syntax"
  json=$("$py" "$root/bench/python_dicom_ingest.py" --table "$data/table.csv" --images "$data/images" --out "$out")
  echo "Python $syntax stages (s): $(field "$json" stages)" >&2
  s=$(field "$json" seconds)
  stored=$(field "$json" stored_bytes)
  awk -v n="$n" -v s="$s" -v inmb="$in_mb" -v raw="$raw_mb" -v st="$stored" -v lbl="$label" \
    'BEGIN{printf "| %s | Python (pydicom+numpy+PIL+zarr-python) | 1 | %d | %.2f | %.1f | %.1f | %.1f | %.3f |\n", lbl, n, s, n/s, n/s, inmb/s, st/(raw*1048576)}'
  rm -rf "$out" "$data"
done

echo
echo "| table | pipeline | rows | seconds | rows/s |"
echo "|---|---|---|---|---|"
tables="$work/tables"
"$py" "$root/bench/harmonise_inputs.py" "$tables" --scale "$scale" >/dev/null
for source in nih padchest; do
  out="$work/radit-$source.csv"
  t0=$(now)
  "$radit" harmonise "$source" --root "$tables/$source" --no-check-files --out "$out" >/dev/null
  t1=$(now)
  rows=$(($(wc -l <"$out") - 1))
  case $source in
    nih) label="NIH ChestX-ray14 (Data_Entry_2017_v2020.csv)" ;;
    padchest) label="PadChest (labels_160K csv)" ;;
  esac
  awk -v r="$rows" -v t0="$t0" -v t1="$t1" -v lbl="$label" -v src="$source" \
    'BEGIN{s=t1-t0; printf "| %s | radit harmonise %s | %d | %.2f | %.0f |\n", lbl, src, r, s, r/s}'
done
json=$("$py" "$root/bench/python_harmonise.py" --root "$tables/nih" --out "$work/python-nih.csv")
cmp -s "$work/python-nih.csv" "$work/radit-nih.csv" || echo "warning: the Python NIH table differs from radit's" >&2
awk -v r="$(field "$json" rows)" -v s="$(field "$json" seconds)" \
  'BEGIN{printf "| NIH ChestX-ray14 (Data_Entry_2017_v2020.csv) | Python (csv module) | %d | %.2f | %.0f |\n", r, s, r/s}'

#!/usr/bin/env bash
# Loader benchmark: radit's streaming loader against its ceiling (read + decompress every shard, nothing else; and
# read + verify each object's sha256 + decompress, which the loader also does) and
# two peers on the same images: zarr-python reading the same store, and MosaicML Streaming reading them converted to
# MDS. Sources: the local store (OS page cache dropped first when permitted, then warm) and moto S3 on 127.0.0.1
# (node-local cache cold, then warm). Every reader hands out dequantised float32 batches of 64 with labels and age.
# Usage: scripts/bench-loader.sh [IMAGES]   (default 1024 images of 512x512, 16 shards). Prints a Markdown table.
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
n=${1:-1024}
batch=64
cores=$(nproc)
work=$(mktemp -d)
moto_pid=
cleanup() { [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# MosaicML Streaming in its own virtualenv (see bench/requirements-streaming.txt), reusing radit's torch.
svenv="$RADIT_CACHE/bench-streaming"
want=$(sha256sum "$root/bench/requirements-streaming.txt" | cut -d' ' -f1)
if [ "$(cat "$svenv/.radit-requirements.sha256" 2>/dev/null)" != "$want" ]; then
  rm -rf "$svenv"
  python3 -m venv "$svenv"
  site=$("$svenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$RADIT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$site/radit-venv.pth"
  "$svenv/bin/pip" install -q --no-deps -r "$root/bench/requirements-streaming.txt"
  echo "$want" >"$svenv/.radit-requirements.sha256"
fi
spy="$svenv/bin/python"

drop_page_cache() {
  sync
  if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then cold="page cache dropped"; else cold="page cache not droppable"; fi
}
field() { "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); k=sys.argv[2].split("."); [d:=d[x] for x in k]; print(d)' "$1" "$2"; }
ceiling_rate=
row() { # source reader parallelism cache json [samples_field seconds_field]
  local json=$5 s t rate
  s=$(field "$json" "${6:-samples}")
  t=$(field "$json" "${7:-seconds}")
  rate=$(awk -v s="$s" -v t="$t" 'BEGIN{printf "%.1f", s/t}')
  last_rate=$rate
  awk -v src="$1" -v rd="$2" -v par="$3" -v c="$4" -v s="$s" -v t="$t" -v r="$rate" -v p="$(echo "$3" | grep -o '^[0-9]*')" -v ceil="$ceiling_rate" \
    'BEGIN{ratio = (ceil == "" ? "" : sprintf("%.2f", r/ceil)); printf "| %s | %s | %s | %s | %d | %.2f | %.1f | %.1f | %s |\n", src, rd, par, c, s, t, r, r/p, ratio}'
}

echo "machine: $cores cores, $(awk '/model name/{$1=$2=$3="";print;exit}' /proc/cpuinfo | xargs), $(date -u +%F)"
"$radit" synth --out "$work/data" --images "$n" --sizes 512x512 --seed 11 >/dev/null
"$radit" shard --no-progress --table "$work/data/table.csv" --images "$work/data/images" --out "$work/store" >/dev/null
rows=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["counts"]["splits"]["train"]["images"])' "$work/store/manifest.json")
echo "store: $rows training images, 512x512 uint16, shards of 64, zstd 3, $(du -sh --exclude=.ingest "$work/store" | cut -f1) on disk"
"$spy" "$root/bench/streaming_loader.py" convert --store "$work/store" --out "$work/mds" >/dev/null
echo "MDS copy: $(ls "$work/mds"/*.mds* | wc -l) shards, $(du -sh "$work/mds" | cut -f1)"

port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$RADIT_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto_pid=$!
export AWS_ENDPOINT_URL="http://127.0.0.1:$port" S3_ENDPOINT_URL="http://127.0.0.1:$port" AWS_ALLOW_HTTP=true \
  AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
for _ in $(seq 50); do "$py" -c "import socket; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break; sleep 0.2; done
"$py" "$root/bench/s3_upload.py" "$work/store" bench store
"$py" "$root/bench/s3_upload.py" "$work/mds" bench mds

bench() { "$radit" data bench "$1" --global-batch "$batch" --json "${@:2}"; }
echo
echo "| source | reader | threads | cache | samples | seconds | samples/s | samples/s/core | of the verifying ceiling |"
echo "|---|---|---|---|---|---|---|---|---|"
for threads in 1 "$cores"; do
  drop_page_cache
  ceiling_rate=
  j=$(bench "$work/store" --threads "$threads" --ceiling)
  row "local" "ceiling: read + decompress" "$threads" "$cold" "$j"
  ceiling_rate=$(field "$j" samples_per_s)
  local_ceiling=$ceiling_rate
  ceiling_rate=
  drop_page_cache
  j=$(bench "$work/store" --threads "$threads" --ceiling --verify)
  row "local" "ceiling: read + verify (sha256) + decompress" "$threads" "$cold" "$j"
  ceiling_rate=$(field "$j" samples_per_s)
  local_verified_ceiling=$ceiling_rate
  drop_page_cache
  row "local" "radit loader" "$threads" "$cold" "$(bench "$work/store" --threads "$threads")"
  local_cold=$last_rate
  row "local" "radit loader" "$threads" "page cache warm" "$(bench "$work/store" --threads "$threads")"
  ceiling_rate=
  j=$(bench "s3://bench/store" --threads "$threads" --ceiling)
  row "moto S3" "ceiling: read + decompress" "$threads" "none" "$j"
  s3_ceiling=$(field "$j" samples_per_s)
  ceiling_rate=
  j=$(bench "s3://bench/store" --threads "$threads" --ceiling --verify)
  row "moto S3" "ceiling: read + verify (sha256) + decompress" "$threads" "none" "$j"
  ceiling_rate=$(field "$j" samples_per_s)
  s3_verified_ceiling=$ceiling_rate
  rm -rf "$work/cache"
  row "moto S3" "radit loader" "$threads" "node cache cold" "$(bench "s3://bench/store" --threads "$threads" --cache "$work/cache")"
  s3_cold=$last_rate
  row "moto S3" "radit loader" "$threads" "node cache warm" "$(bench "s3://bench/store" --threads "$threads" --cache "$work/cache")"
done
ceiling_rate=
drop_page_cache
row "local" "zarr-python (1 process)" "1" "$cold" "$("$py" "$root/bench/zarr_loader.py" --store "$work/store" --global-batch "$batch")"
row "local" "zarr-python (1 process)" "1" "page cache warm" "$("$py" "$root/bench/zarr_loader.py" --store "$work/store" --global-batch "$batch")"
drop_page_cache
row "local" "MosaicML Streaming (MDS)" "$cores workers" "$cold" "$("$spy" "$root/bench/streaming_loader.py" read --local "$work/mds" --workers "$cores")"
streaming_local_cold=$last_rate
row "local" "MosaicML Streaming (MDS)" "$cores workers" "page cache warm" "$("$spy" "$root/bench/streaming_loader.py" read --local "$work/mds" --workers "$cores")"
row "moto S3" "MosaicML Streaming (MDS)" "$cores workers" "node cache cold" "$("$spy" "$root/bench/streaming_loader.py" read --remote s3://bench/mds --local "$work/mds-cache" --workers "$cores")"
streaming_s3_cold=$last_rate
row "moto S3" "MosaicML Streaming (MDS)" "$cores workers" "node cache warm" "$("$spy" "$root/bench/streaming_loader.py" read --remote s3://bench/mds --local "$work/mds-cache" --workers "$cores")"
echo
# The rows at every core ($cores threads), for scripts/bench-all.sh.
summary() { awk -v what="$1" -v a="$2" -v b="$3" -v target="$4" 'BEGIN{printf "SUMMARY|loader: %s|%.1f samples/s|%.1f samples/s|%.2f|%s\n", what, a, b, a/b, target}'; }
summary "local, $cold, vs read+decompress ceiling" "$local_cold" "$local_ceiling" ">= 0.95"
summary "moto S3, node cache cold, vs its ceiling" "$s3_cold" "$s3_ceiling" ">= 0.95"
summary "local, $cold, vs the read+verify+decompress ceiling" "$local_cold" "$local_verified_ceiling" ">= 0.95"
summary "moto S3, node cache cold, vs its read+verify+decompress ceiling" "$s3_cold" "$s3_verified_ceiling" ">= 0.95"
summary "local, $cold, vs MosaicML Streaming" "$local_cold" "$streaming_local_cold" ">= 1"
summary "moto S3, node cache cold, vs MosaicML Streaming" "$s3_cold" "$streaming_s3_cold" ">= 1"

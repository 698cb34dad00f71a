#!/usr/bin/env bash
# Checkpoints against torch.distributed.checkpoint (DCP), side by side in one run, the same disk and directory:
#  - radit: `radit engine bench --checkpoint` saves the engine's state after its steps (fp32 weights, Adam m and v,
#    EMA), then loads it back with the object out of the page cache;
#  - PyTorch: bench/fsdp2_engine.py --checkpoint saves the FSDP2 state of the same model (sharded weights, Adam, EMA)
#    with `dcp.async_save`, then `dcp.load`s it cold;
#  - the raw disk: radit's object read back cold, and written again to a new file and fsynced, by one plain
#    read and one write, in the same directory with the same memory in use.
# Stall: how long training is held up (radit: `save` returning; DCP: `async_save` returning), for a first save and a
# later one (radit keeps its host buffer between saves). Write: until the later save's state is on disk. Each side runs twice (radit, DCP, DCP, radit); the better run of each is kept.
# The directory must be a real disk (not tmpfs): $RADIT_BENCH_DIR, default target/bench-checkpoint.
# Usage: scripts/bench-checkpoint.sh [PRESET] [WORLD]   (default b-latent 1). Prints a table and SUMMARY lines.
set -euo pipefail
# shellcheck source=bench-env.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
preset=${1:-b-latent}
world=${2:-1}
cores=$(nproc)
threads=$((cores / world > 0 ? cores / world : 1))
dir="${RADIT_BENCH_DIR:-$root/target/bench-checkpoint}"
mkdir -p "$dir"
trap 'rm -rf "$dir"/radit "$dir"/torch' EXIT
machine_line
echo "directory: $dir ($(df -T "$dir" | awk 'NR==2{print $2}'))"
radit_run() {
  rm -rf "$dir/radit"
  if [ "$world" = 1 ]; then
    "$radit" engine bench "$preset" --batch 1 --steps 1 --warmup 1 --threads "$threads" --checkpoint "$dir/radit"
  else
    mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$world" -x OMP_NUM_THREADS="$threads" \
      "$radit" engine bench "$preset" --batch 1 --steps 1 --warmup 1 --threads "$threads" --checkpoint "$dir/radit"
  fi
}
torch_run() {
  rm -rf "$dir/torch"
  OMP_NUM_THREADS=$threads "$py" "$root/bench/fsdp2_engine.py" --preset "$preset" --global-batch "$world" \
    --world "$world" --steps 1 --warmup 1 --threads "$threads" --checkpoint "$dir/torch"
}
results=$(mktemp)
trap 'rm -rf "$dir"/radit "$dir"/torch "$results"' EXIT
{ radit_run; torch_run; torch_run; radit_run; } | grep '^{' >>"$results"
"$py" - "$preset" "$world" "$results" <<'PY'
import json, sys
preset, world, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = [json.loads(l) for l in open(path)]
ours = [r["checkpoint"] for r in rows if "rank" in r]
theirs = [r["checkpoint"] for r in rows if r.get("impl") == "pytorch-fsdp2"]
r = min(ours, key=lambda c: c["stall_seconds"] + c["write_seconds"])
t = min(theirs, key=lambda c: c["stall_seconds"] + c["write_seconds"])
gb_r, gb_t = r["bytes_per_rank"] / 1e9, t["state_bytes"] / 1e9
raw_w, raw_r = r["raw_disk_synced_mb_per_second"], r["raw_read_cold_mb_per_second"]
w_r, w_t = gb_r * 1e3 / r["write_seconds"], gb_t * 1e3 / t["write_seconds"]
print("| preset | world | GB/rank radit / DCP | stall s (s/GB) radit: first / later save | stall s (s/GB) DCP: first / later save | write MB/s radit / DCP / raw+fsync | restore s radit / DCP | raw cold read MB/s |")
print("|---|---|---|---|---|---|---|---|")
per = lambda c, gb: f"{c['first_stall_seconds']:.2f} ({c['first_stall_seconds'] / gb:.2f}) / {c['stall_seconds']:.2f} ({c['stall_seconds'] / gb:.2f})"
print(f"| {preset} | {world} | {gb_r:.2f} / {gb_t:.2f} | {per(r, gb_r)} "
      f"| {per(t, gb_t)} | {w_r:,.0f} / {w_t:,.0f} / {raw_w:,.0f} "
      f"| {r['restore_seconds']:.2f} / {t['restore_seconds']:.2f} | {raw_r:,.0f} |")
print(f"SUMMARY|checkpoint {preset} world {world}: stall per GB of state (a later save)|{r['stall_seconds'] / gb_r:.2f} s/GB|DCP {t['stall_seconds'] / gb_t:.2f} s/GB|{r['stall_seconds'] / gb_r:.2f}|<= 0.5")
print(f"SUMMARY|checkpoint {preset} world {world}: write bandwidth vs raw disk (write+fsync)|{w_r:,.0f} MB/s|{raw_w:,.0f} MB/s|{w_r / raw_w:.2f}|>= 0.8")
print(f"SUMMARY|checkpoint {preset} world {world}: write bandwidth vs DCP async_save|{w_r:,.0f} MB/s|{w_t:,.0f} MB/s|{w_r / w_t:.2f}|>= 1")
print(f"SUMMARY|checkpoint {preset} world {world}: restore vs raw cold read of the same bytes|{r['restore_seconds']:.2f} s|{gb_r * 1e3 / raw_r:.2f} s|{r['restore_seconds'] / (gb_r * 1e3 / raw_r):.2f}|-")
PY

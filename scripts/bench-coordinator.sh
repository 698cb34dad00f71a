#!/usr/bin/env bash
# Scale by simulation: 4,096 simulated ranks join one coordinator on 127.0.0.1 and heartbeat it at 1 Hz (then 5 Hz
# and 0.2 Hz). radit: threads using the real rank client (one kept-alive connection each) against the real
# coordinator. Alternative in the same run: PyTorch's c10d TCPStore (torchrun's rendezvous store) with the same
# workload at 1 Hz (bench/tcpstore_rendezvous.py), once with `set` (which TCPStore never answers) and once with
# `compare_set` (answered, as radit's heartbeat is). Prints each side's JSON (join time, heartbeat latency, the
# server's own CPU), then `SUMMARY|...` lines: server CPU per heartbeat against each TCPStore beat, the join's
# server CPU, and false alarms.
# Usage: scripts/bench-coordinator.sh [RANKS] [SECONDS] [HZ...]   (default 4096 60 1 5 0.2)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
ranks="${1:-4096}"
seconds="${2:-60}"
shift 2 || shift $#
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(1 5 0.2)
machine_line
one_hz=
for hz in "${rates[@]}"; do
  echo "== radit coordinator, $hz Hz"
  r=$(RUST_LOG=warn "$radit" coordinator bench --ranks "$ranks" --hz "$hz" --seconds "$seconds" --json | grep "^{" || true)
  echo "$r"
  [ "$hz" = 1 ] && one_hz=$r
done
echo "== torch.distributed TCPStore, 1 Hz"
t=$("$py" "$root/bench/tcpstore_rendezvous.py" "$ranks" 1 "$seconds" 2> >(grep -v 'hostname of the client socket' >&2))
echo "$t"
[ -n "$one_hz" ] || { echo "SUMMARY|coordinator|no 1 Hz row|||"; exit 0; }
"$py" - "$one_hz" "$t" <<'PY'
import json, sys
r, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
ours = r["coordinator_cpu_percent"] / 100 * r["heartbeat_seconds"] / max(r["heartbeats"], 1) * 1e6
theirs = t["store_cpu_seconds"] / max(t["heartbeats"], 1) * 1e6
answered = t["round_trip_store_cpu_seconds"] / max(t["round_trip_heartbeats"], 1) * 1e6
n = r["ranks"]
print(f"SUMMARY|coordinator, {n} ranks at 1 Hz: server CPU per heartbeat vs TCPStore set (one-way, no reply)|{ours:.1f} us|{theirs:.1f} us|{ours / theirs:.2f}|<= 2")
print(f"SUMMARY|coordinator, {n} ranks at 1 Hz: server CPU per heartbeat vs TCPStore compare_set (answered)|{ours:.1f} us|{answered:.1f} us|{ours / answered:.2f}|<= 2")
print(f"SUMMARY|coordinator, join of {n} ranks: server CPU|{r['join_coordinator_cpu_seconds']:.2f} s|1 s (target)|{r['join_coordinator_cpu_seconds']:.2f}|<= 1")
print(f"SUMMARY|coordinator, {n} ranks at 1 Hz: false alarms in {r['health_checks']} health checks|{r['false_alarms']}|0|{r['false_alarms']}|<= 0")
PY

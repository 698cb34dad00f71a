#!/usr/bin/env bash
# Scale by simulation: 4,096 simulated ranks join one coordinator on 127.0.0.1 and heartbeat it at 1 Hz (then 5 Hz).
# radit: threads using the real rank client (one kept-alive connection each) against the real coordinator.
# Alternative in the same run: PyTorch's c10d TCPStore (torchrun's rendezvous store) with the same workload
# (bench/tcpstore_rendezvous.py). Prints join time, heartbeat latency and the server's own CPU.
# Usage: scripts/bench-coordinator.sh [RANKS] [SECONDS]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bench-env.sh"
ranks="${1:-4096}"
seconds="${2:-60}"
echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(date -u +%F)"
for hz in 1 5 0.2; do
  echo "== radit coordinator, $hz Hz"
  RUST_LOG=warn "$radit" coordinator bench --ranks "$ranks" --hz "$hz" --seconds "$seconds" || true
done
echo "== torch.distributed TCPStore, 1 Hz"
"$py" "$root/bench/tcpstore_rendezvous.py" "$ranks" 1 "$seconds" 2> >(grep -v 'hostname of the client socket' >&2)

#!/usr/bin/env bash
# The reliability soak (issue 19): N short 2-rank `radit run` jobs, each hit by a random fault (a rank SIGKILLed, the
# run SIGTERMed and resumed, or the coordinator SIGKILLed and restarted at once) at a random step and moment; every
# run must end with the uninterrupted run's weights, bit for bit. Prints each trial with its seed (replay one with
# RADIT_SOAK_SEED=s ./scripts/soak.sh 1) and a summary. Never in CI: N = 50 takes about 10 minutes here.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
trials="${1:-50}"
log="$root/target/soak-$(date -u +%Y%m%dT%H%M%SZ).log"
started=$(date +%s)
set +e
RADIT_SOAK_TRIALS="$trials" cargo test --features fault-injection --test run_faults soak -- --ignored --nocapture --test-threads 1 2>&1 |
  tee "$log"
status=${PIPESTATUS[0]}
set -e
ok=$(grep -c '^soak trial .*: .*: ok' "$log" || true)
missed=$(grep -c 'fault missed' "$log" || true)
failed=$(grep -c '^soak trial .* FAIL' "$log" || true)
echo "soak: $trials trials, $ok ok ($missed with the fault missed), $failed failed, $(( $(date +%s) - started )) s; log $log"
exit "$status"

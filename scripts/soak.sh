#!/usr/bin/env bash
# The reliability soak (issues 19 and 38): N short 2-rank `radit run` jobs, each hit by a fault of a random kind at a
# random step and moment: a rank SIGKILLed, the run SIGTERMed and resumed, the coordinator SIGKILLed and restarted at
# once, the object store holding the data stalled (moto SIGSTOPped for 1-5 s), the checkpoint disk full (a tmpfs in a
# private mount namespace: needs root), a rank hung (SIGSTOP), a rank SIGKILLed and then a rank of the relaunch
# SIGKILLed while it restores. Nothing may be lost: every run ends with the uninterrupted run's weights, bit for
# bit, or (the full disk, not recoverable by design) stops once naming its last good checkpoint, from which a rerun
# ends with those weights. Prints each trial with its seed (replay one with RADIT_SOAK_SEED=s ./scripts/soak.sh 1;
# RADIT_SOAK_KIND=HangRank keeps to one kind) and a summary per kind. Never in CI: N = 100 takes about 20 minutes.
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
missed=$(grep -c 'the process was gone' "$log" || true)
failed=$(grep -c '^soak trial .* FAIL' "$log" || true)
sed -n '/^soak summary/,$p' "$log" | grep -E '^(soak summary|  [A-Za-z]+:)' || true
echo "soak: $trials trials, $ok ok ($missed with the fault missed), $failed failed, $(( $(date +%s) - started )) s; log $log"
exit "$status"

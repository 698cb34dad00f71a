#!/usr/bin/env bash
# Every side-by-side comparison of BENCHMARKS.md in one run, then one table of each ratio against its target:
#   engine vs PyTorch FSDP2 (b-latent and tiny, world 1 and 2; and against the plain forward+backward), RadUNet and
#   the data-parallel engine vs the PyTorch twin and DDP,
#   checkpoints vs torch.distributed.checkpoint, the loader vs its ceiling and MosaicML Streaming, ingest vs the
#   Python pipeline, the coordinator vs TCPStore at 4,096 simulated ranks.
# Long (about an hour on 2 cores) and sensitive to load, so it never runs in CI: it wants --run, refuses under $CI,
# and refuses to start while the machine is busy (anything else running skews both sides differently).
# Each part's full log goes to $RADIT_BENCH_LOGS (default bench-logs/DATE); the parts print `SUMMARY|...` lines.
# Usage: scripts/bench-all.sh --run [PART...]   PART: engine engine-tiny unet checkpoint loader ingest coordinator
set -euo pipefail
if [ "${1:-}" != "--run" ]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
shift
if [ -n "${CI:-}" ]; then
  echo "bench-all: not in CI (\$CI is set); benchmarks run by hand on an idle machine" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
load=$(cut -d' ' -f1 /proc/loadavg)
if [ -z "${RADIT_BENCH_IGNORE_LOAD:-}" ] && awk -v l="$load" -v n="$(nproc)" 'BEGIN{exit !(l > 0.5 * n)}'; then
  echo "bench-all: the 1-minute load is $load on $(nproc) cores; wait for the machine to be idle" \
    "(or set RADIT_BENCH_IGNORE_LOAD=1 and say so beside the numbers)" >&2
  exit 3
fi
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(engine engine-tiny unet checkpoint loader ingest coordinator)
logs="${RADIT_BENCH_LOGS:-$here/../bench-logs/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$logs"
echo "machine: $(nproc) cores, $(awk '/model name/{$1=$2=$3="";print;exit}' /proc/cpuinfo | xargs)," \
  "$(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%F); commit" \
  "$(git -C "$here/.." rev-parse --short HEAD)$(git -C "$here/.." diff --quiet || echo '+changes'); logs in $logs"
for part in "${parts[@]}"; do
  case $part in
    engine) cmd=("$here/bench-engine.sh" b-latent 2 3) ;;
    engine-tiny) cmd=("$here/bench-engine.sh" tiny 16 20) ;;
    unet) cmd=("$here/bench-unet.sh" unet-small 4 3) ;;
    checkpoint) cmd=("$here/bench-checkpoint.sh") ;;
    loader) cmd=("$here/bench-loader.sh" 2048) ;;
    ingest) cmd=("$here/bench-ingest.sh") ;;
    coordinator) cmd=("$here/bench-coordinator.sh" 4096 60 1) ;;
    *)
      echo "bench-all: unknown part $part" >&2
      exit 2
      ;;
  esac
  echo "== $part: ${cmd[*]}"
  start=$(date +%s)
  if ! "${cmd[@]}" >"$logs/$part.log" 2>"$logs/$part.err"; then
    echo "SUMMARY|$part|failed: see $logs/$part.err|||" >>"$logs/$part.log"
  fi
  echo "   $(($(date +%s) - start)) s"
done
echo
echo "| comparison | radit | peer or ceiling | ratio | target | holds |"
echo "|---|---|---|---|---|---|"
cat "$logs"/*.log | grep '^SUMMARY|' | awk -F'|' '
  function holds(ratio, target,   op, bound) {
    if (target == "" || target == "-" || ratio == "") return "";
    split(target, t, " "); op = t[1]; bound = t[2] + 0;
    if (op == "<=") return (ratio + 0 <= bound) ? "yes" : "no";
    if (op == ">=") return (ratio + 0 >= bound) ? "yes" : "no";
    return "";
  }
  { printf "| %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6, holds($5, $6) }'

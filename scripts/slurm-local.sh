#!/usr/bin/env bash
# A single-host Slurm cluster for the tests: installs Debian's slurm-wlm if missing, writes a slurm.conf under
# $RADIT_CACHE/slurm (one node, this host, reached over 127.0.0.1), starts munged, slurmctld and slurmd, and waits
# until the node is idle. Prints `export SLURM_CONF=...` for the caller. Safe to re-run; `stop` stops the daemons.
# Usage: scripts/slurm-local.sh [start|stop]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=env.sh
source "$root/scripts/env.sh"
dir="$RADIT_CACHE/slurm"
conf="$dir/slurm.conf"
log() { printf '[slurm-local] %s\n' "$*" >&2; }

if [ "${1:-start}" = stop ]; then
  for d in slurmd slurmctld; do
    pkill -x "$d" 2>/dev/null || true
  done
  exit 0
fi

if ! command -v slurmctld >/dev/null; then
  log "installing slurm-wlm"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq slurm-wlm >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/{print int($2/1024) - 1024}' /proc/meminfo)
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
old=$(cat "$conf" 2>/dev/null || true)
cat >"$conf.new" <<CONF
ClusterName=radit-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Also how long a requeued job waits before it may start again (default 120 s; the tests requeue).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
if [ "$old" != "$(cat "$conf.new")" ]; then
  # A changed configuration: restart the daemons on it.
  for d in slurmd slurmctld; do pkill -x "$d" 2>/dev/null || true; done
  for _ in $(seq 1 50); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.2; done
fi
mv "$conf.new" "$conf"
export SLURM_CONF="$conf"

if ! pgrep -x munged >/dev/null; then
  log "starting munged"
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
fi
if ! pgrep -x slurmctld >/dev/null; then
  log "starting slurmctld"
  /usr/sbin/slurmctld -f "$conf"
fi
if ! pgrep -x slurmd >/dev/null; then
  log "starting slurmd"
  /usr/sbin/slurmd -f "$conf"
fi
for _ in $(seq 1 60); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n 1 || true)
  case "$state" in
    idle|mixed|allocated) log "node $host is $state"; echo "export SLURM_CONF=$conf"; exit 0 ;;
  esac
  sleep 1
done
log "the node did not become idle; see $dir/log"
exit 1

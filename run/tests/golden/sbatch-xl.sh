#!/bin/bash
# Rendered by radit; re-render rather than edit (`radit run JOB.toml --dry-run` prints it).
#SBATCH --job-name=radit-xl
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=72
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/scratch/radit/xl/slurm-%j.out
#SBATCH --account=brics.a5k
module load brics/nccl
set -uo pipefail

# NCCL over Slingshot needs the libfabric plugin (aws-ofi-nccl): its settings (those of `module load brics/nccl`)
# are exported only when the plugin is on the library path.
radit_nccl_plugin=
IFS=: read -ra radit_lib_dirs <<< "${LD_LIBRARY_PATH:-}"
for d in "${radit_lib_dirs[@]}" /usr/lib64 /usr/lib/aarch64-linux-gnu; do
  for f in "$d"/libnccl-net*.so; do
    if [ -e "$f" ]; then radit_nccl_plugin=$f; break 2; fi
  done
done
if [ -n "$radit_nccl_plugin" ]; then
  echo "radit: NCCL libfabric plugin $radit_nccl_plugin"
  export FI_CXI_DEFAULT_CQ_SIZE=131072
  export FI_CXI_DEFAULT_TX_SIZE=2048
  export FI_CXI_DISABLE_HOST_REGISTER=1
  export FI_CXI_DISABLE_NON_INJECT_MSG_IDC=1
  export FI_CXI_RDZV_EAGER_SIZE=0
  export FI_CXI_RDZV_GET_MIN=0
  export FI_CXI_RDZV_PROTO=alt_read
  export FI_CXI_RDZV_THRESHOLD=0
  export FI_CXI_RX_MATCH_MODE=hybrid
  export FI_HMEM_CUDA_USE_GDRCOPY=1
  export FI_MR_CACHE_MONITOR=userfaultfd
  export NCCL_CROSS_NIC=1
  export NCCL_GDRCOPY_ENABLE=1
  export NCCL_MIN_NCHANNELS=4
  export NCCL_NET='AWS Libfabric'
  export NCCL_NET_FORCE_FLUSH=0
  export NCCL_NET_GDR_LEVEL=PHB
  export NCCL_SOCKET_IFNAME=hsn
else
  echo "radit: WARNING: no NCCL libfabric plugin (libnccl-net*.so) on LD_LIBRARY_PATH: NCCL falls back to TCP sockets, far slower on Slingshot; load the site's NCCL module ([launcher.slurm] modules)" >&2
fi
# The job's own environment ([launcher.slurm] env).
export NCCL_DEBUG=WARN
export RADIT_RUN_DIR=/scratch/radit/xl
# This batch step runs on the first node: it hosts the coordinator and starts one srun task per rank,
# restarting them from the last checkpoint when one fails.

# Slurm warns only this batch shell (B:USR1); pass the warning, and a preemption's TERM, on to radit, which
# tells every rank; the ranks' flags are combined at the next step boundary, every rank checkpoints at the
# same step and radit exits with 75.
forward() { kill -s "$1" "$radit_pid" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
/home/u/radit/bin/radit run /scratch/radit/xl/job.toml --in-allocation &
radit_pid=$!
# `wait` returns early when a trapped signal arrives: keep waiting until radit itself has ended.
while kill -0 "$radit_pid" 2>/dev/null; do wait "$radit_pid"; done
wait "$radit_pid"; status=$?
if [ "$status" -eq 75 ]; then
  echo "radit: checkpointed before the time limit; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"

//! Which GPU this rank drives. A rank's GPU is not its local rank: under `srun --gpus-per-task=1` (or any
//! `CUDA_VISIBLE_DEVICES` with one entry) every task sees its own GPU as ordinal 0. The ordinal is the local rank
//! modulo the number of GPUs the process can see, and ranks that would have to share a GPU are an error.

pub use radit_protocol::env::{LocalPlacement, local_placement};

/// A rank cannot be given a GPU of its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    #[error("--device cuda: this process sees no GPU (CUDA_VISIBLE_DEVICES={visible}; {vars})")]
    NoGpu { visible: String, vars: String },
    #[error(
        "--device cuda: {local_size} ranks on this node but only {gpus} GPU(s) visible (CUDA_VISIBLE_DEVICES={visible}; \
         {vars}): ranks would share a GPU; start one rank per GPU (--ntasks-per-node={gpus}) or give each task its \
         own (srun --gpus-per-task=1)"
    )]
    TooFewGpus {
        local_size: usize,
        gpus: usize,
        visible: String,
        vars: String,
    },
}

/// The CUDA ordinal of the GPU a rank placed at `place` drives, among the `visible` GPUs the process can see.
pub fn cuda_ordinal(place: &LocalPlacement, visible: usize) -> Result<usize, PlacementError> {
    let shown = || {
        place
            .visible_devices
            .clone()
            .unwrap_or_else(|| "unset".into())
    };
    if visible == 0 {
        return Err(PlacementError::NoGpu {
            visible: shown(),
            vars: place.source.clone(),
        });
    }
    if let Some(local_size) = place.local_size
        && local_size > visible
        && !place.per_task_gpus
    {
        return Err(PlacementError::TooFewGpus {
            local_size,
            gpus: visible,
            visible: shown(),
            vars: place.source.clone(),
        });
    }
    Ok(place.local_rank % visible)
}

#[cfg(test)]
mod tests {
    use super::*;
    use radit_testkit::env;

    fn ordinal(pairs: &[(&str, &str)], visible: usize) -> Result<usize, PlacementError> {
        cuda_ordinal(&local_placement(env(pairs)), visible)
    }

    #[test]
    fn srun_with_a_gpu_per_task_drives_ordinal_zero_whatever_the_local_id() {
        // What srun --ntasks-per-node=4 --gpus-per-task=1 gives task 3 of node 1 of 8.
        let task = [
            ("SLURM_PROCID", "7"),
            ("SLURM_LOCALID", "3"),
            ("SLURM_NODEID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x8)"),
            ("SLURM_GPUS_PER_TASK", "1"),
            ("CUDA_VISIBLE_DEVICES", "3"),
        ];
        assert_eq!(ordinal(&task, 1), Ok(0));
        // One visible device named in CUDA_VISIBLE_DEVICES is a per-task binding too (e.g. a site's wrapper).
        let bound = [
            ("SLURM_LOCALID", "2"),
            ("SLURM_STEP_TASKS_PER_NODE", "4"),
            ("CUDA_VISIBLE_DEVICES", "2"),
        ];
        assert_eq!(ordinal(&bound, 1), Ok(0));
    }

    #[test]
    fn srun_with_the_node_s_gpus_shared_drives_the_local_id() {
        let task = [
            ("SLURM_LOCALID", "3"),
            ("SLURM_NODEID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
            ("CUDA_VISIBLE_DEVICES", "0,1,2,3"),
        ];
        assert_eq!(ordinal(&task, 4), Ok(3));
        // Eight tasks on a node of four GPUs: an error that names what was seen.
        let crowded = [
            ("SLURM_LOCALID", "5"),
            ("SLURM_NODEID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "4,8"),
        ];
        let e = ordinal(&crowded, 4).unwrap_err();
        assert!(
            matches!(
                e,
                PlacementError::TooFewGpus {
                    local_size: 8,
                    gpus: 4,
                    ..
                }
            ),
            "{e}"
        );
        let shown = e.to_string();
        assert!(
            shown.contains("SLURM_LOCALID=5") && shown.contains("4,8"),
            "{shown}"
        );
    }

    #[test]
    fn mpirun_uses_openmpi_s_local_rank_even_inside_a_slurm_allocation() {
        let rank = [
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
            // The batch step's variables, inherited by mpirun's ranks.
            ("SLURM_LOCALID", "0"),
            ("SLURM_TASKS_PER_NODE", "1"),
        ];
        assert_eq!(ordinal(&rank, 4), Ok(2));
        let crowded = [
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ];
        assert!(matches!(
            ordinal(&crowded, 1),
            Err(PlacementError::TooFewGpus { .. })
        ));
    }

    #[test]
    fn radit_s_local_launcher_and_torchrun_and_no_launcher() {
        let local = [("RADIT_LOCAL_RANK", "1"), ("RADIT_WORLD", "2")];
        assert_eq!(ordinal(&local, 2), Ok(1));
        assert!(matches!(
            ordinal(&local, 1),
            Err(PlacementError::TooFewGpus { .. })
        ));
        let torchrun = [("LOCAL_RANK", "5"), ("LOCAL_WORLD_SIZE", "8")];
        assert_eq!(ordinal(&torchrun, 8), Ok(5));
        assert_eq!(ordinal(&[], 1), Ok(0));
        assert_eq!(ordinal(&[], 4), Ok(0));
        let e = ordinal(&[("CUDA_VISIBLE_DEVICES", "")], 0).unwrap_err();
        assert!(matches!(e, PlacementError::NoGpu { .. }), "{e}");
    }
}

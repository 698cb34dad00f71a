//! Which GPU this rank drives. A rank's GPU is not its local rank: under `srun --gpus-per-task=1` (or any
//! `CUDA_VISIBLE_DEVICES` with one entry) every task sees its own GPU as ordinal 0. The ordinal is the local rank
//! modulo the number of GPUs the process can see, and ranks that would have to share a GPU are an error.

/// This process's place on its node, from whichever launcher started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPlacement {
    pub local_rank: usize,
    /// Ranks on this node, when the launcher says.
    pub local_size: Option<usize>,
    /// The variables it was read from (for error messages), e.g. `SLURM_LOCALID=3`.
    pub source: String,
    /// The launcher gave this task GPUs of its own (`srun --gpus-per-task`, or one visible device named in
    /// `CUDA_VISIBLE_DEVICES`), so fewer visible GPUs than local ranks is expected.
    pub per_task_gpus: bool,
    /// `CUDA_VISIBLE_DEVICES` as the process saw it.
    pub visible_devices: Option<String>,
}

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

/// Slurm's per-node task counts (`SLURM_STEP_TASKS_PER_NODE`, e.g. `4(x8),2`), expanded to one entry per node.
fn tasks_per_node(spec: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        match part.split_once("(x") {
            Some((n, times)) => {
                let (n, times): (usize, usize) =
                    (n.parse().ok()?, times.strip_suffix(')')?.parse().ok()?);
                out.extend(std::iter::repeat_n(n, times));
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Reads the local rank and the number of ranks on this node from the launcher's variables: OpenMPI
/// (`OMPI_COMM_WORLD_LOCAL_RANK`/`_LOCAL_SIZE`), Slurm (`SLURM_LOCALID`, `SLURM_STEP_TASKS_PER_NODE` at
/// `SLURM_NODEID`), radit's local launcher (`RADIT_LOCAL_RANK`, every rank on one machine) or torchrun
/// (`LOCAL_RANK`, `LOCAL_WORLD_SIZE`). OpenMPI first: mpirun inside a Slurm allocation also sees the batch step's
/// Slurm variables. A process no launcher started is local rank 0 of 1.
pub fn local_placement(var: impl Fn(&str) -> Option<String>) -> LocalPlacement {
    let num = |name: &str| var(name).and_then(|v| v.trim().parse::<usize>().ok());
    let visible_devices = var("CUDA_VISIBLE_DEVICES");
    let one_visible = visible_devices
        .as_deref()
        .is_some_and(|v| !v.trim().is_empty() && !v.contains(','));
    let placed = |local_rank, local_size, source: String, per_task| LocalPlacement {
        local_rank,
        local_size,
        source,
        per_task_gpus: per_task || one_visible,
        visible_devices: visible_devices.clone(),
    };
    if let Some(r) = num("OMPI_COMM_WORLD_LOCAL_RANK") {
        let size = num("OMPI_COMM_WORLD_LOCAL_SIZE");
        return placed(
            r,
            size,
            format!("OMPI_COMM_WORLD_LOCAL_RANK={r}, OMPI_COMM_WORLD_LOCAL_SIZE={size:?}"),
            false,
        );
    }
    if let Some(r) = num("SLURM_LOCALID") {
        let spec = var("SLURM_STEP_TASKS_PER_NODE").or_else(|| var("SLURM_TASKS_PER_NODE"));
        let node = num("SLURM_NODEID").unwrap_or(0);
        let size = spec
            .as_deref()
            .and_then(tasks_per_node)
            .and_then(|v| v.get(node).copied());
        let per_task = var("SLURM_GPUS_PER_TASK").is_some();
        return placed(
            r,
            size,
            format!(
                "SLURM_LOCALID={r}, SLURM_NODEID={node}, SLURM_STEP_TASKS_PER_NODE={}",
                spec.as_deref().unwrap_or("unset")
            ),
            per_task,
        );
    }
    if let Some(r) = num("RADIT_LOCAL_RANK") {
        let size = num("RADIT_WORLD");
        return placed(
            r,
            size,
            format!("RADIT_LOCAL_RANK={r}, RADIT_WORLD={size:?}"),
            false,
        );
    }
    if let Some(r) = num("LOCAL_RANK") {
        let size = num("LOCAL_WORLD_SIZE");
        return placed(
            r,
            size,
            format!("LOCAL_RANK={r}, LOCAL_WORLD_SIZE={size:?}"),
            false,
        );
    }
    placed(0, Some(1), "no launcher variables".into(), false)
}

impl LocalPlacement {
    /// The CUDA ordinal of this rank's GPU among the `visible` GPUs the process can see.
    pub fn cuda_ordinal(&self, visible: usize) -> Result<usize, PlacementError> {
        let shown = || {
            self.visible_devices
                .clone()
                .unwrap_or_else(|| "unset".into())
        };
        if visible == 0 {
            return Err(PlacementError::NoGpu {
                visible: shown(),
                vars: self.source.clone(),
            });
        }
        if let Some(local_size) = self.local_size
            && local_size > visible
            && !self.per_task_gpus
        {
            return Err(PlacementError::TooFewGpus {
                local_size,
                gpus: visible,
                visible: shown(),
                vars: self.source.clone(),
            });
        }
        Ok(self.local_rank % visible)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::env;

    fn ordinal(pairs: &[(&str, &str)], visible: usize) -> Result<usize, PlacementError> {
        local_placement(env(pairs)).cuda_ordinal(visible)
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

    #[test]
    fn slurm_task_counts_expand_per_node() {
        assert_eq!(tasks_per_node("4(x3),2"), Some(vec![4, 4, 4, 2]));
        assert_eq!(tasks_per_node("1"), Some(vec![1]));
        assert_eq!(tasks_per_node("2(x"), None);
    }
}

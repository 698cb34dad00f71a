//! How a run starts and keeps going: the job spec ([`job`]), launchers behind one trait ([`launcher`]: local
//! processes, `mpirun`, srun inside a Slurm allocation), the supervisor that hosts the coordinator and restarts
//! failed or hung generations ([`supervise`]), and Slurm itself ([`slurm`]: the Isambard-AI sbatch script, sbatch
//! submission, following the job through requeues).

pub mod job;
pub mod launcher;
pub mod report;
pub mod slurm;
pub mod supervise;

/// Who this process is in its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankIdentity {
    pub rank: usize,
    pub world: usize,
    /// Index on this node (the GPU it drives).
    pub local_rank: usize,
    pub launcher: Launcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Slurm,
    OpenMpi,
    Radit,
}

/// Reads the rank from the launcher's variables: Slurm (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`), OpenMPI
/// (`OMPI_COMM_WORLD_*`) or radit's local launcher (`RADIT_RANK`, `RADIT_WORLD`, `RADIT_LOCAL_RANK`). `None` when
/// none is set or they are inconsistent.
pub fn rank_identity(var: impl Fn(&str) -> Option<String>) -> Option<RankIdentity> {
    let num = |name: &str| var(name).and_then(|v| v.trim().parse::<usize>().ok());
    let sets = [
        (
            Launcher::Slurm,
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_LOCALID",
        ),
        (
            Launcher::OpenMpi,
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ),
        (
            Launcher::Radit,
            "RADIT_RANK",
            "RADIT_WORLD",
            "RADIT_LOCAL_RANK",
        ),
    ];
    sets.iter().find_map(|&(launcher, r, w, l)| {
        let (rank, world) = (num(r)?, num(w)?);
        (rank < world).then(|| RankIdentity {
            rank,
            world,
            local_rank: num(l).unwrap_or(0),
            launcher,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_rank_comes_from_whichever_launcher_started_the_process() {
        let slurm = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "32"),
            ("SLURM_LOCALID", "1"),
        ]);
        assert_eq!(
            rank_identity(slurm),
            Some(RankIdentity {
                rank: 5,
                world: 32,
                local_rank: 1,
                launcher: Launcher::Slurm
            })
        );
        let ompi = env(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4")]);
        assert_eq!(
            rank_identity(ompi).map(|r| (r.rank, r.world, r.launcher)),
            Some((2, 4, Launcher::OpenMpi))
        );
        assert_eq!(
            rank_identity(env(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")])),
            None
        );
        assert_eq!(rank_identity(env(&[])), None);
    }
}

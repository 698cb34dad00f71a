//! The environment contract between `radit run` (the supervisor), the launchers and the ranks: the variables the
//! supervisor sets for every rank, those radit's own local launcher sets, and how a rank reads who it is from
//! whichever launcher started it (Slurm, OpenMPI or radit's) and where it sits on its node; hostname and pid records.

/// The exit code with which a rank (and `radit run`, and the batch script) says "checkpointed, please requeue
/// me": the sbatch script requeues on it, the supervisor reads it from every rank.
pub const REQUEUE_EXIT_CODE: i32 = 75;

/// `IP:PORT` of the coordinator.
pub const COORDINATOR: &str = "RADIT_COORDINATOR";
/// Path of the 0600 file that holds the job token (also read by the tasks of a plain srun step, as the secret of
/// their TCP group: required there, since anything else would be known to every user of the cluster).
pub const TOKEN_FILE: &str = "RADIT_JOB_TOKEN_FILE";
/// `1`: a plain srun step without [`TOKEN_FILE`] derives its group's secret from the job and step ids, as radit
/// once did. Those are public, so any user of the cluster could join the group: an explicit opt-in only.
pub const ALLOW_DERIVED_SECRET: &str = "RADIT_ALLOW_DERIVED_SECRET";
pub const GENERATION: &str = "RADIT_GENERATION";
/// Path of the job's coordinator certificate authority (PEM) when the coordinator serves HTTPS, and the SHA-256 of
/// that certificate (hex), which the rank checks before trusting the file.
pub const COORDINATOR_CA: &str = "RADIT_COORDINATOR_CA";
pub const COORDINATOR_CA_SHA256: &str = "RADIT_COORDINATOR_CA_SHA256";
/// Seconds without the coordinator after which a rank checkpoints and exits with the requeue code.
pub const COORDINATOR_GRACE: &str = "RADIT_COORDINATOR_GRACE_SECONDS";
/// Seconds a rank group waits for every rank while it forms, and for a peer in each collective after that.
pub const COLLECTIVE_RENDEZVOUS: &str = "RADIT_COLLECTIVE_RENDEZVOUS_SECONDS";
pub const COLLECTIVE_TIMEOUT: &str = "RADIT_COLLECTIVE_TIMEOUT_SECONDS";
/// Where ranks keep their pid files, so a restarted supervisor can wait for orphans of a killed one.
pub const PID_DIR: &str = "RADIT_PID_DIR";

/// Override the address and port at which the tasks of a plain srun step meet (the default is the step's first
/// node, as its name resolves, and a port derived from the job and step ids).
pub const MASTER_ADDR: &str = "RADIT_MASTER_ADDR";
pub const MASTER_PORT: &str = "RADIT_MASTER_PORT";

/// The rank radit's local launcher gives each process, the world size, and the process's index on its node.
pub const RANK: &str = "RADIT_RANK";
pub const WORLD: &str = "RADIT_WORLD";
pub const LOCAL_RANK: &str = "RADIT_LOCAL_RANK";

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
    // Launchers that name the local rank and the ranks per node directly.
    let direct = |rank_var: &str, size_var: &str| {
        let r = num(rank_var)?;
        let size = num(size_var);
        let shown = size.map_or_else(|| "unset".to_string(), |n| n.to_string());
        Some(placed(
            r,
            size,
            format!("{rank_var}={r}, {size_var}={shown}"),
            false,
        ))
    };
    let slurm = || {
        let r = num("SLURM_LOCALID")?;
        let spec = var("SLURM_STEP_TASKS_PER_NODE").or_else(|| var("SLURM_TASKS_PER_NODE"));
        let node = num("SLURM_NODEID").unwrap_or(0);
        let size = spec
            .as_deref()
            .and_then(tasks_per_node)
            .and_then(|v| v.get(node).copied());
        Some(placed(
            r,
            size,
            format!(
                "SLURM_LOCALID={r}, SLURM_NODEID={node}, SLURM_STEP_TASKS_PER_NODE={}",
                spec.as_deref().unwrap_or("unset")
            ),
            var("SLURM_GPUS_PER_TASK").is_some(),
        ))
    };
    direct("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
        .or_else(slurm)
        .or_else(|| direct(LOCAL_RANK, WORLD))
        .or_else(|| direct("LOCAL_RANK", "LOCAL_WORLD_SIZE"))
        .unwrap_or_else(|| placed(0, Some(1), "no launcher variables".into(), false))
}

/// This machine's name (the kernel's), if it can be read.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn this_host() -> String {
    hostname().unwrap_or_default()
}

/// A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), which tells a reused pid apart.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// What a rank writes into its pid file in `PID_DIR`: host, pid, start time, so that a restarted supervisor waits
/// only for ranks of its own node, and a reused pid does not pass for a rank.
pub fn pid_record(pid: u32) -> String {
    format!("{} {pid} {}", this_host(), start_time(pid).unwrap_or(0))
}

/// Whether the process a pid record names is still running on this host (records of other hosts: no, their
/// allocation is gone with their job).
pub fn still_running(record: &str) -> Option<u32> {
    let mut f = record.split_whitespace();
    let (host, pid, started) = (f.next()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?);
    (host == this_host() && start_time(pid) == Some(started)).then_some(pid)
}

/// Who this process is in its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankIdentity {
    pub rank: usize,
    pub world: usize,
    pub launcher: Launcher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    Slurm,
    OpenMpi,
    Radit,
}

/// Reads the rank from the launcher's variables: Slurm (`SLURM_PROCID`, `SLURM_NTASKS`), OpenMPI
/// (`OMPI_COMM_WORLD_RANK`/`_SIZE`) or radit's local launcher (`RADIT_RANK`, `RADIT_WORLD`). `None` when none is
/// set or they are inconsistent. The place on the node is [`local_placement`]'s.
pub fn rank_identity(var: impl Fn(&str) -> Option<String>) -> Option<RankIdentity> {
    let num = |name: &str| var(name).and_then(|v| v.trim().parse::<usize>().ok());
    let sets = [
        (Launcher::Slurm, "SLURM_PROCID", "SLURM_NTASKS"),
        (
            Launcher::OpenMpi,
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
        ),
        (Launcher::Radit, RANK, WORLD),
    ];
    sets.iter().find_map(|&(launcher, r, w)| {
        let (rank, world) = (num(r)?, num(w)?);
        (rank < world).then_some(RankIdentity {
            rank,
            world,
            launcher,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_environment_carries_the_groups_timeouts_and_the_ca_only_when_pinned() {
        let plain = RankEnvironment {
            coordinator: "10.0.0.1:7000".into(),
            token_file: "/run/job.token".into(),
            generation: 3,
            coordinator_grace_seconds: 60.0,
            rendezvous_seconds: 1800.0,
            collective_timeout_seconds: 120.0,
            pid_dir: "/run/ranks".into(),
            ca: None,
        };
        let vars: std::collections::BTreeMap<String, String> = plain.vars().into_iter().collect();
        assert_eq!(vars[GENERATION], "3");
        assert_eq!(vars[COLLECTIVE_RENDEZVOUS], "1800");
        assert_eq!(vars[COLLECTIVE_TIMEOUT], "120");
        assert!(!vars.contains_key(COORDINATOR_CA));
        let pinned = RankEnvironment {
            ca: Some(("/run/ca.pem".into(), "ab".repeat(32))),
            ..plain
        };
        let vars: std::collections::BTreeMap<String, String> = pinned.vars().into_iter().collect();
        assert_eq!(vars[COORDINATOR_CA], "/run/ca.pem");
        assert_eq!(vars[COORDINATOR_CA_SHA256].len(), 64);
    }
    use radit_testkit::env;

    #[test]
    fn slurm_task_counts_expand_per_node() {
        assert_eq!(tasks_per_node("4(x3),2"), Some(vec![4, 4, 4, 2]));
        assert_eq!(tasks_per_node("1"), Some(vec![1]));
        assert_eq!(tasks_per_node("2(x"), None);
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

/// What `radit run` tells every rank of a generation through its environment: where the coordinator is, the job
/// token's file, the generation, how long to outlive a silent coordinator, where pid records go, and (HTTPS) the
/// certificate authority to trust and its pinned SHA-256. The rank agent reads these same variables.
#[derive(Debug, Clone, PartialEq)]
pub struct RankEnvironment {
    pub coordinator: String,
    pub token_file: String,
    pub generation: u64,
    pub coordinator_grace_seconds: f64,
    /// The rank group's rendezvous and per-collective timeouts.
    pub rendezvous_seconds: f64,
    pub collective_timeout_seconds: f64,
    pub pid_dir: String,
    /// The CA certificate's file and its SHA-256 (hex), when the coordinator serves HTTPS.
    pub ca: Option<(String, String)>,
}

impl RankEnvironment {
    /// The variables, as (name, value) pairs for a launcher.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            (COORDINATOR.into(), self.coordinator.clone()),
            (TOKEN_FILE.into(), self.token_file.clone()),
            (GENERATION.into(), self.generation.to_string()),
            (
                COORDINATOR_GRACE.into(),
                self.coordinator_grace_seconds.to_string(),
            ),
            (
                COLLECTIVE_RENDEZVOUS.into(),
                self.rendezvous_seconds.to_string(),
            ),
            (
                COLLECTIVE_TIMEOUT.into(),
                self.collective_timeout_seconds.to_string(),
            ),
            (PID_DIR.into(), self.pid_dir.clone()),
        ];
        if let Some((file, sha256)) = &self.ca {
            vars.push((COORDINATOR_CA.into(), file.clone()));
            vars.push((COORDINATOR_CA_SHA256.into(), sha256.clone()));
        }
        vars
    }
}

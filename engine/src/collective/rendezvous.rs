//! How a rank started without `radit run` finds its group: MPI when an MPI launcher (mpirun, or srun with PMI/PMIx)
//! started it; the tasks of one srun step meet over the TCP star at the step's first node (rank 0); a lone process
//! is a world of one. A process that Slurm counts as one of several tasks but that is not an srun task (the batch
//! script itself, an salloc shell) is an error: on its own it would silently train as a world of one.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::time::Duration;

use super::{Collective, CollectiveError, tcp};

use radit_protocol::env::{ALLOW_DERIVED_SECRET, MASTER_ADDR, MASTER_PORT, TOKEN_FILE};

/// The group the launcher's variables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupPlan {
    /// OpenMPI's or a PMI launcher's variables: MPI forms the group.
    Mpi,
    /// The tasks of one srun step, meeting at `host:port`.
    SlurmStep {
        rank: usize,
        world: usize,
        host: String,
        port: u16,
        /// `SLURMD_NODENAME` of this task (rank 0 must run on `host`).
        node: Option<String>,
        secret_seed: String,
    },
    /// A world of one.
    Single,
}

fn launch_error(reason: String) -> CollectiveError {
    CollectiveError::Launch { reason }
}

/// The first host of a Slurm hostlist (`nid[001234-001237,002000],gpu7` -> `nid001234`).
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let open = list.find('[');
    let comma = list.find(',');
    match open {
        // A plain first name before any bracket.
        _ if comma.is_some_and(|c| open.is_none_or(|o| c < o)) => {
            Some(list[..comma?].to_string()).filter(|h| !h.is_empty())
        }
        None => Some(list.to_string()).filter(|h| !h.is_empty()),
        Some(o) => {
            let close = o + list[o..].find(']')?;
            let first = list[o + 1..close].split(',').next()?;
            let first = first.split('-').next()?.trim();
            if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // The suffix runs to the next comma (another host) or bracket (a second dimension: not supported).
            let rest = &list[close + 1..];
            let end = rest.find([',', '[']).unwrap_or(rest.len());
            if rest[end..].starts_with('[') {
                return None;
            }
            Some(format!("{}{first}{}", &list[..o], &rest[..end]))
        }
    }
}

/// Reads the group from the launcher's variables (`var` is the process environment in production).
pub fn plan(var: impl Fn(&str) -> Option<String>) -> Result<GroupPlan, CollectiveError> {
    if super::mpi::LAUNCHER_VARS.iter().any(|v| var(v).is_some()) {
        return Ok(GroupPlan::Mpi);
    }
    let num = |name: &str| var(name).and_then(|v| v.trim().parse::<usize>().ok());
    let seen = |names: &[&str]| {
        names
            .iter()
            .map(|n| format!("{n}={}", var(n).unwrap_or_else(|| "unset".into())))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let step_vars = [
        "SLURM_PROCID",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_NTASKS",
        "SLURM_STEP_ID",
        "SLURM_STEP_NODELIST",
        "SLURM_JOB_ID",
    ];
    match num("SLURM_STEP_NUM_TASKS") {
        Some(world) if world > 1 => {
            let rank = num("SLURM_PROCID").filter(|r| *r < world).ok_or_else(|| {
                launch_error(format!(
                    "an srun task of {world} without a valid rank ({})",
                    seen(&step_vars)
                ))
            })?;
            let (job, step) = (var("SLURM_JOB_ID"), var("SLURM_STEP_ID"));
            let host = match var(MASTER_ADDR) {
                Some(a) => a,
                None => var("SLURM_STEP_NODELIST")
                    .as_deref()
                    .and_then(first_host)
                    .ok_or_else(|| {
                        launch_error(format!(
                            "cannot tell the srun step's first node from SLURM_STEP_NODELIST ({}); set {MASTER_ADDR}",
                            seen(&step_vars)
                        ))
                    })?,
            };
            let port = match var(MASTER_PORT) {
                Some(p) => p.trim().parse::<u16>().map_err(|_| {
                    launch_error(format!("{MASTER_PORT}=`{p}` is not a port number"))
                })?,
                // Below Linux's ephemeral range, so that it does not collide with outgoing connections; steps
                // of one job (and jobs) on the same node get different ports.
                None => {
                    let (j, s) = (
                        num("SLURM_JOB_ID").unwrap_or(0),
                        num("SLURM_STEP_ID").unwrap_or(0),
                    );
                    10_000 + ((j.wrapping_mul(64).wrapping_add(s)) % 20_000) as u16
                }
            };
            Ok(GroupPlan::SlurmStep {
                rank,
                world,
                host,
                port,
                node: var("SLURMD_NODENAME"),
                secret_seed: format!(
                    "slurm job {} step {} uid {}",
                    job.unwrap_or_default(),
                    step.unwrap_or_default(),
                    var("SLURM_JOB_UID").unwrap_or_default()
                ),
            })
        }
        Some(_) => Ok(GroupPlan::Single),
        None => match num("SLURM_NTASKS") {
            Some(n) if n > 1 => Err(launch_error(format!(
                "Slurm counts {n} tasks but this process is not an srun task ({}): alone it would train as a \
                 world of one; start the ranks with `srun radit train ...` (or `radit run JOB.toml`)",
                seen(&step_vars)
            ))),
            _ => Ok(GroupPlan::Single),
        },
    }
}

/// The secret of a plain srun step's group: the token in the file `RADIT_JOB_TOKEN_FILE` names, or (only with
/// `RADIT_ALLOW_DERIVED_SECRET=1`) one derived from the step's public ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepSecret {
    File(String),
    DerivedByOptIn,
    Missing,
}

impl StepSecret {
    /// From the two variables, as the environment gave them.
    pub fn from_vars(token_file: Option<String>, allow_derived: Option<String>) -> Self {
        match (token_file, allow_derived.as_deref().map(str::trim)) {
            (Some(path), _) => StepSecret::File(path),
            (None, Some("1" | "true")) => StepSecret::DerivedByOptIn,
            (None, _) => StepSecret::Missing,
        }
    }
}

/// The TCP star of a Slurm step: rank 0 listens at `host:port`, the others connect to it.
pub fn join_slurm_step(
    plan: &GroupPlan,
    timeout: Duration,
    step_secret: StepSecret,
) -> Result<Box<dyn Collective>, CollectiveError> {
    let GroupPlan::SlurmStep {
        rank,
        world,
        host,
        port,
        node,
        secret_seed,
    } = plan
    else {
        return Err(launch_error(format!("not a Slurm step: {plan:?}")));
    };
    let secret = match step_secret {
        StepSecret::File(path) => std::fs::read_to_string(&path)
            .map(|t| tcp::group_secret(t.trim()))
            .map_err(|e| launch_error(format!("{TOKEN_FILE}={path}: {e}")))?,
        StepSecret::DerivedByOptIn => {
            tracing::warn!(
                "{ALLOW_DERIVED_SECRET}=1: the group's secret comes from the step's public ids, so any user of \
                 the cluster can join it"
            );
            tcp::group_secret(secret_seed)
        }
        StepSecret::Missing => {
            return Err(launch_error(format!(
                "the {world} tasks of this srun step need a shared secret, or any user of the cluster could join \
                 their group: make a token file only you can read on a filesystem every node sees, e.g. `umask \
                 077; head -c 32 /dev/urandom | base64 > ~/.radit-token-$SLURM_JOB_ID`, and pass \
                 {TOKEN_FILE}=<that file> to the tasks (or run the job with `radit run`, which makes one); \
                 {ALLOW_DERIVED_SECRET}=1 keeps the old secret derived from the public job ids"
            )));
        }
    };
    let addr: SocketAddr = (host.as_str(), *port)
        .to_socket_addrs()
        .map_err(|e| launch_error(format!("resolving the step's first node `{host}`: {e}")))?
        // IPv4 first: a name with both usually means the same interface, and v4 is what clusters route.
        .min_by_key(|a| a.is_ipv6())
        .ok_or_else(|| launch_error(format!("`{host}` resolves to no address")))?;
    tracing::info!(rank, world, %addr, "forming the srun step's group");
    if *rank == 0 {
        let listener = TcpListener::bind(addr).map_err(|e| {
            launch_error(format!(
                "rank 0 (on {}) cannot listen on {addr} (the step's first node `{host}`): {e}; set {MASTER_ADDR} \
                 or {MASTER_PORT}",
                node.as_deref().unwrap_or("an unknown node")
            ))
        })?;
        Ok(Box::new(tcp::TcpCollective::hub(
            listener, *world, timeout, &secret,
        )?))
    } else {
        Ok(Box::new(tcp::TcpCollective::spoke(
            *rank, *world, addr, timeout, &secret,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use radit_testkit::env;

    #[test]
    fn hostlists_give_their_first_host() {
        assert_eq!(first_host("vm").as_deref(), Some("vm"));
        assert_eq!(
            first_host("nid[001234-001237,002000],gpu7").as_deref(),
            Some("nid001234")
        );
        assert_eq!(first_host("gpu7,nid[1-2]").as_deref(), Some("gpu7"));
        assert_eq!(
            first_host("rack1-[3,5-7]-ib").as_deref(),
            Some("rack1-3-ib")
        );
        assert_eq!(first_host("a[1-2]b[3-4]"), None);
        assert_eq!(first_host(""), None);
        assert_eq!(first_host("x[]"), None);
    }

    #[test]
    fn an_srun_task_meets_its_step_at_the_first_node() {
        let task = [
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_STEP_ID", "2"),
            ("SLURM_JOB_ID", "4711"),
            ("SLURM_STEP_NODELIST", "nid[0010-0011]"),
            ("SLURMD_NODENAME", "nid0011"),
        ];
        let GroupPlan::SlurmStep {
            rank,
            world,
            host,
            port,
            ..
        } = plan(env(&task)).unwrap()
        else {
            panic!("expected a Slurm step")
        };
        assert_eq!((rank, world, host.as_str()), (3, 8, "nid0010"));
        assert_eq!(port, 10_000 + ((4711 * 64 + 2) % 20_000) as u16);
        let mut moved = task.to_vec();
        moved.extend([(MASTER_ADDR, "10.1.2.3"), (MASTER_PORT, "29500")]);
        assert!(matches!(
            plan(env(&moved)).unwrap(),
            GroupPlan::SlurmStep { ref host, port: 29500, .. } if host == "10.1.2.3"
        ));
        let mut bad = task.to_vec();
        bad.push((MASTER_PORT, "many"));
        let e = plan(env(&bad)).unwrap_err();
        assert!(e.to_string().contains("RADIT_MASTER_PORT"), "{e}");
    }

    #[test]
    fn the_batch_script_of_a_multi_task_job_is_not_silently_a_world_of_one() {
        // What sbatch -n2 gives the batch script (no SLURM_STEP_* variables).
        let batch = [
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_JOB_ID", "2"),
            ("SLURM_LOCALID", "0"),
        ];
        let e = plan(env(&batch)).unwrap_err().to_string();
        assert!(
            e.contains("SLURM_NTASKS=2") && e.contains("SLURM_STEP_NUM_TASKS=unset"),
            "{e}"
        );
        assert!(e.contains("srun radit train"), "{e}");
        // A task whose rank is outside its step is named too.
        let odd = [("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_PROCID", "2")];
        assert!(
            plan(env(&odd))
                .unwrap_err()
                .to_string()
                .contains("SLURM_PROCID=2")
        );
    }

    #[test]
    fn mpi_single_tasks_and_no_launcher() {
        assert_eq!(
            plan(env(&[("OMPI_COMM_WORLD_SIZE", "4"), ("SLURM_NTASKS", "4")])).unwrap(),
            GroupPlan::Mpi
        );
        assert_eq!(plan(env(&[("PMIX_RANK", "0")])).unwrap(), GroupPlan::Mpi);
        assert_eq!(
            plan(env(&[("SLURM_STEP_NUM_TASKS", "1"), ("SLURM_PROCID", "0")])).unwrap(),
            GroupPlan::Single
        );
        assert_eq!(
            plan(env(&[("SLURM_NTASKS", "1")])).unwrap(),
            GroupPlan::Single
        );
        assert_eq!(plan(env(&[])).unwrap(), GroupPlan::Single);
    }

    #[test]
    fn the_tasks_of_a_step_form_a_tcp_group_on_loopback() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let task = |rank: &str| {
            let vars = [
                ("SLURM_PROCID", rank.to_string()),
                ("SLURM_STEP_NUM_TASKS", "2".into()),
                ("SLURM_STEP_NODELIST", "localhost".into()),
                (MASTER_ADDR, "127.0.0.1".into()),
                (MASTER_PORT, port.to_string()),
            ];
            let owned: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            plan(env(&owned)).unwrap()
        };
        let (p0, p1) = (task("0"), task("1"));
        // Without a token file the step is refused, saying how to make one.
        let e = join_slurm_step(&p0, Duration::from_secs(30), StepSecret::Missing)
            .err()
            .unwrap();
        assert!(e.to_string().contains(TOKEN_FILE), "{e}");
        assert_eq!(
            StepSecret::from_vars(None, Some("1".into())),
            StepSecret::DerivedByOptIn
        );
        assert_eq!(StepSecret::from_vars(None, None), StepSecret::Missing);
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "a shared secret\n").unwrap();
        let secret = StepSecret::File(token.display().to_string());
        let theirs = secret.clone();
        let spoke = std::thread::spawn(move || {
            let comm = join_slurm_step(&p1, Duration::from_secs(30), theirs).unwrap();
            crate::collective::conformance::run(comm.as_ref(), tch::Device::Cpu)
        });
        let hub = join_slurm_step(&p0, Duration::from_secs(30), secret).unwrap();
        assert_eq!((hub.rank(), hub.world()), (0, 2));
        crate::collective::conformance::run(hub.as_ref(), tch::Device::Cpu).unwrap();
        spoke.join().unwrap().unwrap();
    }
}

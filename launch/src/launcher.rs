//! Starting one generation of rank processes, behind one trait: here ([`LocalLauncher`]), under `mpirun`
//! ([`MpirunLauncher`]) or as srun tasks inside a Slurm allocation ([`SrunLauncher`]). The supervisor does not know
//! which: it starts a group, polls it, signals it and kills it.

use radit_protocol::env;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};

/// What every rank of a generation runs.
#[derive(Debug, Clone)]
pub struct RankCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Added to every rank's environment (coordinator address, token file, generation).
    pub env: Vec<(String, String)>,
    pub world: u32,
    /// Where each process's stdout and stderr go (one file per process).
    pub log_dir: PathBuf,
}

/// How one process of a group ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

impl Ended {
    fn from(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => Ended::Code(c),
            (None, Some(s)) => Ended::Signal(s),
            _ => Ended::Code(-1),
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Code(c) => write!(f, "exit code {c}"),
            Ended::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// The state of a running group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupState {
    Running,
    /// Process `index` (the rank, for launchers that start one process per rank) ended badly while others run.
    Failed {
        index: usize,
        ended: Ended,
    },
    /// Every process has ended.
    Ended(Vec<Ended>),
}

/// One generation of rank processes.
pub trait RankGroup: Send {
    fn poll(&mut self) -> std::io::Result<GroupState>;
    /// Sends `signal` to every process (the launcher passes it on to its ranks).
    fn signal(&mut self, signal: i32);
    /// Kills every process and reaps them.
    fn kill(&mut self);
    /// The pids this group started (for the logs and the tests' fault injection).
    fn pids(&self) -> Vec<u32>;
}

/// Starts rank groups.
pub trait Launcher: Send + Sync {
    fn name(&self) -> &'static str;
    fn start(&self, cmd: &RankCommand, generation: u64) -> std::io::Result<Box<dyn RankGroup>>;
    /// Whether the group's process `i` is rank `i` (local processes), rather than one launcher process standing
    /// for every rank (mpirun, srun): how the supervisor names a process that ended.
    fn process_per_rank(&self) -> bool {
        false
    }
}

/// How a group is killed.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGKILL to each process's own process group: the process and everything it started (mpirun's ranks).
    KillGroups,
    /// SIGINT `times` in a row, which makes the launcher kill its ranks wherever they run (mpirun: TERM then KILL
    /// to every rank, which sit in process groups of their own; srun: twice within a second kills every task of
    /// the step), then SIGKILL to its process group if it has not ended after a grace period.
    Interrupt { times: u8 },
}

/// Processes started by one launcher, watched together. Each leads its own process group, so a kill reaches what
/// it started and a Ctrl-C at the terminal reaches only the supervisor (which turns it into a checkpoint).
struct Processes {
    children: Vec<Child>,
    ended: Vec<Option<Ended>>,
    stop: Stop,
}

fn send(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid we started and still own (not yet reaped).
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn send_group(leader: u32, signal: i32) {
    // SAFETY: kill(2) on the process group this launcher created (its leader is our child, not yet reaped).
    unsafe {
        libc::kill(-(leader as libc::pid_t), signal);
    }
}

impl Processes {
    fn spawn(
        cmds: Vec<Command>,
        log_dir: &std::path::Path,
        generation: u64,
        stop: Stop,
    ) -> std::io::Result<Self> {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(log_dir)?;
        let mut children = Vec::new();
        for (i, mut c) in cmds.into_iter().enumerate() {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_dir.join(format!("gen-{generation}-process-{i}.log")))?;
            c.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0);
            match c.spawn() {
                Ok(child) => children.push(child),
                Err(e) => {
                    for mut ch in children {
                        let _ = ch.kill();
                        let _ = ch.wait();
                    }
                    return Err(e);
                }
            }
        }
        let n = children.len();
        Ok(Self {
            children,
            ended: vec![None; n],
            stop,
        })
    }
}

impl RankGroup for Processes {
    fn poll(&mut self) -> std::io::Result<GroupState> {
        for (i, c) in self.children.iter_mut().enumerate() {
            if self.ended[i].is_none()
                && let Some(status) = c.try_wait()?
            {
                self.ended[i] = Some(Ended::from(status));
            }
        }
        // 0 is success and 75 is "checkpointed, requeue me": both are orderly; anything else is a failure.
        if let Some((index, ended)) = self.ended.iter().enumerate().find_map(|(i, e)| match e {
            Some(Ended::Code(0 | radit_protocol::REQUEUE_EXIT_CODE)) | None => None,
            Some(e) => Some((i, *e)),
        }) && self.ended.iter().any(Option::is_none)
        {
            return Ok(GroupState::Failed { index, ended });
        }
        if self.ended.iter().all(Option::is_some) {
            return Ok(GroupState::Ended(
                self.ended.iter().flatten().copied().collect(),
            ));
        }
        Ok(GroupState::Running)
    }

    fn signal(&mut self, signal: i32) {
        for (i, c) in self.children.iter().enumerate() {
            if self.ended[i].is_none() {
                send(c.id(), signal);
            }
        }
    }

    fn kill(&mut self) {
        if let Stop::Interrupt { times } = self.stop {
            for (i, c) in self.children.iter().enumerate() {
                for k in 0..times {
                    if self.ended[i].is_none() {
                        if k > 0 {
                            std::thread::sleep(std::time::Duration::from_millis(200));
                        }
                        send(c.id(), libc::SIGINT);
                    }
                }
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while std::time::Instant::now() < deadline && self.ended.iter().any(Option::is_none) {
                let _ = self.poll();
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        for (i, c) in self.children.iter_mut().enumerate() {
            if self.ended[i].is_none() {
                // The whole process group: the process and whatever it started.
                send_group(c.id(), libc::SIGKILL);
                if let Ok(status) = c.wait() {
                    self.ended[i] = Some(Ended::from(status));
                }
            }
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // A supervisor that returns early (an error) must not leave ranks behind.
        self.kill();
    }
}

/// A launcher process that starts and stops the ranks itself (mpirun, srun), stopped with `interrupts` SIGINTs.
fn one_process(
    launcher: Command,
    cmd: &RankCommand,
    generation: u64,
    interrupts: u8,
) -> std::io::Result<Box<dyn RankGroup>> {
    Ok(Box::new(Processes::spawn(
        vec![launcher],
        &cmd.log_dir,
        generation,
        Stop::Interrupt { times: interrupts },
    )?))
}

fn base_command(cmd: &RankCommand, program: &std::path::Path) -> Command {
    let mut c = Command::new(program);
    c.envs(cmd.env.iter().map(|(k, v)| (k, v)));
    c
}

/// `world` rank processes on this machine; each learns its rank from `RADIT_RANK`.
pub struct LocalLauncher;

impl Launcher for LocalLauncher {
    fn name(&self) -> &'static str {
        "local"
    }

    fn process_per_rank(&self) -> bool {
        true
    }

    fn start(&self, cmd: &RankCommand, generation: u64) -> std::io::Result<Box<dyn RankGroup>> {
        let cmds = (0..cmd.world)
            .map(|r| {
                let mut c = base_command(cmd, &cmd.program);
                c.args(&cmd.args)
                    .env(env::RANK, r.to_string())
                    .env(env::WORLD, cmd.world.to_string())
                    .env(env::LOCAL_RANK, r.to_string());
                c
            })
            .collect();
        Ok(Box::new(Processes::spawn(
            cmds,
            &cmd.log_dir,
            generation,
            Stop::KillGroups,
        )?))
    }
}

/// One `mpirun -np WORLD` (OpenMPI kills the other ranks when one fails and reports it in its exit code; it
/// forwards USR1 and TERM to the ranks).
pub struct MpirunLauncher {
    pub extra_args: Vec<String>,
}

impl MpirunLauncher {
    pub fn command(&self, cmd: &RankCommand) -> Command {
        let mut c = base_command(cmd, std::path::Path::new("mpirun"));
        c.arg("-np").arg(cmd.world.to_string());
        for (k, _) in &cmd.env {
            c.arg("-x").arg(k);
        }
        c.args(&self.extra_args).arg(&cmd.program).args(&cmd.args);
        c
    }
}

impl Launcher for MpirunLauncher {
    fn name(&self) -> &'static str {
        "mpirun"
    }

    fn start(&self, cmd: &RankCommand, generation: u64) -> std::io::Result<Box<dyn RankGroup>> {
        one_process(self.command(cmd), cmd, generation, 1)
    }
}

/// One `srun` step over the allocation, one task per rank (`--kill-on-bad-exit` ends the step when a rank dies;
/// srun forwards USR1 and TERM to the tasks).
pub struct SrunLauncher {
    pub tasks_per_node: u32,
    pub gpus_per_task: u32,
    /// Passed to srun: since Slurm 22.05 a step no longer inherits the batch job's `--cpus-per-task`.
    pub cpus_per_task: u32,
}

impl SrunLauncher {
    pub fn command(&self, cmd: &RankCommand) -> Command {
        let mut c = base_command(cmd, std::path::Path::new("srun"));
        // --kill-on-bad-exit ends the step as soon as one rank fails. srun also counts the requeue code 75 as bad
        // and kills the slower ranks once the first has left; by then the checkpoint is committed (the commit is
        // collective), and the supervisor tells an orderly stop from the ranks' last heartbeats, not srun's code.
        c.arg("--kill-on-bad-exit=1")
            .arg("--cpu-bind=none")
            .arg(format!("--ntasks={}", cmd.world))
            .arg(format!("--ntasks-per-node={}", self.tasks_per_node))
            .arg(format!("--cpus-per-task={}", self.cpus_per_task));
        if self.gpus_per_task > 0 {
            c.arg(format!("--gpus-per-task={}", self.gpus_per_task));
        }
        c.arg(&cmd.program).args(&cmd.args);
        c
    }
}

impl Launcher for SrunLauncher {
    fn name(&self) -> &'static str {
        "srun"
    }

    fn start(&self, cmd: &RankCommand, generation: u64) -> std::io::Result<Box<dyn RankGroup>> {
        one_process(self.command(cmd), cmd, generation, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srun_gets_a_gpu_per_task_and_the_cpus_per_task_itself() {
        let cmd = RankCommand {
            program: "/opt/radit".into(),
            args: vec!["train".into()],
            env: Vec::new(),
            world: 32,
            log_dir: "/tmp/logs".into(),
        };
        let srun = SrunLauncher {
            tasks_per_node: 4,
            gpus_per_task: 1,
            cpus_per_task: 72,
        }
        .command(&cmd);
        let args: Vec<String> = srun
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for want in [
            "--ntasks=32",
            "--ntasks-per-node=4",
            "--cpus-per-task=72",
            "--gpus-per-task=1",
        ] {
            assert!(args.iter().any(|a| a == want), "{want}: {args:?}");
        }
        // The rank program comes after srun's own options.
        let program = args.iter().position(|a| a == "/opt/radit").unwrap();
        assert!(
            args[..program].iter().all(|a| a.starts_with("--")),
            "{args:?}"
        );
    }
}

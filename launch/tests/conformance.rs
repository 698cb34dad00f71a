//! One conformance suite for every launcher: a group of shell "ranks" that succeed, fail, take a signal, or are
//! killed, started by the local launcher, by real `mpirun`, and by real `srun` on the single-host Slurm of
//! scripts/slurm-local.sh.

use std::path::Path;
use std::time::{Duration, Instant};

use radit_launch::launcher::{
    Ended, GroupState, Launcher, LocalLauncher, MpirunLauncher, RankCommand, SrunLauncher,
};

/// `script` on `world` ranks, with `env` added to the launcher's environment (and so the ranks').
fn command(dir: &Path, script: &str, world: u32, env: &[(String, String)]) -> RankCommand {
    let mut all = vec![("READY_DIR".into(), dir.display().to_string())];
    all.extend_from_slice(env);
    RankCommand {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: all,
        world,
        log_dir: dir.join("logs"),
    }
}

fn wait_end(group: &mut dyn radit_launch::launcher::RankGroup) -> GroupState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match group.poll().unwrap() {
            GroupState::Running => {}
            other => return other,
        }
        assert!(Instant::now() < deadline, "the group did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_ready(dir: &Path, world: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ready-"))
        .count()
        < world
    {
        assert!(Instant::now() < deadline, "the ranks did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The suite. `per_process` launchers report each rank; the others (mpirun, srun) one process for the group.
/// `env`: what the launcher itself needs (Slurm's config), passed through the command, never set on this process
/// (other tests spawn processes meanwhile).
fn conformance(launcher: &dyn Launcher, per_process: bool, env: &[(String, String)]) {
    let world = 2u32;
    let processes = if per_process { world as usize } else { 1 };

    let dir = tempfile::tempdir().unwrap();
    let mut g = launcher
        .start(&command(dir.path(), "exit 0", world, env), 1)
        .unwrap();
    assert_eq!(
        wait_end(g.as_mut()),
        GroupState::Ended(vec![Ended::Code(0); processes]),
        "{}: all succeed",
        launcher.name()
    );

    // One rank fails while the other keeps running: reported as a failure (with the rank where visible).
    let dir = tempfile::tempdir().unwrap();
    let script = "if [ \"${RADIT_RANK:-${OMPI_COMM_WORLD_RANK:-$SLURM_PROCID}}\" = 1 ]; then exit 3; fi; sleep 30";
    let mut g = launcher
        .start(&command(dir.path(), script, world, env), 1)
        .unwrap();
    let started = Instant::now();
    match wait_end(g.as_mut()) {
        GroupState::Failed { index, ended } => {
            assert_eq!((index, ended), (1, Ended::Code(3)), "{}", launcher.name());
        }
        GroupState::Ended(e) => assert!(
            !per_process && e.len() == 1 && e[0] != Ended::Code(0),
            "{}: {e:?}",
            launcher.name()
        ),
        GroupState::Running => unreachable!(),
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{}: the failure was not seen early",
        launcher.name()
    );
    g.kill();

    // USR1 reaches every rank (this is how the time-limit warning and preemption travel).
    let dir = tempfile::tempdir().unwrap();
    let script =
        "trap 'exit 75' USR1; touch \"$READY_DIR/ready-$$\"; while true; do sleep 0.05; done";
    let mut g = launcher
        .start(&command(dir.path(), script, world, env), 1)
        .unwrap();
    wait_ready(dir.path(), world as usize);
    g.signal(libc::SIGUSR1);
    assert_eq!(
        wait_end(g.as_mut()),
        GroupState::Ended(vec![Ended::Code(75); processes]),
        "{}: USR1 reaches the ranks",
        launcher.name()
    );

    // kill() ends a group that ignores signals.
    let dir = tempfile::tempdir().unwrap();
    let script = "trap '' USR1 TERM; touch \"$READY_DIR/ready-$$\"; sleep 60";
    let mut g = launcher
        .start(&command(dir.path(), script, world, env), 1)
        .unwrap();
    wait_ready(dir.path(), world as usize);
    let started = Instant::now();
    g.kill();
    assert!(
        matches!(g.poll().unwrap(), GroupState::Ended(_)),
        "{}",
        launcher.name()
    );
    assert!(started.elapsed() < Duration::from_secs(35));
    // Every rank is gone, not only the process the launcher started (mpirun's and srun's ranks included).
    let deadline = Instant::now() + Duration::from_secs(10);
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("ready-") else {
            continue;
        };
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if state.is_empty() || state.contains("State:\tZ") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: rank {pid} survived the kill",
                launcher.name()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn the_local_launcher_conforms() {
    conformance(&LocalLauncher, true, &[]);
}

#[test]
fn the_mpirun_launcher_conforms() {
    let launcher = MpirunLauncher {
        extra_args: [
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ]
        .map(String::from)
        .to_vec(),
    };
    conformance(&launcher, false, &[]);
}

#[test]
fn the_srun_launcher_conforms_on_a_real_single_host_slurm() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm-local.sh");
    let out = std::process::Command::new(script)
        .arg("start")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export SLURM_CONF=").map(str::to_string))
        .unwrap();
    conformance(
        &SrunLauncher {
            tasks_per_node: 2,
            gpus_per_task: 0,
            cpus_per_task: 1,
        },
        false,
        &[("SLURM_CONF".into(), conf)],
    );
}

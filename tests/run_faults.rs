//! `radit run` with CPU ranks on this machine, under real faults: a rank killed with SIGKILL at a random step, a
//! SIGTERM to the run (checkpoint, requeue code, resume), a rank killed while it writes a checkpoint, a hung rank,
//! and the coordinator (the `radit run` process) killed while the ranks run. Every faulted run must end with the
//! same final weights, bit for bit, as an uninterrupted run. Also: the job spec's errors and `--dry-run`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{radit, run_ok, stderr, stdout};
use radit_protocol::{CoordinatorClient, JobToken};

const STEPS: u64 = 60;

/// A 16x16 store shared by every test of this file.
fn store() -> &'static Path {
    static STORE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let out = common::tiny_store(dir.path(), 64, "40x48", 8, &[]);
            (dir, out)
        })
        .1
}

/// A job spec for `dir` (run directory and checkpoints inside it); `extra` is appended (more sections).
fn job(dir: &Path, launcher: &str, restart: &str, extra: &str) -> PathBuf {
    job_of(dir, launcher, restart, extra, (STEPS, 1.0))
}

/// [`job`] with `(steps, progress_seconds)`.
fn job_of(
    dir: &Path,
    launcher: &str,
    restart: &str,
    extra: &str,
    (steps, progress_seconds): (u64, f64),
) -> PathBuf {
    let text = format!(
        r#"
[job]
name = "faults"
run_dir = "run"

[data]
url = "{store}"
window_shards = 2

[model]
preset = "tiny"

[engine]
ema_decay = 0.9

[engine.adam]
lr = 0.002

[train]
steps = {steps}
global_batch = 8
seed = 3
log_every = 5

[checkpoint]
url = "{ckpt}"
every = 10
keep = 3

[resources]
cpu_ranks = 2
threads_per_rank = 1

[launcher]
kind = "{launcher}"
mpirun_args = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]

[restart]
heartbeat_seconds = 0.2
missed_heartbeats = 25
{restart}

[monitoring]
progress_seconds = {progress_seconds}
{extra}
"#,
        store = store().display(),
        ckpt = dir.join("ckpt").display(),
    );
    common::write_job(dir, &text)
}

fn run_cmd(job: &Path) -> Command {
    let mut cmd = radit();
    cmd.arg("run").arg(job).env("RUST_LOG", "info");
    cmd
}

/// The final raw weights of the run whose checkpoints are in `dir/ckpt`, by name.
fn final_weights(dir: &Path) -> Weights {
    let out = dir.join("final.safetensors");
    let mut cmd = radit();
    cmd.arg("export")
        .arg(dir.join("ckpt"))
        .arg("--raw")
        .arg("--out")
        .arg(&out);
    let o = run_ok(&mut cmd);
    assert!(
        stdout(&o).contains(&format!("of step {STEPS}")),
        "{}",
        stdout(&o)
    );
    radit_models::model::read_weights(&out)
        .unwrap()
        .tensors
        .iter()
        .map(|(name, t)| {
            let values = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
            (name.clone(), values)
        })
        .collect()
}

type Weights = std::collections::BTreeMap<String, Vec<f32>>;

/// The uninterrupted run's final weights (computed once).
fn reference() -> &'static Weights {
    &reference_run().1
}

/// The bytes of one checkpoint of the uninterrupted run (every file of its last step's directory).
fn checkpoint_bytes() -> u64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                if m.is_dir() { walk(&e.path()) } else { m.len() }
            })
            .sum()
    }
    walk(
        &reference_run()
            .0
            .path()
            .join(format!("ckpt/step-{STEPS:010}")),
    )
}

/// The uninterrupted run (its directory kept) and its final weights, computed once.
fn reference_run() -> &'static (tempfile::TempDir, Weights) {
    static REF: OnceLock<(tempfile::TempDir, Weights)> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let o = run_ok(&mut run_cmd(&job(dir.path(), "local", "", "")));
        let err = stderr(&o);
        assert!(err.contains("run complete after 0 restart(s)"), "{err}");
        let lines = progress_lines(&err);
        assert!(
            lines
                .last()
                .is_some_and(|l| l.contains(&format!("| checkpoint {STEPS} "))),
            "the last line does not name the final checkpoint:\n{}",
            lines.join("\n")
        );
        // Every 10 steps, keep 3: exactly the newest three step directories are left.
        let mut kept: Vec<String> = std::fs::read_dir(dir.path().join("ckpt"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(
            kept,
            ["step-0000000040", "step-0000000050", "step-0000000060"]
        );
        let w = final_weights(dir.path());
        (dir, w)
    })
}

/// The supervisor's periodic lines (`radit: step ...`).
fn progress_lines(err: &str) -> Vec<&str> {
    err.lines()
        .filter(|l| l.starts_with("radit: step "))
        .collect()
}

/// A line's img/s (`623 img/s`, `1.23k img/s`).
fn images_per_second(line: &str) -> Option<f64> {
    let text = line.split(" img/s").next()?.rsplit(' ').next()?;
    let (digits, scale) = match text.strip_suffix('k') {
        Some(d) => (d, 1e3),
        None => (text, 1.0),
    };
    digits.parse::<f64>().ok().map(|v| v * scale)
}

fn assert_same_weights(dir: &Path, what: &str) {
    if let Err(e) = same_weights(dir) {
        panic!("{what}: {e}");
    }
}

/// Whether the run in `dir` ended with the uninterrupted run's final weights, bit for bit (the same steps on the
/// same data in the same reduction order).
fn same_weights(dir: &Path) -> Result<(), String> {
    let (got, want) = (final_weights(dir), reference());
    if got.len() != want.len() {
        return Err(format!("{} tensors, not {}", got.len(), want.len()));
    }
    for (name, w) in want {
        let equal = got.get(name).is_some_and(|g| {
            g.len() == w.len() && g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits())
        });
        if !equal {
            return Err(format!("{name} differs from the uninterrupted run's"));
        }
    }
    Ok(())
}

/// Talks to the run's coordinator (address and token from the run directory) once it is up.
fn coordinator(dir: &Path) -> CoordinatorClient {
    let run = dir.join("run");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let addr = std::fs::read_to_string(run.join("coordinator.addr")).ok();
        if let (Some(Ok(addr)), Ok(token)) = (
            addr.map(|a| a.trim().parse()),
            JobToken::read(&run.join("job.token")),
        ) {
            // An HTTPS coordinator: trust its authority as an operator would, by the fingerprint beside it.
            let ca = run.join("coordinator-ca.pem");
            let sha = std::fs::read_to_string(run.join("coordinator-ca.pem.sha256"));
            return match sha {
                Ok(sha) if ca.exists() => CoordinatorClient::new(addr, token)
                    .with_authority(radit_protocol::PinnedAuthority::read(&ca, &sha).unwrap()),
                _ => CoordinatorClient::new(addr, token),
            };
        }
        assert!(Instant::now() < deadline, "the coordinator did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every rank has finished at least `step` (per the coordinator); returns the ranks' pids.
fn wait_for_step(client: &CoordinatorClient, step: u64, child: &mut Child) -> Vec<u32> {
    try_wait_for_step(client, step, child).unwrap_or_else(|e| panic!("{e}"))
}

fn try_wait_for_step(
    client: &CoordinatorClient,
    step: u64,
    child: &mut Child,
) -> Result<Vec<u32>, String> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Ok(s) = client.status() {
            let ranks = s["ranks"].as_array().cloned().unwrap_or_default();
            if ranks.len() == 2 && ranks.iter().all(|r| r["step"].as_u64() >= Some(step)) {
                return Ok(ranks
                    .iter()
                    .filter_map(|r| Some(r["pid"].as_u64()? as u32))
                    .collect());
            }
        }
        if child.try_wait().ok().flatten().is_some() {
            return Err(format!("radit run ended before step {step}"));
        }
        if Instant::now() > deadline {
            return Err(format!("step {step} never came"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid this test started (directly or through radit run).
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill {pid}");
}

/// A pseudo-random number from the clock (printed, so a failure can be replayed).
fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (nanos / 1000) % n
}

/// The periodic line's rates come from the ranks' own counters and busy time: the last line (fresh goodbye
/// beats after stale ones) and the lines of a relaunched generation read the steady rate, not a multiple of it, and
/// the last line names the final checkpoint once committed.
/// Runs `job` in `dir`, SIGKILLs `rank` once every rank has finished `step`, and returns the stderr of the run,
/// which must complete after exactly one relaunch.
fn run_killing_a_rank(dir: &Path, job: &Path, rank: usize, step: u64) -> String {
    let mut child = spawn(&mut run_cmd(job));
    let client = coordinator(dir);
    let pids = wait_for_step(&client, step, &mut child);
    kill(pids[rank], libc::SIGKILL);
    let out = finish(child);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("run complete after 1 restart(s)"), "{err}");
    err
}

#[test]
fn the_progress_line_is_right_at_the_end_and_after_a_relaunch() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 300;
    let job = job_of(dir.path(), "local", "", "", (steps, 0.4));
    let err = run_killing_a_rank(dir.path(), &job, 1, 120);
    let lines = progress_lines(&err);
    let shown = lines.join("\n");
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.starts_with(&format!("radit: step {steps}/{steps}")),
        "{shown}"
    );
    assert!(last.contains(&format!("| checkpoint {steps} ")), "{shown}");
    let rates = |generation: &str| -> Vec<f64> {
        lines
            .iter()
            .filter(|l| l.ends_with(generation))
            .filter_map(|l| images_per_second(l))
            .collect()
    };
    let mut steady = rates("[generation 1]");
    let relaunched = rates("[generation 2]");
    assert!(
        steady.len() >= 3 && relaunched.len() >= 2,
        "too few lines to compare:\n{shown}"
    );
    steady.sort_by(f64::total_cmp);
    let median = steady[steady.len() / 2];
    // Before busy time, the last line read 1.3 to 4.9 times the steady rate. Measured since: 0.9-1.1 on an idle
    // machine, 0.7-1.7 with two CPU hogs beside the ranks (the rate itself moves with the load); the unit test in
    // run/src/report.rs pins the arithmetic to 2%.
    for rate in relaunched {
        assert!(
            (0.4..=2.5).contains(&(rate / median)),
            "{rate} img/s after the relaunch, {median} before:\n{shown}"
        );
    }
}

/// A `[sweep]` runs each of its runs under the local launcher, one after another, each in its own run directory
/// with its own checkpoints, and writes the sweep's table from the runs' metrics; a sweep whose runs would share
/// checkpoints is refused before anything starts.
#[test]
fn a_sweep_runs_each_run_in_its_own_directory_and_refuses_shared_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let single = job_of(d, "local", "", "", (10, 1.0));
    let sweep = d.join("sweep.toml");
    let text = std::fs::read_to_string(&single).unwrap()
        + "\n[sweep.grid]\n\"engine.adam.lr\" = [0.002, 0.004]\n";
    std::fs::write(&sweep, &text).unwrap();
    let err = common::fails_with_usage(
        common::radit().args(["run", "--dry-run"]).arg(&sweep),
        "both keep checkpoints",
    );
    assert!(err.contains("{run}"), "{err}");
    let ckpt = d.join("ckpt").display().to_string();
    std::fs::write(&sweep, text.replace(&ckpt, &format!("{ckpt}/{{run}}"))).unwrap();
    let out = common::run_ok(&mut run_cmd(&sweep));
    let err = common::stderr(&out);
    for name in ["faults-lr-0.002", "faults-lr-0.004"] {
        assert!(err.contains(&format!("run {name}: ")), "{err}");
        assert!(
            d.join("run").join(name).join("logs").is_dir(),
            "{name}: {err}"
        );
        assert!(d.join("run/sweep").join(format!("{name}.toml")).is_file());
        let steps: Vec<String> = std::fs::read_dir(d.join("ckpt").join(name))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(steps.iter().any(|s| s.contains("10")), "{name}: {steps:?}");
    }
    // The sweep's table: a row per run with its setting and the last logged step of its own metrics.csv.
    let table = std::fs::read_to_string(d.join("run/sweep/sweep.csv")).unwrap();
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split(',').collect()).collect();
    assert_eq!(
        rows[0][..4],
        ["run", "engine.adam.lr", "step", "loss"],
        "{table}"
    );
    assert_eq!((rows[1][1], rows[2][1]), ("0.002", "0.004"), "{table}");
    for row in &rows[1..] {
        assert_eq!(row[2], "10", "{table}");
        assert!(row[3].parse::<f64>().is_ok_and(f64::is_finite), "{table}");
    }
    assert_ne!(
        rows[1][3], rows[2][3],
        "two learning rates, two losses: {table}"
    );
    let again = common::run_ok(common::radit().args(["run", "--summary"]).arg(&sweep));
    assert_eq!(common::stdout(&again), table);
}

/// `[coordinator] tls = true`: the coordinator serves HTTPS with the run's own authority, the ranks pin it, a
/// killed rank is relaunched as over plain HTTP, and the run ends with the uninterrupted run's weights.
#[test]
fn a_tls_job_runs_pinned_to_its_own_authority_and_ends_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), "local", "", "[coordinator]\ntls = true\n");
    let err = run_killing_a_rank(dir.path(), &job, 1, 20);
    assert!(err.contains("coordinator serves HTTPS"), "{err}");
    let ca = std::fs::read_to_string(dir.path().join("run/coordinator-ca.pem")).unwrap();
    assert!(ca.contains("BEGIN CERTIFICATE") && !ca.contains("PRIVATE KEY"));
    assert_same_weights(dir.path(), "TLS job, kill -9");
}

#[test]
fn a_rank_killed_at_a_random_step_is_relaunched_and_the_run_ends_as_if_nothing_happened() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), "local", "", "");
    let (rank, step) = (random_below(2) as usize, 5 + random_below(40));
    eprintln!("killing rank {rank} with SIGKILL after step {step}");
    let err = run_killing_a_rank(dir.path(), &job, rank, step);
    assert!(err.contains("signal 9"), "{err}");
    assert_same_weights(dir.path(), "kill -9");
}

/// [`job`] with a two-level RadUNet (dropout on) trained data-parallel, and final samples.
fn unet_job(dir: &Path) -> PathBuf {
    let path = job(
        dir,
        "local",
        "",
        "\n[samples]\ncount = 4\nsteps = 4\nevery = 30\n",
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text
        .replace("[model]\npreset = \"tiny\"\n", common::TINY_UNET)
        .replace("[engine]\n", "[engine]\nmode = \"ddp\"\n");
    assert!(
        text.contains("mode = \"ddp\"") && text.contains("[model.unet]"),
        "{text}"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `radit run` trains a U-Net as it trains RadiT: a rank killed with SIGKILL at a random step is relaunched and
/// the run ends with the uninterrupted run's weights, bit for bit, with its sheets and samples written.
#[test]
fn a_unet_job_killed_mid_run_ends_with_the_uninterrupted_weights() {
    let straight = tempfile::tempdir().unwrap();
    let o = run_ok(&mut run_cmd(&unet_job(straight.path())));
    assert!(
        stderr(&o).contains("run complete after 0 restart(s)"),
        "{}",
        stderr(&o)
    );
    let want = final_weights(straight.path());
    assert!(
        want.contains_key("enc.16x16_conv.weight"),
        "a U-Net's weights"
    );
    let samples = straight.path().join("run/samples");
    for file in ["contact_sheet.png", "progress/step-00000030.png"] {
        assert!(samples.join(file).exists(), "no {file}");
    }
    let killed = tempfile::tempdir().unwrap();
    let job = unet_job(killed.path());
    let step = 5 + random_below(40);
    eprintln!("killing rank 1 with SIGKILL after step {step}");
    let err = run_killing_a_rank(killed.path(), &job, 1, step);
    assert!(err.contains("signal 9"), "{err}");
    let got = final_weights(killed.path());
    assert_eq!(got.len(), want.len());
    for (name, w) in &want {
        let same = got[name]
            .iter()
            .zip(w)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name} differs from the uninterrupted run's");
    }
}

/// [`job`] as a `[job] kind = "vae-finetune"`: a random tiny FLUX-topology autoencoder's decoder fine-tuned (LoRA on
/// its input convolution and mid block, the RGB head in full) on L1, data-parallel, its best weights kept by a
/// validation loss every 20 steps.
fn finetune_job(dir: &Path) -> PathBuf {
    let base = dir.join("base.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&base));
    let path = job(dir, "local", "", "");
    let text = std::fs::read_to_string(&path).unwrap();
    let model = format!(
        "[model.finetune]\nbase = \"{}\"\nimage_size = 16\n\n[model.finetune.lora]\nrank = 2\nalpha = 2.0\n\
         targets = [\"decoder.conv_in\", \"decoder.mid.*\"]\n\n[reconstruction]\nperceptual = 0.0\n\n\
         [validation]\nevery = 20\nsplit = \"train\"\nimages = 8\nbatch = 4\nbest = \"{}\"\n",
        base.display(),
        dir.join("best.safetensors").display()
    );
    let text = text
        .replace("[model]\npreset = \"tiny\"\n", &model)
        .replace("[engine]\n", "[engine]\nmode = \"ddp\"\n")
        .replace(
            "name = \"faults\"\n",
            "name = \"faults\"\nkind = \"vae-finetune\"\n",
        );
    assert!(
        text.contains("kind = \"vae-finetune\"") && text.contains("mode = \"ddp\""),
        "{text}"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A decoder fine-tune under `radit run` (`[job] kind = "vae-finetune"`, ranks running `radit vae finetune`): a rank
/// killed with SIGKILL at a random step is relaunched, and the run ends with the uninterrupted run's trained
/// weights and the same merged best weights, bit for bit.
#[test]
fn a_decoder_finetune_job_killed_mid_run_ends_with_the_uninterrupted_weights_and_best() {
    let straight = tempfile::tempdir().unwrap();
    let o = run_ok(&mut run_cmd(&finetune_job(straight.path())));
    assert!(
        stderr(&o).contains("run complete after 0 restart(s)"),
        "{}",
        stderr(&o)
    );
    let want = final_weights(straight.path());
    // `radit export` of a fine-tune writes the plain autoencoder, the updates merged.
    assert!(
        want.contains_key("encoder.conv_in.weight") && !want.keys().any(|k| k.contains("lora")),
        "the merged autoencoder: {:?}",
        want.keys().take(5).collect::<Vec<_>>()
    );
    let killed = tempfile::tempdir().unwrap();
    let job = finetune_job(killed.path());
    let step = 5 + random_below(40);
    eprintln!("killing rank 1 with SIGKILL after step {step}");
    let err = run_killing_a_rank(killed.path(), &job, 1, step);
    assert!(err.contains("signal 9"), "{err}");
    let got = final_weights(killed.path());
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in &want {
        let same = got[name]
            .iter()
            .zip(w)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name} differs from the uninterrupted run's");
    }
    // The same best weights, loss and step (the header's key order is the writer's hash map's, not compared).
    let best = |d: &Path| {
        let path = d.join("best.safetensors");
        let meta = radit_models::model::read_metadata(&path).unwrap();
        let tensors: Vec<(String, Vec<u32>)> = radit_models::model::read_weights(&path)
            .unwrap()
            .tensors
            .iter()
            .map(|(n, t)| {
                let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
                (n.clone(), v.iter().map(|x| x.to_bits()).collect())
            })
            .collect();
        (meta, tensors)
    };
    let (want_best, got_best) = (best(straight.path()), best(killed.path()));
    assert!(
        want_best.0.contains_key("radit.best.step"),
        "{:?}",
        want_best.0
    );
    assert!(got_best == want_best, "the best weights differ");
}

#[test]
fn sigterm_checkpoints_every_rank_exits_with_the_requeue_code_and_the_next_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), "local", "", "");
    let mut child = spawn(&mut run_cmd(&job));
    let client = coordinator(dir.path());
    wait_for_step(&client, 23, &mut child);
    kill(child.id(), libc::SIGTERM);
    let out = finish(child);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("every rank checkpointed"), "{err}");
    // The stop step (after 23) is checkpointed, not only the periodic 20: the next run resumes there.
    let o = run_ok(&mut run_cmd(&job));
    let logs = std::fs::read_to_string(dir.path().join("run/logs/gen-1-process-0.log")).unwrap();
    let resumed: u64 = logs
        .lines()
        .filter_map(|l| l.split("\"resumed_from\":").nth(1))
        .filter_map(|v| v.split([',', '}']).next()?.parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no resume in {logs}"));
    assert!(
        resumed > 23,
        "resumed from {resumed}, not from the stop step"
    );
    assert!(stderr(&o).contains("run complete"), "{}", stderr(&o));
    assert_same_weights(dir.path(), "SIGTERM + requeue");
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_rank_killed_while_writing_a_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), "local", "", "");
    let out = run_ok(
        run_cmd(&job)
            .env("RADIT_FAULT_CRASH_IN_CHECKPOINT", "1:30")
            .env("RADIT_FAULT_ONLY_GENERATION", "1"),
    );
    let err = stderr(&out);
    assert!(err.contains("run complete after 1 restart(s)"), "{err}");
    let gen2 = std::fs::read_to_string(dir.path().join("run/logs/gen-2-process-0.log")).unwrap();
    assert!(
        gen2.contains("\"resumed_from\":20"),
        "the torn step-30 checkpoint must be skipped: {gen2}"
    );
    assert_same_weights(dir.path(), "crash mid-checkpoint");
}

/// Runs the job with `rank` hanging in step 25 of the first generation; asserts the culprit is named and the run
/// completes after one relaunch. Returns the run's directory.
fn hang_run(launcher: &str, rank: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let job = job(
        dir.path(),
        launcher,
        "hang_factor = 5.0\nhang_min_seconds = 4.0",
        "",
    );
    let out = run_ok(
        run_cmd(&job)
            .env("RADIT_FAULT_HANG", format!("{rank}:25"))
            .env("RADIT_FAULT_ONLY_GENERATION", "1"),
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "culprit rank {rank} is in `compute` after step 24"
        )),
        "{err}"
    );
    assert!(err.contains("run complete after 1 restart(s)"), "{err}");
    dir
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn out_of_memory_stops_the_run_with_what_to_change_instead_of_relaunching_it() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), "local", "max_restarts = 3", "");
    // Rank 1 asks libtorch's allocator for 1 PiB in step 7 through tch's infallible form, as model code does: a
    // real allocation failure, as a GPU's would be, that panics inside tch unless the step's guard catches it.
    let out = run_cmd(&job)
        .env("RADIT_FAULT_OOM", "1:7")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("generation 1 failed"), "{err}");
    assert!(
        !err.contains("generation 2"),
        "relaunched into the same failure: {err}"
    );
    assert!(
        err.contains("the run failed after 0 restart(s): rank 1: out of memory in step 7 on cpu"),
        "{err}"
    );
    // What was running, and what to change.
    for want in [
        "model tiny (",
        "4 images per rank per step in 1 micro-batch(es) of 4",
        "train.global_batch 8 over 2 ranks",
        "engine.mode Zero3",
        "raise train.micro_batches (to 2",
        "not relaunched",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    let rank_log = std::fs::read_to_string(dir.path().join("run/logs/gen-1-process-1.log"))
        .unwrap_or_default();
    assert!(
        rank_log.contains("can't allocate memory"),
        "the allocator's own message is kept: {rank_log}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_hung_rank_is_named_and_the_run_is_relaunched() {
    let dir = hang_run("local", 1);
    assert_same_weights(dir.path(), "hang");
}

#[test]
fn the_coordinator_killed_mid_run_ranks_checkpoint_and_a_restarted_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    // The ranks run about 70 steps a second here: the coordinator's view lags a heartbeat (0.2 s) and the ranks
    // notice its death one grace period later, so both are kept short for the orphans to stop before step 60.
    let job = job(dir.path(), "local", "coordinator_grace_seconds = 0.25", "");
    let mut child = spawn(&mut run_cmd(&job));
    let client = coordinator(dir.path());
    let pids = wait_for_step(&client, 3, &mut child);
    // The coordinator lives in `radit run`: kill it without warning, then restart it at once. The orphaned ranks
    // keep training, notice the silence after the grace period, checkpoint at a common step and exit 75; the new
    // supervisor waits for them before it launches anything.
    kill(child.id(), libc::SIGKILL);
    let _ = finish(child);
    let out = run_ok(&mut run_cmd(&job));
    let err = stderr(&out);
    assert!(err.contains("run complete after 0 restart(s)"), "{err}");
    for pid in pids {
        // Gone, or a zombie nobody reaps (its parent was the killed supervisor).
        let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains("State:\tZ"),
            "orphan rank {pid} still runs: {state}"
        );
    }
    let orphan_log =
        std::fs::read_to_string(dir.path().join("run/logs/gen-1-process-0.log")).unwrap();
    assert!(orphan_log.contains("lost the coordinator"), "{orphan_log}");
    assert!(
        orphan_log.contains("\"stopped_for_requeue\":true"),
        "{orphan_log}"
    );
    assert_same_weights(dir.path(), "coordinator killed");
}

#[test]
fn the_mpirun_launcher_runs_the_job_and_restarts_after_a_killed_rank() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), "mpirun", "", "");
    run_killing_a_rank(dir.path(), &job, 1, 12);
    // A 2-rank sum is a + b in either order, so MPI's reductions give the TCP collective's bits.
    assert_same_weights(dir.path(), "mpirun, kill -9");
}

#[test]
fn job_spec_errors_name_the_field_and_dry_run_prints_the_plan_without_starting_anything() {
    let dir = tempfile::tempdir().unwrap();
    let good = job(dir.path(), "local", "", "");
    let text = std::fs::read_to_string(&good).unwrap();
    let cases = [
        (
            text.replace("cpu_ranks = 2", "cpu_ranks = 2\ncpu_rank = 2"),
            "cpu_rank",
        ),
        (
            text.replace("cpu_ranks = 2", "cpu_ranks = 3"),
            "train.global_batch",
        ),
        (text.replace("kind = \"local\"", "kind = \"pbs\""), "pbs"),
        (
            text.replace("heartbeat_seconds = 0.2", "heartbeat_seconds = -1"),
            "restart.heartbeat_seconds",
        ),
        (
            text.replace("name = \"faults\"", "name = \"a b\""),
            "job.name",
        ),
        (
            text.replace(
                "[monitoring]\n",
                "[monitoring]\npushgateway = \"https://pg:9091\"\n",
            ),
            "monitoring.pushgateway",
        ),
        (
            text.replace(
                "[monitoring]\n",
                "[monitoring]\npeak_tflops_per_device = 0.0\n",
            ),
            "monitoring.peak_tflops_per_device",
        ),
        (
            format!("{text}\n[samples]\nevery = 10\nsteps = 0\n"),
            "samples.steps",
        ),
    ];
    for (bad, field) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, bad).unwrap();
        let out = radit()
            .arg("run")
            .arg(&path)
            .arg("--dry-run")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(
            err.contains("bad.toml") && err.contains(field),
            "{field}: {err}"
        );
    }
    let out = run_ok(radit().arg("run").arg(&good).arg("--dry-run"));
    let plan = stdout(&out);
    for want in [
        "ranks: 2 = 1 node(s) x 2 CPU rank(s)",
        "rank 1: batch positions 4..7",
        "RADIT_RANK=1 RADIT_WORLD=2",
        "train --config",
        "restarts: up to 3",
    ] {
        assert!(plan.contains(want), "{want}: {plan}");
    }
    assert!(
        !dir.path().join("run").exists(),
        "--dry-run started something"
    );
    // A Slurm job's plan includes the sbatch script.
    let slurm = text.replace("kind = \"local\"", "kind = \"slurm\"");
    std::fs::write(&good, slurm).unwrap();
    let plan = stdout(&run_ok(radit().arg("run").arg(&good).arg("--dry-run")));
    assert!(plan.contains("#SBATCH --ntasks-per-node=2"), "{plan}");
    assert!(plan.contains("--in-allocation"), "{plan}");
    assert!(!plan.contains("--gpus-per-node"), "{plan}");
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_slurm_job_is_submitted_warned_before_its_time_limit_requeued_and_completed_exactly() {
    let conf = common::local_slurm();
    let dir = tempfile::tempdir().unwrap();
    let job = job(
        dir.path(),
        "slurm",
        "",
        "[launcher.slurm]\ntime_limit = \"00:10:00\"\npoll_seconds = 0.5\n",
    );
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("name = \"faults\"", "name = \"radit-requeue-test\"");
    std::fs::write(&job, text).unwrap();
    // 0.15 s a step leaves the signal's path (squeue, scancel, the batch shell, the supervisor, a heartbeat) 6 s
    // to land before the run's end, however loaded the machine.
    let mut child = spawn(
        run_cmd(&job)
            .env("SLURM_CONF", &conf)
            .env("RADIT_FAULT_STEP_SLEEP_MS", "150"),
    );
    let client = coordinator(dir.path());
    wait_for_step(&client, 17, &mut child);
    // What Slurm does at `--signal=B:USR1@N`: USR1 to the batch shell only.
    let id = stdout(&run_ok(
        Command::new("squeue").env("SLURM_CONF", &conf).args([
            "-h",
            "-n",
            "radit-requeue-test",
            "-o",
            "%i",
        ]),
    ));
    run_ok(Command::new("scancel").env("SLURM_CONF", &conf).args([
        "--signal=USR1",
        "--batch",
        id.trim(),
    ]));
    let out = finish(child);
    let err = stderr(&out);
    let slurm_out =
        std::fs::read_to_string(dir.path().join(format!("run/slurm-{}.out", id.trim())))
            .unwrap_or_default();
    assert!(out.status.success(), "{err}\n{slurm_out}");
    assert!(
        slurm_out.contains("requeueing job"),
        "the batch script did not requeue: {slurm_out}"
    );
    assert!(err.contains("COMPLETED"), "{err}");
    assert_same_weights(dir.path(), "Slurm requeue");
}

#[test]
fn the_main_job_trains_on_two_cpu_ranks_checkpoints_and_writes_a_contact_sheet() {
    // `radit quickstart` is what scripts/quickstart.sh (the README's first command) runs; fewer steps here.
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(
        radit()
            .args(["quickstart", "--images", "96", "--steps", "100", "--dir"])
            .arg(dir.path()),
    );
    let (text, err) = (stdout(&out), stderr(&out));
    assert!(text.contains("4/4 training with `radit run"), "{text}");
    assert!(err.contains("2 rank(s) started by local"), "{err}");
    assert!(err.contains("radit: step "), "progress is shown: {err}");
    assert!(err.contains("run complete after 0 restart(s)"), "{err}");
    let run = dir.path().join("run");
    let sheet = run.join("samples/contact_sheet.png");
    assert!(sheet.exists(), "no contact sheet: {text}\n{err}");
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&sheet).unwrap(),
    ));
    let info = decoder.read_info().unwrap().info().clone();
    assert!(
        info.width >= 512,
        "sheets a person can read: {}",
        info.width
    );
    assert!(run.join("final-ema.safetensors").exists());
    // What a person reads after the run: each sample's conditions, its row's real image beside it, one variable
    // flipped, and a row per logged step with the validation loss.
    for sheet in ["real_vs_generated.png", "by_sex.png"] {
        assert!(run.join("samples").join(sheet).exists(), "no {sheet}");
    }
    let samples: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("samples/samples.json")).unwrap()).unwrap();
    let first = &samples["samples"][0];
    assert_eq!(first["split"], "val", "{samples}");
    assert!(
        first["conditions"].as_str().unwrap().contains("sex="),
        "{samples}"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert!(
        metrics.starts_with("step,loss,val_loss,fd,grad_norm,lr,images_per_second,skipped\n"),
        "{metrics}"
    );
    let last: Vec<&str> = metrics.lines().last().unwrap().split(',').collect();
    assert_eq!(last[0], "100", "{metrics}");
    assert!(
        last[2].parse::<f64>().is_ok(),
        "a validation loss at step 100: {metrics}"
    );
    assert!(
        !err.contains("\u{1b}["),
        "no colour codes when not on a terminal"
    );
    // The job file's paths are relative to it: a moved copy trains on, and checkpoints into, its own folder.
    let moved = tempfile::tempdir().unwrap();
    let copy = moved.path().join("copy");
    run_ok(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(dir.path())
            .arg(&copy),
    );
    std::fs::remove_dir_all(copy.join("checkpoints")).unwrap();
    let plan = stdout(&run_ok(
        radit()
            .arg("run")
            .arg(copy.join("job.toml"))
            .arg("--dry-run"),
    ));
    let own = copy.canonicalize().unwrap();
    assert!(
        plan.contains(&format!("data: {}", own.join("store").display()))
            && plan.contains(&format!(
                "checkpoints: {}",
                own.join("checkpoints").display()
            )),
        "{plan}"
    );
    assert!(plan.contains("checked before launch:\n  store "), "{plan}");
    // The sheet drawn during training at step 100 (every 100 steps).
    assert!(
        run.join("samples/progress/step-00000100.png").exists(),
        "no preview sheet: {err}"
    );
    let committed = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("manifest.json").exists())
        .count();
    assert!(committed >= 1, "no committed checkpoint");
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn under_mpirun_a_hung_rank_is_named_and_every_rank_is_killed_and_relaunched() {
    // The other rank waits in an MPI collective, so rank 0 is named, not merely as the lowest rank.
    let dir = hang_run("mpirun", 0);
    assert_same_weights(dir.path(), "mpirun, hang");
}

/// A full disk under `radit run` with 2 ranks: the job's checkpoint directory is a tmpfs with room for `room`
/// checkpoints (of 6, every 10 steps, keep 3), mounted in a private mount namespace (root's CAP_SYS_ADMIN). The
/// saves that fit are kept; the first that does not is removed on every rank and training goes on; the second
/// stops the run once (exit 1, no relaunch), naming the last good checkpoint. Then the checkpoints are copied off the
/// tmpfs, and the same command on a roomy disk resumes from the last good one and ends with the uninterrupted
/// run's weights: nothing is lost. Returns the last good step (0: none), or what went wrong.
fn full_disk_run(dir: &Path, room: f64) -> Result<u64, String> {
    let job = job(dir, "local", "max_restarts = 3", "");
    let ckpt = dir.join("ckpt");
    let saved = dir.join("ckpt-saved");
    std::fs::create_dir_all(&ckpt).map_err(|e| e.to_string())?;
    let size = (checkpoint_bytes() as f64 * room) as u64;
    let script = format!(
        "mount -t tmpfs -o size={size} tmpfs '{ckpt}' || {{ echo 'MOUNT REFUSED'; exit 97; }}\n\
         set +e\n\
         RUST_LOG=info '{radit}' run '{job}'; echo \"RUN EXIT $?\" >&2\n\
         ls -A '{ckpt}' | sed 's/^/LISTED /' >&2\n\
         cp -a '{ckpt}' '{saved}'",
        ckpt = ckpt.display(),
        saved = saved.display(),
        radit = env!("CARGO_BIN_EXE_radit"),
        job = job.display(),
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", &script])
        .output()
        .map_err(|e| e.to_string())?;
    let err = stderr(&out);
    if out.status.code() == Some(97) {
        return Err(format!(
            "a tmpfs could not be mounted in a private mount namespace (this needs CAP_SYS_ADMIN): {err}"
        ));
    }
    // Saves at 10, 20, ... fit while fewer than `room` exist (pruning to 3 happens after a save commits).
    let fit = (room.floor() as u64).min(3);
    let last_good = 10 * fit;
    let (failed, stopped) = (last_good + 10, last_good + 20);
    let listed: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("LISTED "))
        .collect();
    let want: Vec<String> = (1..=fit).map(|k| format!("step-{:010}", 10 * k)).collect();
    let good = match last_good {
        0 => "there is no earlier checkpoint".to_string(),
        s => format!("the last good checkpoint is step {s}"),
    };
    // The first failure is said by rank 0 (in its log), the stop by the supervisor.
    let rank0 =
        std::fs::read_to_string(dir.join("run/logs/gen-1-process-0.log")).unwrap_or_default();
    let checks = [
        (
            rank0.contains(&format!("checkpoint {failed} could not be written"))
                && rank0.contains("No space left on device")
                && rank0.contains("training goes on"),
            format!("checkpoint {failed} fails, named, and training goes on"),
        ),
        (
            err.contains(&format!("checkpoint {stopped} could not be written"))
                && err.contains(&good),
            format!("checkpoint {stopped} fails and the stop says `{good}`"),
        ),
        (err.contains("RUN EXIT 1"), "the run exits 1".into()),
        (!err.contains("generation 2"), "no relaunch".into()),
        (
            listed == want,
            format!(
                "only the good checkpoints are left ({want:?}), nothing of the failed saves: {listed:?}"
            ),
        ),
    ];
    if let Some((_, what)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(format!(
            "room {room:.2}: expected {what}:\n{err}\nrank 0:\n{rank0}"
        ));
    }
    // The disk is freed: the same command resumes from the last good checkpoint and loses nothing.
    std::fs::remove_dir(&ckpt).map_err(|e| e.to_string())?;
    std::fs::rename(&saved, &ckpt).map_err(|e| e.to_string())?;
    let again = run_cmd(&job).output().map_err(|e| e.to_string())?;
    if !again.status.success() {
        return Err(format!("the rerun failed: {}", stderr(&again)));
    }
    same_weights(dir).map_err(|e| format!("room {room:.2}, after the rerun: {e}"))?;
    Ok(last_good)
}

#[test]
fn a_full_disk_under_radit_run_stops_once_naming_the_last_good_checkpoint_and_a_rerun_loses_nothing()
 {
    let dir = tempfile::tempdir().unwrap();
    let last_good = full_disk_run(dir.path(), 2.5).unwrap();
    assert_eq!(last_good, 20);
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One fault of the soak.
#[derive(Debug, Clone, Copy)]
enum SoakFault {
    /// SIGKILL one rank: the supervisor relaunches from the last checkpoint.
    KillRank,
    /// SIGTERM the run: every rank checkpoints, exit 75, and the same command resumes.
    Terminate,
    /// SIGKILL the coordinator (`radit run`) and start it again at once: the orphans checkpoint and the new run
    /// resumes from them.
    KillCoordinator,
    /// SIGSTOP the object store (moto) holding the data for a while, then SIGCONT: reads time out and are retried.
    StallStore,
    /// The checkpoint disk fills: a clean named stop (not recoverable by design), then a rerun with room.
    DiskFull,
    /// SIGSTOP one rank: the hang is named, the generation killed and relaunched.
    HangRank,
    /// SIGKILL one rank, then SIGKILL one rank of the relaunch as it restores the checkpoint.
    KillDuringRestore,
}

impl SoakFault {
    const ALL: [SoakFault; 7] = [
        SoakFault::KillRank,
        SoakFault::Terminate,
        SoakFault::KillCoordinator,
        SoakFault::StallStore,
        SoakFault::DiskFull,
        SoakFault::HangRank,
        SoakFault::KillDuringRestore,
    ];
}

/// What the soak shares between trials: an S3 server holding the store's twin (the same synthetic images sharded
/// with the same settings, so training on it gives the uninterrupted run's weights).
struct SoakWorld {
    moto: common::MotoServer,
    url: String,
}

impl SoakWorld {
    fn start() -> Self {
        let moto = common::MotoServer::start();
        moto.create_bucket("cxr");
        let synth = store().parent().unwrap().join("synth");
        let url = "s3://cxr/tiny".to_string();
        run_ok(
            radit()
                .args(["shard", "--no-progress", "--table"])
                .arg(synth.join("table.csv"))
                .arg("--images")
                .arg(synth.join("images"))
                .args(["--out", &url, "--image-size", "16", "--shard-images", "8"])
                .envs(moto.env()),
        );
        SoakWorld { moto, url }
    }
}

fn signal(pid: u32, signal: i32) -> bool {
    // SAFETY: kill(2) on a pid this trial started; it may have exited already (ESRCH), which is a miss.
    unsafe { libc::kill(pid as i32, signal) == 0 }
}

/// Waits for the relaunch: a generation after `generation` whose two ranks have joined with pids other than `old`.
fn wait_for_relaunch(
    client: &CoordinatorClient,
    old: &[u32],
    child: &mut Child,
) -> Result<Vec<u32>, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(s) = client.status() {
            let pids: Vec<u32> = s["ranks"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|r| Some(r["pid"].as_u64()? as u32))
                .collect();
            if s["generation"].as_u64() >= Some(2)
                && pids.len() == 2
                && pids.iter().all(|p| !old.contains(p))
            {
                return Ok(pids);
            }
        }
        if child.try_wait().ok().flatten().is_some() {
            return Err("radit run ended before the relaunch joined".into());
        }
        if Instant::now() > deadline {
            return Err("no relaunch within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One soak trial from `seed`: a fault of a random kind, rank, step and delay (so it lands mid-step or
/// mid-checkpoint). Nothing may be lost: the run ends with the uninterrupted run's weights, or, where the fault is
/// not recoverable by design (a full disk), stops once naming its last good checkpoint, from which a rerun ends with
/// those weights. `Ok` says what happened.
fn soak_trial(seed: u64, world: &SoakWorld, only: Option<SoakFault>) -> Result<String, String> {
    let mut rng = seed;
    let drawn = SoakFault::ALL[(splitmix(&mut rng) % SoakFault::ALL.len() as u64) as usize];
    let fault = only.unwrap_or(drawn);
    let rank = (splitmix(&mut rng) % 2) as usize;
    let step = 1 + splitmix(&mut rng) % (STEPS - 10);
    let delay = Duration::from_millis(splitmix(&mut rng) % 150);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    if let SoakFault::DiskFull = fault {
        // Room for 0 to 3 whole checkpoints and a part of one more (never close to a whole number of them).
        let room =
            (splitmix(&mut rng) % 4) as f64 + 0.25 + (splitmix(&mut rng) % 50) as f64 / 100.0;
        let what = format!("{fault:?} room for {room:.2} checkpoints");
        let last = full_disk_run(dir.path(), room).map_err(|e| format!("{what}: {e}"))?;
        return Ok(format!(
            "{what}: ok, stopped once naming {}, the rerun ended exactly",
            if last == 0 {
                "no earlier checkpoint".to_string()
            } else {
                format!("step {last}")
            }
        ));
    }
    let stall = Duration::from_millis(1000 + splitmix(&mut rng) % 4000);
    let what = match fault {
        SoakFault::StallStore => format!("{fault:?} for {stall:?} after step {step} + {delay:?}"),
        _ => format!("{fault:?} rank {rank} after step {step} + {delay:?}"),
    };
    let s3 = matches!(fault, SoakFault::StallStore);
    let job = job(
        dir.path(),
        "local",
        "coordinator_grace_seconds = 0.25\nmax_restarts = 3",
        "",
    );
    if s3 {
        let text = std::fs::read_to_string(&job)
            .map_err(|e| e.to_string())?
            .replace(
                &format!("url = \"{}\"", store().display()),
                &format!("url = \"{}\"\nrequest_timeout_seconds = 1.0", world.url),
            );
        std::fs::write(&job, text).map_err(|e| e.to_string())?;
    }
    let command = || {
        // 40 ms a step (about 3 s a run) so that a stop request or a relaunch lands mid-run, not after the end.
        let mut cmd = run_cmd(&job);
        cmd.env("RADIT_FAULT_STEP_SLEEP_MS", "40");
        if s3 {
            cmd.envs(world.moto.env());
        }
        cmd
    };
    let mut child = spawn(&mut command());
    let client = coordinator(dir.path());
    let pids = match try_wait_for_step(&client, step, &mut child) {
        Ok(p) => p,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what}: {e}"));
        }
    };
    std::thread::sleep(delay);
    let failed = |e: String| format!("{what}: {e}");
    let landed = match fault {
        SoakFault::KillRank => signal(pids[rank], libc::SIGKILL),
        SoakFault::Terminate => signal(child.id(), libc::SIGTERM),
        SoakFault::KillCoordinator => signal(child.id(), libc::SIGKILL),
        SoakFault::HangRank => signal(pids[rank], libc::SIGSTOP),
        SoakFault::StallStore => {
            let stopped = signal(world.moto.pid(), libc::SIGSTOP);
            std::thread::sleep(stall);
            signal(world.moto.pid(), libc::SIGCONT);
            stopped
        }
        SoakFault::KillDuringRestore => {
            let first = signal(pids[rank], libc::SIGKILL);
            let relaunched = wait_for_relaunch(&client, &pids, &mut child).map_err(failed)?;
            std::thread::sleep(delay);
            first && signal(relaunched[rank], libc::SIGKILL)
        }
        SoakFault::DiskFull => unreachable!("handled above"),
    };
    let out = finish(child);
    let code = out.status.code();
    let err = stderr(&out);
    let restarts = err.lines().find_map(|l| {
        l.split("run complete after ")
            .nth(1)?
            .split(' ')
            .next()?
            .parse::<u32>()
            .ok()
    });
    match fault {
        SoakFault::Terminate | SoakFault::KillCoordinator if code != Some(0) => {
            // 75 after SIGTERM, none after SIGKILL: the same command resumes.
            let again = command().output().map_err(|e| e.to_string())?;
            if !again.status.success() {
                return Err(failed(format!(
                    "the resumed run failed: {}",
                    stderr(&again)
                )));
            }
        }
        _ if code != Some(0) => return Err(failed(format!("exit {code:?}: {err}"))),
        _ => {}
    }
    // A stopped process stops its heart-beats too: the supervisor names that rank.
    let named = err.contains(&format!("rank {rank} stopped heart-beating"))
        || err.contains(&format!("culprit rank {rank}"));
    if matches!(fault, SoakFault::HangRank) && landed && !named {
        return Err(failed(format!("the hung rank was not named: {err}")));
    }
    same_weights(dir.path()).map_err(failed)?;
    let how = match (fault, code, restarts) {
        (SoakFault::Terminate | SoakFault::KillCoordinator, Some(0), _) => {
            "the run had ended".to_string()
        }
        (_, Some(0), Some(n)) => format!("{n} relaunch(es)"),
        (_, Some(c), _) => format!("exit {c}, resumed"),
        (_, None, _) => "killed, resumed".to_string(),
    };
    let missed = if landed {
        ""
    } else {
        " (the process was gone: fault missed)"
    };
    Ok(format!("{what}: ok, {how}{missed}"))
}

/// `scripts/soak.sh N`: N trials of random faults of every kind, each losing nothing. Behind `--ignored` (minutes);
/// `RADIT_SOAK_TRIALS` (default 5), `RADIT_SOAK_SEED` (default from the clock; printed, and trial i uses seed + i,
/// so `RADIT_SOAK_SEED=s RADIT_SOAK_TRIALS=1` replays one; `RADIT_SOAK_KIND` keeps to one kind of fault). Ends
/// with a count of outcomes per kind.
#[test]
#[ignore]
fn soak() {
    let trials: u64 = std::env::var("RADIT_SOAK_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("RADIT_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    // RADIT_SOAK_KIND=HangRank (say) draws every trial's details from its seed but faults that kind only.
    let only = std::env::var("RADIT_SOAK_KIND").ok().map(|k| {
        *SoakFault::ALL
            .iter()
            .find(|f| format!("{f:?}") == k)
            .unwrap_or_else(|| panic!("RADIT_SOAK_KIND={k}: one of {:?}", SoakFault::ALL))
    });
    eprintln!("soak: {trials} trials from seed {seed}");
    reference();
    let world = SoakWorld::start();
    let mut failures = Vec::new();
    let mut per_kind: std::collections::BTreeMap<String, (u32, u32, u32)> = Default::default();
    for i in 0..trials {
        let started = Instant::now();
        let outcome = soak_trial(seed + i, &world, only);
        let took = started.elapsed().as_secs_f64();
        let line = match &outcome {
            Ok(what) => what.clone(),
            Err(why) => format!("FAIL {why}"),
        };
        let kind = line
            .trim_start_matches("FAIL ")
            .split([' ', ':'])
            .next()
            .unwrap_or("?")
            .to_string();
        let e = per_kind.entry(kind).or_default();
        match &outcome {
            Ok(w) if w.contains("fault missed") => e.2 += 1,
            Ok(_) => e.0 += 1,
            Err(_) => {
                e.1 += 1;
                failures.push(seed + i);
            }
        }
        eprintln!(
            "soak trial {}/{trials} seed {}: {line} ({took:.1} s)",
            i + 1,
            seed + i
        );
    }
    eprintln!("soak summary (kind: nothing lost / failed / fault missed):");
    for (kind, (ok, failed, missed)) in &per_kind {
        eprintln!("  {kind}: {ok} / {failed} / {missed}");
    }
    assert!(failures.is_empty(), "failed seeds: {failures:?}");
}

/// Copies the directory tree `from` to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A run on a private copy of the store whose shard object `train/images/c/1/0/0` is damaged by `damage` after
/// step 10 (the loader reads every shard again each epoch, about every 6 steps); `skip` sets
/// `data.skip_bad_shards`.
fn run_with_a_damaged_shard(dir: &Path, skip: bool, damage: fn(&Path)) -> Output {
    let private = dir.join("store");
    copy_dir(store(), &private);
    let job = job(dir, "local", "max_restarts = 3", "");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace(
            &format!("url = \"{}\"", store().display()),
            &format!("url = \"{}\"", private.display()),
        )
        .replace(
            "window_shards = 2\n",
            &format!("window_shards = 2\nobject_attempts = 2\nskip_bad_shards = {skip}\n"),
        );
    std::fs::write(&job, text).unwrap();
    let mut child = spawn(run_cmd(&job).env("RADIT_FAULT_STEP_SLEEP_MS", "20"));
    let client = coordinator(dir);
    wait_for_step(&client, 10, &mut child);
    damage(&private.join("train/images/c/1/0/0"));
    finish(child)
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_shard_deleted_mid_run_stops_the_run_naming_it_without_a_relaunch() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_a_damaged_shard(dir.path(), false, |p| std::fs::remove_file(p).unwrap());
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("train/images/c/1/0/0 is missing after 2 attempt(s)"),
        "{err}"
    );
    assert!(err.contains("failed after 0 restart(s)"), "{err}");
    assert!(!err.contains("generation 2"), "relaunched: {err}");
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn with_skip_bad_shards_a_corrupted_shard_is_skipped_counted_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_a_damaged_shard(dir.path(), true, |p| {
        let mut data = std::fs::read(p).unwrap();
        let middle = data.len() / 2;
        data[middle] ^= 0x04;
        std::fs::write(p, data).unwrap();
    });
    let err = stderr(&out);
    let log = std::fs::read_to_string(dir.path().join("run/logs/gen-1-process-0.log")).unwrap();
    assert!(out.status.success(), "{err}\n{log}");
    assert!(err.contains("run complete after 0 restart(s)"), "{err}");
    assert!(log.contains("fails its sha256 check"), "{log}");
    let skipped: u64 = log
        .lines()
        .filter_map(|l| l.split("\"skipped_samples\":").nth(1))
        .filter_map(|v| v.split([',', '}']).next()?.parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no summary in {log}"));
    assert!(skipped > 0, "{log}");
}

/// A batch no machine holds: the benchmark's inputs fail to allocate inside tch's infallible calls, which used to
/// panic (exit 101); now the report and exit 2.
#[test]
fn a_batch_too_large_for_the_engine_bench_is_an_out_of_memory_report_not_a_panic() {
    common::fails_out_of_memory(
        radit()
            .args(["engine", "bench", "tiny", "--batch", "100000000"])
            .args(["--steps", "1", "--warmup", "0"]),
        &[
            "out of memory in the benchmark's steps on cpu: ",
            "model tiny (",
            "--batch 100000000 per rank",
            "lower --batch",
        ],
    );
}

/// `radit info` says whether the fault plan is compiled in: in the tests' build (the feature on), and in no other,
/// where `RADIT_FAULT_*` variables do nothing.
#[test]
fn radit_info_says_whether_fault_injection_is_compiled_in() {
    let out = stdout(&run_ok(radit().arg("info")));
    let expected = if cfg!(feature = "fault-injection") {
        "fault injection: compiled in (a test build"
    } else {
        "fault injection: not compiled in"
    };
    assert!(out.contains(expected), "{out}");
}

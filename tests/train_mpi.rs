//! Training under `mpirun` on CPU ranks: the MPI collectives pass the conformance suite; worlds 1, 2 and 4 give the
//! same losses and weights; plain `srun` (no `radit run`, no MPI) forms one world from Slurm's variables and trains
//! the same model, and a batch script's lone process of a multi-task job is refused; stopping and resuming (also on another world size) continues exactly; a torn
//! checkpoint is skipped; the exported weights load into the PyTorch twin.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{radit, run_ok, stderr, stdout};
use radit_models::model::WeightsFile;
use radit_models::tch::Tensor;

fn mpirun(np: usize) -> Command {
    mpirun_with(np, &[])
}

/// `mpirun -np N` of the radit binary, passing `env` (NAME=value) to every rank.
fn mpirun_with(np: usize, env: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
        "-np",
        &np.to_string(),
    ]);
    // One libtorch thread per rank: the machine has two cores and up to four ranks.
    cmd.args(["-x", "OMP_NUM_THREADS=1"]);
    for e in env {
        cmd.args(["-x", e]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_radit"));
    cmd
}

/// The per-step log lines rank 0 printed.
fn step_logs(out: &std::process::Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(out: &std::process::Output) -> Vec<f64> {
    step_logs(out)
        .iter()
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

/// A 16x16 store (the tiny preset's size) of 48 training images or so, in shards of 8.
fn store(dir: &Path) -> PathBuf {
    common::tiny_store(dir, 64, "40x48", 8, &[])
}

fn config(dir: &Path, store: &Path, ckpt: &Path, steps: u64) -> PathBuf {
    config_for(dir, store, ckpt, steps, RADIT)
}

const RADIT: &str = r#"
[model]
preset = "tiny"
"#;

/// The tiny U-Net (dropout on) trained data-parallel with AdamW and a warm-up.
fn unet() -> String {
    format!(
        "{}\n[engine]\nmode = \"ddp\"\n\n[engine.adam]\nlr = 0.003\nbeta2 = 0.99\nweight_decay = 0.01\nwarmup_steps = 2\n",
        common::TINY_UNET
    )
}

/// A train config for `model` (its [model] and, for a U-Net, [engine] sections) with the shared rest.
fn config_for(dir: &Path, store: &Path, ckpt: &Path, steps: u64, model: &str) -> PathBuf {
    let tag = if model == RADIT { "" } else { "unet-" };
    let path = dir.join(format!("run-{tag}{steps}.toml"));
    let adam = if model == RADIT {
        "[engine.adam]\nlr = 0.003\n"
    } else {
        ""
    };
    let text = format!(
        r#"
[data]
url = "{}"
window_shards = 2
prefetch = 2
{model}
{adam}
[flow]
shift = 3.0

[train]
steps = {steps}
global_batch = 8
seed = 5
log_every = 1

[checkpoint]
url = "{}"
every = 3
keep = 2

[validation]
every = 3
split = "train"
images = 12
batch = 4
times = 3
seed = 9
"#,
        store.display(),
        ckpt.display()
    );
    common::write_train_config(&path, &text)
}

/// The validation losses rank 0 printed, by step.
fn validation_losses(out: &std::process::Output) -> Vec<(u64, f64)> {
    step_logs(out)
        .iter()
        .filter_map(|l| Some((l["step"].as_u64()?, l["val_loss"].as_f64()?)))
        .collect()
}

/// Runs training on `np` ranks (0 = no mpirun); returns rank 0's output.
fn train_output(np: usize, cfg: &Path) -> std::process::Output {
    let mut cmd = if np == 0 { radit() } else { mpirun(np) };
    cmd.args(["train", "--threads", "1", "--config"]).arg(cfg);
    run_ok(&mut cmd)
}

/// Runs training on `np` ranks (0 = no mpirun); returns the per-step losses rank 0 printed.
fn train(np: usize, cfg: &Path) -> Vec<f64> {
    losses(&train_output(np, cfg))
}

/// Six uninterrupted steps on two ranks: the losses and the exported weights other runs are compared with.
fn straight_run(dir: &Path, store: &Path) -> (Vec<f64>, WeightsFile) {
    let ckpt = dir.join("straight");
    let losses = train(2, &config(dir, store, &ckpt, 6));
    (losses, export(&ckpt, &dir.join("straight.safetensors")))
}

fn export(ckpt: &Path, out: &Path) -> WeightsFile {
    run_ok(
        radit()
            .args(["export", "--raw", ckpt.to_str().unwrap(), "--out"])
            .arg(out),
    );
    radit_models::model::read_weights(out).unwrap()
}

fn assert_weights_close(a: &WeightsFile, b: &WeightsFile, tol: f64, what: &str) {
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, x) in &a.tensors {
        let y: &Tensor = &b.tensors[name];
        let err = (x - y).abs().max().double_value(&[]);
        let scale = y.abs().max().double_value(&[]).max(1e-3);
        assert!(err <= tol * scale, "{what}: {name} differs by {err:e}");
    }
}

fn assert_losses_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: step counts");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs(),
            "{what}: step {} loss {x} vs {y}",
            i + 1
        );
    }
}

#[test]
fn the_mpi_backend_passes_the_collective_conformance_suite() {
    for np in [2, 3, 4] {
        let out = run_ok(mpirun(np).args(["selftest", "collectives"]));
        assert_eq!(
            stdout(&out).matches("conformance ok").count(),
            np,
            "{}",
            stdout(&out)
        );
    }
}

#[test]
fn the_parity_selftest_reports_device_and_cpu_steps_and_a_checkpoint_round_trip() {
    // What the GPU check runs with --device cuda; here both sides are the CPU and must agree exactly.
    let tmp = tempfile::tempdir().unwrap();
    let out = run_ok(
        radit()
            .args([
                "selftest", "parity", "tiny", "--device", "cpu", "--steps", "2",
            ])
            .args(["--batch", "2", "--checkpoint"])
            .arg(tmp.path()),
    );
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["checkpoint_round_trip_exact"], true, "{report}");
    assert_eq!(report["losses_device"], report["losses_cpu"], "{report}");
    assert_eq!(report["losses_device"].as_array().unwrap().len(), 2);
    assert!(tmp.path().join("parity").exists());
}

#[test]
fn worlds_1_2_and_4_train_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let mut runs = Vec::new();
    let mut validations = Vec::new();
    for np in [0, 2, 4] {
        let ckpt = tmp.path().join(format!("ckpt-w{np}"));
        let out = train_output(np, &config(tmp.path(), &store, &ckpt, 6));
        validations.push(validation_losses(&out));
        let weights = export(&ckpt, &tmp.path().join(format!("w{np}.safetensors")));
        runs.push((np, losses(&out), weights));
    }
    let (_, l1, w1) = &runs[0];
    assert_eq!(l1.len(), 6);
    assert!(l1[5] < l1[0], "the loss goes down: {l1:?}");
    for (np, l, w) in &runs[1..] {
        assert_losses_close(l, l1, 1e-5, &format!("world {np} vs 1"));
        assert_weights_close(w, w1, 1e-4, &format!("world {np} vs 1"));
    }
    // The validation loss (every 3 steps and at the end) is the same number on every world size.
    let v1 = &validations[0];
    assert_eq!(v1.iter().map(|v| v.0).collect::<Vec<_>>(), [3, 6], "{v1:?}");
    assert!(v1.iter().all(|v| v.1.is_finite() && v.1 > 0.0), "{v1:?}");
    for (v, np) in validations[1..].iter().zip([2, 4]) {
        let (a, b): (Vec<f64>, Vec<f64>) = (
            v.iter().map(|x| x.1).collect(),
            v1.iter().map(|x| x.1).collect(),
        );
        assert_losses_close(&a, &b, 1e-5, &format!("validation, world {np} vs 1"));
    }
}

#[test]
fn two_srun_tasks_form_one_world_without_radit_run_and_train_like_one_rank() {
    let conf = common::local_slurm();
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let one = tmp.path().join("ckpt-one");
    let alone = train(0, &config(tmp.path(), &store, &one, 4));
    let both = tmp.path().join("ckpt-srun");
    let cfg = config(tmp.path(), &store, &both, 4);
    let token = tmp.path().join("token");
    std::fs::write(&token, "the step's own secret\n").unwrap();
    let srun = |export: &str| {
        let mut cmd = Command::new("srun");
        cmd.env("SLURM_CONF", &conf)
            .args([
                "--ntasks=2",
                "--cpus-per-task=1",
                "--cpu-bind=none",
                "--time=5",
            ])
            // --mpi=none: the tasks get no PMI, so only Slurm's own variables can make them one world.
            .arg("--mpi=none")
            .arg(format!("--export=ALL,OMP_NUM_THREADS=1{export}"))
            .arg(env!("CARGO_BIN_EXE_radit"))
            .args(["train", "--threads", "1", "--config"])
            .arg(&cfg);
        cmd
    };
    // Without a shared secret the step is refused (its ids are public), saying how to make one.
    let refused = srun("")
        .env_remove("RADIT_JOB_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("RADIT_JOB_TOKEN_FILE=<that file>"),
        "{}",
        stderr(&refused)
    );
    let mut cmd = srun(&format!(",RADIT_JOB_TOKEN_FILE={}", token.display()));
    // The step's first node is this host; where its name does not resolve to loopback, meet on 127.0.0.1.
    let host = stdout(&run_ok(Command::new("hostname").arg("-s")));
    let loopback = std::net::ToSocketAddrs::to_socket_addrs(&(host.trim(), 0))
        .map(|mut a| a.all(|a| a.ip().is_loopback()))
        .unwrap_or(false);
    if !loopback {
        cmd.env("RADIT_MASTER_ADDR", "127.0.0.1");
    }
    let out = run_ok(&mut cmd);
    let together = losses(&out);
    // Two worlds of one would each print their own log lines: one world prints one set.
    assert_eq!(together.len(), 4, "{}", stdout(&out));
    assert_losses_close(&together, &alone, 1e-5, "srun world 2 vs 1");
    assert_weights_close(
        &export(&both, &tmp.path().join("srun.safetensors")),
        &export(&one, &tmp.path().join("one.safetensors")),
        1e-4,
        "srun world 2 vs 1",
    );
}

#[test]
fn a_lone_process_of_a_multi_task_slurm_job_is_refused_naming_what_it_saw() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let cfg = config(tmp.path(), &store, &tmp.path().join("ckpt"), 2);
    // What `sbatch -n2` gives its batch script (no SLURM_STEP_* variables): `radit train` run there directly.
    let out = radit()
        .args(["train", "--threads", "1", "--config"])
        .arg(&cfg)
        .env("SLURM_JOB_ID", "42")
        .env("SLURM_NTASKS", "2")
        .env("SLURM_PROCID", "0")
        .env("SLURM_LOCALID", "0")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("SLURM_NTASKS=2") && err.contains("SLURM_STEP_NUM_TASKS=unset"),
        "{err}"
    );
    assert!(err.contains("srun radit train"), "{err}");
    assert!(!tmp.path().join("ckpt").exists(), "nothing was trained");
}

/// RadUNet with dropout in every block, data-parallel: worlds 1, 2 and 4 give the same losses, validation losses
/// and weights (each sample's dropout masks are keyed by its global index, not by its rank), and a run stopped on 2
/// ranks resumes on 4.
#[test]
fn a_unet_with_dropout_trains_the_same_on_worlds_1_2_and_4_and_resumes_on_another_world() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let mut runs = Vec::new();
    for np in [0, 2, 4] {
        let ckpt = tmp.path().join(format!("unet-w{np}"));
        let out = train_output(np, &config_for(tmp.path(), &store, &ckpt, 6, &unet()));
        let weights = export(&ckpt, &tmp.path().join(format!("unet-w{np}.safetensors")));
        runs.push((np, losses(&out), validation_losses(&out), weights));
    }
    let (_, l1, v1, w1) = &runs[0];
    assert_eq!(l1.len(), 6);
    assert!(w1.tensors.contains_key("enc.16x16_conv.weight"));
    assert_eq!(v1.iter().map(|v| v.0).collect::<Vec<_>>(), [3, 6], "{v1:?}");
    for (np, l, v, w) in &runs[1..] {
        assert_losses_close(l, l1, 1e-5, &format!("U-Net world {np} vs 1"));
        assert_weights_close(w, w1, 1e-4, &format!("U-Net world {np} vs 1"));
        let (a, b): (Vec<f64>, Vec<f64>) = (
            v.iter().map(|x| x.1).collect(),
            v1.iter().map(|x| x.1).collect(),
        );
        assert_losses_close(&a, &b, 1e-5, &format!("U-Net validation, world {np} vs 1"));
    }
    let re_ckpt = tmp.path().join("unet-reshard");
    train(2, &config_for(tmp.path(), &store, &re_ckpt, 3, &unet()));
    let second = train(4, &config_for(tmp.path(), &store, &re_ckpt, 6, &unet()));
    assert_losses_close(&second, &l1[3..], 1e-5, "U-Net resumed on 4 ranks");
    let re_w = export(&re_ckpt, &tmp.path().join("unet-reshard.safetensors"));
    assert_weights_close(&re_w, w1, 1e-4, "U-Net re-sharded resume vs straight");
}

#[test]
fn stopping_and_resuming_continues_exactly_also_on_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let (straight, straight_w) = straight_run(tmp.path(), &store);

    // Same world: 3 steps, stop, 3 more.
    let split_ckpt = tmp.path().join("split");
    let first = train(2, &config(tmp.path(), &store, &split_ckpt, 3));
    let second = train(2, &config(tmp.path(), &store, &split_ckpt, 6));
    assert_eq!(
        [first, second].concat(),
        straight,
        "resumed losses are the uninterrupted ones"
    );
    let split_w = export(&split_ckpt, &tmp.path().join("split.safetensors"));
    assert_weights_close(&split_w, &straight_w, 0.0, "stop + resume vs straight");

    // Another world: 3 steps on 2 ranks, 3 more on 4 ranks (the checkpoint is re-sharded).
    let re_ckpt = tmp.path().join("reshard");
    train(2, &config(tmp.path(), &store, &re_ckpt, 3));
    let second = train(4, &config(tmp.path(), &store, &re_ckpt, 6));
    assert_losses_close(&second, &straight[3..], 1e-5, "resumed on 4 ranks");
    let re_w = export(&re_ckpt, &tmp.path().join("reshard.safetensors"));
    assert_weights_close(&re_w, &straight_w, 1e-4, "re-sharded resume vs straight");
}

#[test]
fn a_torn_checkpoint_is_skipped_and_the_previous_one_used() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let ckpt = tmp.path().join("ckpt");
    let straight = train(2, &config(tmp.path(), &store, &ckpt, 6));
    // Tear the newest checkpoint: rank 1's object loses its tail.
    let torn = ckpt.join("step-0000000006/rank-00001.bin");
    let data = std::fs::read(&torn).unwrap();
    std::fs::write(&torn, &data[..data.len() / 2]).unwrap();
    let mut cmd = mpirun(2);
    cmd.args(["train", "--threads", "1", "--config"])
        .arg(config(tmp.path(), &store, &ckpt, 6));
    let out = run_ok(&mut cmd);
    assert!(
        stderr(&out).contains("checkpoint unusable"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        losses(&out),
        straight[3..],
        "resumed from step 3 and redid steps 4-6 identically"
    );
}

#[test]
fn exported_weights_load_into_the_pytorch_twin() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let ckpt = tmp.path().join("ckpt");
    train(0, &config(tmp.path(), &store, &ckpt, 3));
    let out = tmp.path().join("ema.safetensors");
    run_ok(
        radit()
            .args(["export", ckpt.to_str().unwrap(), "--out"])
            .arg(&out),
    );
    let mut twin = common::python();
    twin.arg(common::repo().join("tests/python/radit_twin.py"))
        .args(["load", "--preset", "tiny", "--weights"])
        .arg(&out);
    run_ok(&mut twin);
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn non_finite_steps_are_skipped_everywhere_and_repeated_ones_roll_back_to_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let (straight, straight_w) = straight_run(tmp.path(), &store);

    // Steps 4 and 5 see a NaN on rank 0: both ranks skip them; after two in a row (rollback_after_skips = 2) the
    // run rolls back to step 3 and redoes 4-6, ending exactly where the clean run ends.
    let ckpt = tmp.path().join("faulty");
    let cfg = config(tmp.path(), &store, &ckpt, 6);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("log_every = 1", "log_every = 1\nrollback_after_skips = 2");
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = mpirun_with(2, &["RADIT_FAULT_NONFINITE_STEPS=4,5"]);
    cmd.args(["train", "--threads", "1", "--config"]).arg(&cfg);
    let out = run_ok(&mut cmd);
    let logs = step_logs(&out);
    let skipped: Vec<u64> = logs
        .iter()
        .filter(|l| l["skipped"].as_bool() == Some(true))
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, [4, 5], "{}", stdout(&out));
    assert!(stderr(&out).contains("rolling back"), "{}", stderr(&out));
    assert!(stderr(&out).contains("\"rollbacks\":1"), "{}", stderr(&out));
    let kept: Vec<f64> = logs
        .iter()
        .filter(|l| l["skipped"].as_bool() == Some(false))
        .map(|l| l["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(kept, straight, "the good steps are the clean run's steps");
    let w = export(&ckpt, &tmp.path().join("faulty.safetensors"));
    assert_weights_close(&w, &straight_w, 0.0, "after rollback vs clean");
}

/// Mean of each 16-bit sample's heart region (PA view: centre at x = +0.05, y = +0.12 of the side, so rows 8-12 and
/// columns 5-12 of a 16x16 image hold the heart whether it is normal or enlarged).
/// The 16x16 16-bit PNG `dir/{prefix}_{i:04}.png` for i in 0..n, as values in [0, 1].
fn read_16x16(dir: &Path, prefix: &str, n: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{prefix}_{i:04}.png"));
            let decoder =
                png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
            let mut reader = decoder.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size().unwrap()];
            reader.next_frame(&mut buf).unwrap();
            buf.chunks(2)
                .map(|b| f64::from(u16::from_be_bytes([b[0], b[1]])) / 65535.0)
                .collect()
        })
        .collect()
}

/// Whether pixel (r, c) of a 16x16 image lies in the synthetic heart's region (rows 8-12, columns 5-12), grown
/// by `margin` pixels.
fn in_heart(r: usize, c: usize, margin: usize) -> bool {
    (8 - margin..13 + margin).contains(&r) && (5 - margin..13 + margin).contains(&c)
}

fn heart_region_means(dir: &Path, n: usize) -> Vec<f64> {
    read_16x16(dir, "sample", n)
        .iter()
        .map(|img| {
            let inside = (0..256).filter(|i| in_heart(i / 16, i % 16, 0));
            inside.map(|i| img[i]).sum::<f64>() / 40.0
        })
        .collect()
}

/// Mean and t statistic of paired differences.
fn paired_t(diffs: &[f64]) -> (f64, f64) {
    let n = diffs.len() as f64;
    let mean = diffs.iter().sum::<f64>() / n;
    let sd = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    (mean, mean / (sd / n.sqrt()))
}

#[test]
fn a_short_run_learns_the_cardiomegaly_conditioning() {
    let tmp = tempfile::tempdir().unwrap();
    let store = common::tiny_store(tmp.path(), 320, "64x64", 16, &[]);
    let ckpt = tmp.path().join("ckpt");
    let cfg = tmp.path().join("learn.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\nurl = \"{}\"\nwindow_shards = 4\n[model]\npreset = \"tiny\"\n[engine.adam]\nlr = 0.002\n\
             [train]\nsteps = 400\nglobal_batch = 32\nseed = 1\nlog_every = 100\n\
             [checkpoint]\nurl = \"{}\"\nevery = 400\nkeep = 1\n",
            store.display(),
            ckpt.display()
        ),
    )
    .unwrap();
    let losses = train(0, &cfg);
    assert!(losses[3] < 0.6 * losses[0], "the loss falls: {losses:?}");
    let weights = tmp.path().join("w.safetensors");
    run_ok(
        radit()
            .args(["export", "--raw", ckpt.to_str().unwrap(), "--out"])
            .arg(&weights),
    );
    // The same 64 noises, generated with cardiomegaly positive and negative (everything else equal).
    let n = 64;
    let mut means = Vec::new();
    for finding in ["positive", "negative"] {
        let out = tmp.path().join(finding);
        run_ok(
            radit()
                .args(["sample", "--weights"])
                .arg(&weights)
                .arg("--out")
                .arg(&out)
                .args([
                    "-n", "64", "--batch", "64", "--solver", "euler", "--steps", "20", "--seed",
                    "7",
                ])
                .args([
                    "--set",
                    &format!("cardiomegaly={finding},view=PA,sex=Male"),
                    "--age",
                    "60",
                ]),
        );
        means.push(heart_region_means(&out, n));
    }
    let diffs: Vec<f64> = means[0].iter().zip(&means[1]).map(|(p, q)| p - q).collect();
    let (mean, t) = paired_t(&diffs);
    // A larger heart is a larger bright region: the enlarged-heart samples are brighter there, clearly beyond noise.
    assert!(
        mean > 0.002 && t > 5.0,
        "heart region brighter by {mean:.4} (t = {t:.1})"
    );

    // The counterfactual edit (dopri5, as the paper edits): the cardiomegaly-negative samples, edited to positive
    // with everything else kept.
    // The heart region brightens (the direction of the finding), and the rest of the image stays close: its mean
    // change is under half the heart region's.
    let negatives: Vec<PathBuf> = (0..n)
        .map(|i| tmp.path().join(format!("negative/sample_{i:04}.png")))
        .collect();
    let edits = tmp.path().join("edits");
    run_ok(
        radit()
            .args(["sample", "--weights"])
            .arg(&weights)
            .arg("--out")
            .arg(&edits)
            .args(["--batch", "64"])
            .arg("--edit")
            .args(&negatives)
            .args([
                "--from",
                "cardiomegaly=negative,view=PA,sex=Male",
                "--from-age",
                "60",
            ])
            .args([
                "--set",
                "cardiomegaly=positive,view=PA,sex=Male",
                "--age",
                "60",
            ]),
    );
    let (before, after) = (
        read_16x16(&edits, "original", n),
        read_16x16(&edits, "edited", n),
    );
    // Per image, the mean change (or mean |change|) over the heart region or over the rest beyond a 1 px margin.
    let change = |inside: bool, magnitude: bool| -> Vec<f64> {
        let pixels: Vec<usize> = (0..256)
            .filter(|&i| in_heart(i / 16, i % 16, usize::from(!inside)) == inside)
            .collect();
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| {
                let d = |i: usize| {
                    if magnitude {
                        (a[i] - b[i]).abs()
                    } else {
                        a[i] - b[i]
                    }
                };
                pixels.iter().map(|&i| d(i)).sum::<f64>() / pixels.len() as f64
            })
            .collect()
    };
    let (heart, t) = paired_t(&change(true, false));
    assert!(
        heart > 0.002 && t > 3.0,
        "the edit brightened the heart region by {heart:.4} (t = {t:.1})"
    );
    let mean_abs = |inside: bool| change(inside, true).iter().sum::<f64>() / n as f64;
    let (heart_abs, rest_abs) = (mean_abs(true), mean_abs(false));
    eprintln!(
        "edit: heart region {heart:+.4} (t = {t:.1}), mean |change| inside {heart_abs:.4}, outside {rest_abs:.4}"
    );
    assert!(
        rest_abs < 0.5 * heart_abs,
        "outside the heart the edit changed pixels by {rest_abs:.4} on average, inside by {heart_abs:.4}"
    );
}

#[test]
fn the_example_configs_parse_and_validate() {
    for name in ["radit-xl-latent.toml", "radit-tiny-cpu.toml"] {
        let path = common::repo().join("examples").join(name);
        radit_jobs::train::TrainConfig::load(&path).unwrap();
    }
    let bad = "[data]\nurl = \"x\"\n[model]\npreset = \"tiny\"\n[train]\nsteps = 1\nglobal_batch = 8\nbatch = 3\n";
    let err = toml::from_str::<radit_jobs::train::TrainConfig>(bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch"), "{err}");
}

#[test]
fn usr1_checkpoints_every_rank_at_the_same_step_exits_75_and_the_next_job_resumes_exactly() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let store = store(tmp.path());
    let steps = 300;
    let straight = train(
        2,
        &config(tmp.path(), &store, &tmp.path().join("straight"), steps),
    );

    // The "job": checkpoints only at the end, so the only other checkpoint is the one the signal causes.
    let ckpt = tmp.path().join("job");
    let cfg = config(tmp.path(), &store, &ckpt, steps);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("every = 3", "every = 100000");
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = mpirun(2);
    cmd.args(["train", "--threads", "1", "--config"]).arg(&cfg);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut first = Vec::new();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        first.push(v["loss"].as_f64().unwrap());
        if first.len() == 20 {
            // What Slurm does before the time limit (mpirun passes USR1 on to every rank).
            let ok = Command::new("kill")
                .args(["-USR1", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
            break;
        }
    }
    first.extend(lines.map(|l| {
        serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap()["loss"]
            .as_f64()
            .unwrap()
    }));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(75), "the job asks to be requeued");
    // The signal came after step 20 was logged: every rank stops at step 20 (when it arrived before the ranks'
    // vote of that step) or later, and well before the end.
    assert!(
        first.len() >= 20 && first.len() < steps as usize,
        "stopped early, after step {}",
        first.len()
    );
    assert_eq!(first, straight[..first.len()]);

    // The requeued job resumes where every rank checkpointed and finishes exactly as the uninterrupted run.
    let rest = train(2, &cfg);
    assert_eq!([first, rest].concat(), straight);
}

/// A train config of an autoencoder `model` (its [model] section) with the reconstruction objective (L1, a KL term
/// for a RadVAE, the perceptual distance on `snapshot`), checkpoints every 3 steps and the best weights kept by a
/// validation loss every 2, named `name` (checkpoints `ckpt-NAME`, best weights `best-NAME.safetensors`).
fn autoencoder_config(
    d: &Path,
    store: &Path,
    snapshot: &Path,
    model: &str,
    name: &str,
    steps: u64,
) -> PathBuf {
    let kl = if model.contains("finetune") {
        0.0
    } else {
        0.01
    };
    let objective = format!(
        "[reconstruction]\nkl = {kl}\nperceptual = 250.0\nperceptual_net = \"{}\"\n",
        snapshot.display()
    );
    image_model_config(d, store, &format!("{model}\n{objective}"), name, steps)
}

/// A train config of a model that reads images (`model`: its [model] section and its objective's), data-parallel
/// with EMA, checkpoints every 3 steps and the best weights kept by a validation loss every 2, named `name`
/// (checkpoints `ckpt-NAME`, best weights `best-NAME.safetensors`).
fn image_model_config(d: &Path, store: &Path, model: &str, name: &str, steps: u64) -> PathBuf {
    let text = format!(
        r#"
[data]
url = "{}"
window_shards = 2
prefetch = 2

{model}
[engine]
mode = "ddp"
ema_decay = 0.5

[engine.adam]
lr = 0.01
weight_decay = 1e-4
warmup_steps = 2

[train]
steps = {steps}
global_batch = 8
seed = 5
log_every = 1

[checkpoint]
url = "{}"
every = 3
keep = 2

[validation]
every = 2
split = "train"
images = 8
batch = 4
best = "{}"
"#,
        store.display(),
        d.join(format!("ckpt-{name}")).display(),
        d.join(format!("best-{name}.safetensors")).display(),
    );
    common::write_train_config(&d.join(format!("ae-{name}-{steps}.toml")), &text)
}

/// `radit COMMAND... --config CFG` on two MPI ranks; rank 0's output.
fn train_command(command: &[&str], cfg: &Path) -> std::process::Output {
    let mut cmd = mpirun(2);
    cmd.args(command)
        .args(["--threads", "1", "--config"])
        .arg(cfg);
    run_ok(&mut cmd)
}

/// Trains `config("straight", 6)`, then `config("split", 3)` and `config("split", 6)` (a stop and a resume) with
/// `radit vae COMMAND`: the loss falls, validations come at steps 2, 4 and 6, the resumed run's losses, weights and
/// best weights are the uninterrupted run's exactly, and the best weights are the lowest validation loss's.
/// Returns the straight run's best weights.
fn trains_resumes_and_keeps_its_best(
    d: &Path,
    command: &[&str],
    config: impl Fn(&str, u64) -> PathBuf,
) -> PathBuf {
    let straight = train_command(command, &config("straight", 6));
    let losses_straight = losses(&straight);
    assert_eq!(losses_straight.len(), 6);
    assert!(
        losses_straight[5] < losses_straight[0],
        "the reconstruction loss goes down: {losses_straight:?}"
    );
    let validations = validation_losses(&straight);
    let steps: Vec<u64> = validations.iter().map(|v| v.0).collect();
    assert_eq!(steps, [2, 4, 6]);
    let first = train_command(command, &config("split", 3));
    let second = train_command(command, &config("split", 6));
    assert_eq!(
        [losses(&first), losses(&second)].concat(),
        losses_straight,
        "resumed losses are the uninterrupted ones"
    );
    let w_straight = export(
        &d.join("ckpt-straight"),
        &d.join("straight-raw.safetensors"),
    );
    let w_split = export(&d.join("ckpt-split"), &d.join("split-raw.safetensors"));
    assert_weights_close(&w_split, &w_straight, 0.0, "stop + resume vs straight");

    // The best weights: the lowest validation loss's (the first, on a tie), with its step and loss; the resumed
    // run kept the same across its two jobs.
    let best = d.join("best-straight.safetensors");
    let (step, loss) = validations
        .iter()
        .fold(None::<(u64, f64)>, |b, &(s, l)| match b {
            Some((_, bl)) if bl <= l => b,
            _ => Some((s, l)),
        })
        .unwrap();
    let meta = radit_models::model::read_metadata(&best).unwrap();
    assert_eq!(meta["radit.best.step"], step.to_string(), "{validations:?}");
    let kept: f64 = meta["radit.best.val_loss"].parse().unwrap();
    assert!((kept - loss).abs() <= 1e-9 * loss.abs(), "{kept} vs {loss}");
    let best_split = d.join("best-split.safetensors");
    assert_eq!(
        radit_models::model::read_metadata(&best_split).unwrap(),
        meta
    );
    let (a, b) = (
        radit_models::model::read_weights(&best).unwrap(),
        radit_models::model::read_weights(&best_split).unwrap(),
    );
    assert_weights_close(&a, &b, 0.0, "best weights, straight vs resumed");
    best
}

/// `radit decode` of random latents `[2, 4, 8, 8]` with `weights` agrees, level for level, with the library's
/// autoencoder loaded from the same file.
fn assert_decode_matches_the_library(d: &Path, weights: &Path) {
    use radit_models::autoencoder::{AUTO, Autoencoder, resolve};
    let found = resolve(AUTO, weights).unwrap();
    let z = Tensor::randn([2, 4, 8, 8], radit_models::tch::kind::FLOAT_CPU);
    let latents = d.join("latents.safetensors");
    Tensor::write_safetensors(&[("latents", &z)], &latents).unwrap();
    let out = d.join("decoded");
    run_ok(
        radit()
            .args(["decode", "--device", "cpu", "--latents"])
            .arg(&latents)
            .arg("--decoder")
            .arg(weights)
            .arg("--out")
            .arg(&out),
    );
    let vs = radit_models::tch::nn::VarStore::new(radit_models::tch::Device::Cpu);
    let ae = Autoencoder::new(&vs.root(), &found).unwrap();
    radit_models::autoencoder::load(&vs, &found, weights).unwrap();
    let images = radit_models::tch::no_grad(|| ae.decode(&z)).unwrap();
    for i in 0..2 {
        let want = radit_jobs::generate::to_u16(&images.get(i)).unwrap();
        let png = out.join(format!("decoded_{i:04}.png"));
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut bytes = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut bytes).unwrap();
        assert_eq!((info.width, info.height), (16, 16));
        let got: Vec<u16> = bytes
            .chunks(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .collect();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| g.abs_diff(*w))
            .max()
            .unwrap();
        assert!(
            worst <= 1,
            "decoded_{i:04}.png is {worst} levels off the library's decode"
        );
    }
}

/// RadVAE (Scratch), tiny, trained by `radit vae train` on two MPI ranks with L1, KL and the Rad-DINO perceptual
/// distance (a random stand-in snapshot): it trains, resumes exactly and keeps its best weights; the best file is
/// an autoencoder file that `radit encode` encodes the store with and `radit decode` decodes with, as the
/// library's autoencoder does.
#[test]
fn radvae_trains_resumes_exactly_keeps_its_best_and_encodes_and_decodes() {
    use radit_models::autoencoder::{AutoencoderConfig, found_in};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let store = store(d);
    let snapshot = d.join("rad-dino");
    radit_models::features::write_random_snapshot(&snapshot, 2).unwrap();
    let model = "[model]\npreset = \"radvae-tiny\"\n";
    let best = trains_resumes_and_keeps_its_best(d, &["vae", "train"], |name, steps| {
        autoencoder_config(d, &store, &snapshot, model, name, steps)
    });
    let found = found_in(&best).unwrap().unwrap();
    assert_eq!(found, AutoencoderConfig::preset("radvae-tiny").unwrap());
    run_ok(
        radit()
            .args(["encode", "--store", store.to_str().unwrap(), "--weights"])
            .arg(&best),
    );
    let manifest: radit_sharding::manifest::Manifest =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.latents.unwrap().sample_shape, [4, 8, 8]);
    assert_decode_matches_the_library(d, &best);
}

/// RadVAE (LoRA), tiny: a random tiny FLUX-topology autoencoder's decoder fine-tuned by `radit vae finetune` on two
/// MPI ranks (LoRA on its input convolution, mid block and one convolution per up level, the RGB head in full),
/// with L1 and the perceptual distance: it trains, resumes exactly and keeps its best weights, which are the
/// plain autoencoder with the updates merged: the encoder is the released one, bit for bit, and `radit decode`
/// decodes with it as the library does.
#[test]
fn a_decoder_finetune_trains_resumes_exactly_and_its_merged_best_decodes() {
    use radit_models::autoencoder::{AeConfig, found_in};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let store = store(d);
    let snapshot = d.join("rad-dino");
    radit_models::features::write_random_snapshot(&snapshot, 2).unwrap();
    let base = d.join("tiny-ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&base));
    let model = format!(
        r#"[model.finetune]
base = "{}"
image_size = 16

[model.finetune.lora]
rank = 2
alpha = 4.0
targets = ["decoder.conv_in", "decoder.mid.block_*.conv*", "decoder.mid.attn_1.*", "decoder.up.*.block.1.conv2"]
"#,
        base.display()
    );
    let best = trains_resumes_and_keeps_its_best(d, &["vae", "finetune"], |name, steps| {
        autoencoder_config(d, &store, &snapshot, &model, name, steps)
    });
    // A plain autoencoder file of the released configuration: the updates are merged.
    let found = found_in(&best).unwrap().unwrap();
    assert_eq!(found, AeConfig::tiny().into());
    let (released, tuned) = (
        radit_models::model::read_weights(&base).unwrap().tensors,
        radit_models::model::read_weights(&best).unwrap().tensors,
    );
    assert_eq!(released.len(), tuned.len());
    assert!(tuned.keys().all(|k| !k.contains("lora")));
    let moved: Vec<&String> = released
        .iter()
        .filter(|(k, v)| (*v - &tuned[*k]).abs().max().double_value(&[]) > 0.0)
        .map(|(k, _)| k)
        .collect();
    // The encoder did not move; the LoRA targets' weights and the head did.
    assert!(moved.iter().all(|k| k.starts_with("decoder.")), "{moved:?}");
    for k in [
        "decoder.conv_in.weight",
        "decoder.mid.attn_1.q.weight",
        "decoder.up.1.block.1.conv2.weight",
        "decoder.conv_out.weight",
        "decoder.norm_out.weight",
    ] {
        assert!(moved.iter().any(|m| *m == k), "{k} did not move: {moved:?}");
    }
    assert_decode_matches_the_library(d, &best);
}

/// A metadata predictor (attention pooling over a random Rad-DINO stand-in's two layers) trained by `radit
/// predictors train` on two MPI ranks: one process's losses to 1e-5, the loss falls, it resumes exactly and keeps
/// its best weights, and `radit predictors eval` scores the best file on the split with the embeddings.
#[test]
fn a_predictor_trains_data_parallel_resumes_exactly_and_scores_a_split() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let store = store(d);
    let snapshot = d.join("rad-dino");
    radit_models::features::write_random_snapshot(&snapshot, 2).unwrap();
    let model = format!(
        "[model.predictor]\nvariant = \"attention-pool\"\nbackbone = \"{}\"\nimage_size = 16\nlayers = [1, 2]\n",
        snapshot.display()
    );
    let config = |name: &str, steps| image_model_config(d, &store, &model, name, steps);
    let one = run_ok(
        radit()
            .args(["predictors", "train", "--threads", "1", "--config"])
            .arg(config("one", 6)),
    );
    let best = trains_resumes_and_keeps_its_best(d, &["predictors", "train"], config);
    let two = losses(&train_command(&["predictors", "train"], &config("two", 6)));
    assert_losses_close(&losses(&one), &two, 1e-5, "1 rank vs 2 ranks");

    let out = d.join("scores");
    let said = run_ok(
        radit()
            .args([
                "predictors",
                "eval",
                "--device",
                "cpu",
                "--split",
                "train",
                "--embeddings",
                "--weights",
            ])
            .arg(&best)
            .arg("--store")
            .arg(&store)
            .arg("--out")
            .arg(&out),
    );
    let metrics: serde_json::Value = serde_json::from_str(&stdout(&said)).unwrap();
    let images = metrics["images"].as_u64().unwrap();
    assert!(images > 40, "{metrics}");
    let vars = metrics["variables"].as_array().unwrap();
    assert_eq!(vars.len(), 19);
    for v in vars {
        if let Some(x) = v["value"].as_f64() {
            let ok = if v["variable"] == "age" {
                x >= 0.0
            } else {
                (0.0..=1.0).contains(&x)
            };
            assert!(ok, "{v}");
        }
    }
    let lines = std::fs::read_to_string(out.join("predictions.csv"))
        .unwrap()
        .lines()
        .count() as u64;
    assert_eq!(lines, images + 1);
    let e = radit_eval::io::read_npy(&out.join("embeddings.npy")).unwrap();
    // 19 tasks x (2 layers x 64).
    assert_eq!((e.rows() as u64, e.dim()), (images, 19 * 128));
}

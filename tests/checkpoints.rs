//! What the README claims of checkpoints, each under test on one rank of `radit train`: a checkpoint of another
//! model or another data order is refused by name; pruning keeps exactly the newest `keep` and removes their step
//! directories; a same-size flipped byte is caught by the checksum and the previous checkpoint used; a full disk
//! (a size-limited tmpfs in a private mount namespace) fails that checkpoint cleanly, training goes on, a second
//! failure stops the run naming the last good checkpoint, and that checkpoint stays loadable.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{radit, run_ok, stderr, stdout};

/// A 16x16 store shared by every test of this file.
fn store() -> &'static Path {
    static STORE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let out = common::tiny_store(dir.path(), 48, "40x48", 8, &[]);
            (dir, out)
        })
        .1
}

/// A one-rank train config: `steps`, checkpoints to `ckpt` every `every` keeping `keep`; `model` and `seed`
/// replace the preset and the data seed.
struct Run<'a> {
    ckpt: &'a str,
    steps: u64,
    every: u64,
    keep: u64,
    model: &'a str,
    seed: u64,
}

impl Default for Run<'_> {
    fn default() -> Self {
        Self {
            ckpt: "",
            steps: 6,
            every: 2,
            keep: 3,
            model: "preset = \"tiny\"",
            seed: 5,
        }
    }
}

impl Run<'_> {
    fn config(&self, dir: &Path) -> PathBuf {
        let text = format!(
            r#"
[data]
url = "{store}"
window_shards = 2

[model]
{model}

[engine.adam]
lr = 0.003

[train]
steps = {steps}
global_batch = 8
seed = {seed}
log_every = 1

[checkpoint]
url = "{ckpt}"
every = {every}
keep = {keep}
"#,
            store = store().display(),
            model = self.model,
            steps = self.steps,
            seed = self.seed,
            ckpt = self.ckpt,
            every = self.every,
            keep = self.keep,
        );
        common::write_train_config(&dir.join(format!("run-{}.toml", self.steps)), &text)
    }

    fn command(&self, dir: &Path) -> Command {
        let mut cmd = radit();
        cmd.args(["train", "--threads", "1", "--config"])
            .arg(self.config(dir));
        cmd
    }
}

fn losses(out: &Output) -> Vec<f64> {
    stdout(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

/// The step directories under `ckpt`, sorted.
fn step_dirs(ckpt: &Path) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn a_checkpoint_of_another_model_or_data_order_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let url = ckpt.to_str().unwrap();
    run_ok(
        &mut Run {
            ckpt: url,
            steps: 2,
            ..Run::default()
        }
        .command(dir.path()),
    );
    // Another model: the tiny preset one block deeper.
    let deeper = "[model.config]\nin_channels = 1\ninput_size = 16\npatch_size = 4\nhidden = 64\ndepth = 3\nheads = 4";
    // Exit 2 (bad input, not relaunched), naming what differs.
    let refused = |run: Run, needle: &str| {
        let out = run.command(dir.path()).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    };
    refused(
        Run {
            ckpt: url,
            steps: 4,
            model: deeper,
            ..Run::default()
        },
        "step-0000000002/manifest.json was written for another model",
    );
    // Another data order: another seed.
    refused(
        Run {
            ckpt: url,
            steps: 4,
            seed: 6,
            ..Run::default()
        },
        "the data order changed since the checkpoint",
    );
    // Neither refusal touched the checkpoint.
    assert_eq!(step_dirs(&ckpt), ["step-0000000002"]);
}

#[test]
fn pruning_keeps_exactly_keep_checkpoints_and_removes_their_directories() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    // `steps` steps, a checkpoint at every one, the newest two kept.
    let run = |steps: u64| {
        run_ok(
            &mut Run {
                ckpt: ckpt.to_str().unwrap(),
                steps,
                every: 1,
                keep: 2,
                ..Run::default()
            }
            .command(dir.path()),
        )
    };
    run(6);
    assert_eq!(step_dirs(&ckpt), ["step-0000000005", "step-0000000006"]);
    // A torn save older than the newest committed checkpoint (a rank killed mid-write) goes at the next prune.
    let torn = ckpt.join("step-0000000004");
    std::fs::create_dir(&torn).unwrap();
    std::fs::write(torn.join("rank-00000.bin"), b"half an object").unwrap();
    run(7);
    assert_eq!(step_dirs(&ckpt), ["step-0000000006", "step-0000000007"]);
}

/// In `dir`: the losses of a straight run of `straight_steps` steps, and the checkpoint directory a 4-step run
/// leaves (checkpoints at steps 2 and 4).
fn straight_and_checkpointed(dir: &Path, straight_steps: u64) -> (Vec<f64>, PathBuf) {
    let straight_ckpt = dir.join("straight");
    let straight = losses(&run_ok(
        &mut Run {
            ckpt: straight_ckpt.to_str().unwrap(),
            steps: straight_steps,
            ..Run::default()
        }
        .command(dir),
    ));
    let ckpt = dir.join("ckpt");
    run_ok(
        &mut Run {
            ckpt: ckpt.to_str().unwrap(),
            steps: 4,
            ..Run::default()
        }
        .command(dir),
    );
    (straight, ckpt)
}

/// Flips one bit of byte `at(len)` of step `step`'s rank-0 object: same size, so only the checksum can tell.
fn flip_a_bit(ckpt: &Path, step: u64, at: impl Fn(usize) -> usize) {
    let object = ckpt.join(format!("step-{step:010}/rank-00000.bin"));
    let mut data = std::fs::read(&object).unwrap();
    let i = at(data.len());
    data[i] ^= 0x10;
    std::fs::write(&object, &data).unwrap();
}

/// `radit train` from `ckpt` to `steps`.
fn resume(dir: &Path, ckpt: &Path, steps: u64) -> Output {
    run_ok(
        &mut Run {
            ckpt: ckpt.to_str().unwrap(),
            steps,
            ..Run::default()
        }
        .command(dir),
    )
}

#[test]
fn a_flipped_byte_is_caught_by_its_checksum_and_the_previous_checkpoint_used() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, ckpt) = straight_and_checkpointed(dir.path(), 6);
    flip_a_bit(&ckpt, 4, |len| len / 2);
    let out = resume(dir.path(), &ckpt, 6);
    let err = stderr(&out);
    assert!(
        err.contains("checkpoint unusable") && err.contains("sha256"),
        "{err}"
    );
    assert_eq!(
        losses(&out),
        straight[2..],
        "resumed from step 2 and redid steps 3-6 as the straight run did"
    );
}

/// Every checkpoint torn: each is verified before anything is loaded, so the engine keeps its initial state and
/// the run starts over exactly as a run without checkpoints does (a load that had half-written the weights before
/// finding the damage would not).
#[test]
fn when_every_checkpoint_is_torn_the_run_starts_over_from_untouched_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (straight, ckpt) = straight_and_checkpointed(dir.path(), 4);
    for step in [2, 4] {
        flip_a_bit(&ckpt, step, |len| len - 1);
    }
    let out = resume(dir.path(), &ckpt, 4);
    let err = stderr(&out);
    assert_eq!(err.matches("checkpoint unusable").count(), 2, "{err}");
    assert_eq!(
        losses(&out),
        straight,
        "every step again, from the same initial weights"
    );
}

/// Runs `script` (sh) in a private mount namespace where `mount` of a tmpfs is allowed.
fn in_mount_namespace(script: &str) -> Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", script])
        .output()
        .expect("unshare starts")
}

#[test]
fn a_full_disk_fails_that_checkpoint_cleanly_and_the_last_good_one_stays_loadable() {
    let dir = tempfile::tempdir().unwrap();
    // One checkpoint's size, measured.
    let probe = dir.path().join("probe");
    run_ok(
        &mut Run {
            ckpt: probe.to_str().unwrap(),
            steps: 1,
            every: 1,
            ..Run::default()
        }
        .command(dir.path()),
    );
    let one: u64 = walk_bytes(&probe.join("step-0000000001"));
    // Room for two and a half checkpoints: saves at 2 and 4 fit, 6 does not (keep 3 prunes nothing), nor 8.
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let config = Run {
        ckpt: disk.to_str().unwrap(),
        steps: 10,
        every: 2,
        keep: 3,
        ..Run::default()
    }
    .config(dir.path());
    let export = dir.path().join("last-good.safetensors");
    let radit_bin = env!("CARGO_BIN_EXE_radit");
    let script = format!(
        "mount -t tmpfs -o size={size} tmpfs '{disk}' || {{ echo 'MOUNT REFUSED'; exit 97; }}\n\
         set +e\n\
         '{radit_bin}' train --threads 1 --config '{config}'; echo \"TRAIN EXIT $?\" >&2\n\
         ls '{disk}' >&2\n\
         '{radit_bin}' export '{disk}' --raw --out '{export}'",
        size = one * 5 / 2,
        disk = disk.display(),
        config = config.display(),
        export = export.display(),
    );
    let out = in_mount_namespace(&script);
    let (err, said) = (stderr(&out), stdout(&out));
    assert_ne!(
        out.status.code(),
        Some(97),
        "a tmpfs could not be mounted in a private mount namespace (this test needs CAP_SYS_ADMIN): {err}"
    );
    // The first failure is named and training goes on; the second stops the run (exit 1), naming the last good.
    assert!(
        err.contains("checkpoint 6 could not be written")
            && err.contains("No space left on device")
            && err.contains("training goes on"),
        "{err}"
    );
    assert!(
        err.contains("checkpoint 8 could not be written")
            && err.contains("the last good checkpoint is step 4"),
        "{err}"
    );
    assert!(err.contains("TRAIN EXIT 1"), "{err}");
    // Nothing of the failed saves is left: the listing shows exactly the two good step directories.
    let listing: Vec<&str> = err.lines().filter(|l| l.starts_with("step-")).collect();
    assert_eq!(listing, ["step-0000000002", "step-0000000004"], "{err}");
    // And the last good checkpoint loads.
    assert!(out.status.success(), "{err}");
    assert!(said.contains("raw weights of step 4"), "{said}\n{err}");
}

fn walk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// boto3 against `moto`: runs `code` with `bucket` as sys.argv[1]; returns its stdout.
fn boto3(moto: &common::MotoServer, code: &str, bucket: &str) -> String {
    stdout(&run_ok(
        common::python().envs(moto.env()).args(["-c", code, bucket]),
    ))
}

#[test]
fn a_run_checkpoints_to_and_resumes_from_s3_and_prunes_there() {
    let moto = common::MotoServer::start();
    moto.create_bucket("ckpt");
    let dir = tempfile::tempdir().unwrap();
    let straight = losses(&run_ok(
        &mut Run {
            ckpt: dir.path().join("local").to_str().unwrap(),
            steps: 6,
            ..Run::default()
        }
        .command(dir.path()),
    ));
    let url = "s3://ckpt/runs/tiny";
    let on_s3 = |steps: u64| {
        let mut cmd = Run {
            ckpt: url,
            steps,
            every: 1,
            keep: 2,
            ..Run::default()
        }
        .command(dir.path());
        cmd.envs(moto.env());
        run_ok(&mut cmd)
    };
    let first = losses(&on_s3(4));
    let second = on_s3(6);
    assert!(
        stderr(&second).contains("resumed from checkpoint"),
        "{}",
        stderr(&second)
    );
    assert_eq!(
        [first, losses(&second)].concat(),
        straight,
        "4 steps on S3, then 2 more resumed from S3, are the local run's 6"
    );
    // Pruned on S3 too: exactly the newest two step prefixes, each whole.
    let listing = boto3(
        &moto,
        "import boto3, sys\n\
         for o in boto3.client('s3').list_objects_v2(Bucket=sys.argv[1])['Contents']: print(o['Key'])",
        "ckpt",
    );
    let mut steps: Vec<&str> = listing
        .lines()
        .filter_map(|k| k.strip_prefix("runs/tiny/")?.split('/').next())
        .collect();
    steps.dedup();
    assert_eq!(steps, ["step-0000000005", "step-0000000006"], "{listing}");
    // A flipped byte in the newest object on S3: `radit export` falls back to step 5.
    boto3(
        &moto,
        "import boto3, sys\n\
         s3, key = boto3.client('s3'), 'runs/tiny/step-0000000006/rank-00000.bin'\n\
         data = bytearray(s3.get_object(Bucket=sys.argv[1], Key=key)['Body'].read())\n\
         data[len(data) // 2] ^= 0x10\n\
         s3.put_object(Bucket=sys.argv[1], Key=key, Body=bytes(data))",
        "ckpt",
    );
    let out = run_ok(
        radit()
            .envs(moto.env())
            .args(["export", url, "--raw", "--out"])
            .arg(dir.path().join("w.safetensors")),
    );
    assert!(
        stdout(&out).contains("raw weights of step 5"),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
}

//! The README's commands, run as a newcomer runs them: every ```sh block of README.md is extracted, each command
//! (continuation lines joined) is checked against one table of what a test changes (cluster paths, sizes and step
//! counts, in `SUBSTITUTIONS`) and what it cannot run here (`CLUSTER_ONLY`, each with its reason), and the rest runs
//! in order, block by block, in one scratch directory with `radit` being this build. A README command that breaks,
//! or a new one that neither runs nor is listed, fails this test.

mod common;

use common::*;

/// What a test changes in the README's commands: (from, to), applied in order to every command. Paths of the
/// cluster become the scratch directory's, sizes and step counts become tiny.
const SUBSTITUTIONS: &[(&str, &str)] = &[
    // The release build and its setup: this test runs the debug binary it was built with.
    ("./scripts/quickstart.sh", "radit quickstart --steps 40"),
    ("$radit", "radit"),
    ("--steps 2000", "--steps 40"),
    ("--images 1000", "--images 40"),
    ("examples/radit-tiny-cpu.toml", "radit-tiny-cpu.toml"),
    (
        "examples/predictor-tiny-cpu.toml",
        "predictor-tiny-cpu.toml",
    ),
    // The XL edits are the cluster's (skipped below): identity reads the walk-through's edits, with fewer pairs.
    ("--edits edits-xl", "--edits edits"),
    ("--out identity-xl", "--pairs 50 --out identity-xl"),
    // The cluster's data and stores: the quickstart's store, the synthetic releases, local folders.
    ("/data/vindr-cxr", "fixtures/vindr-cxr"),
    ("--images /data", "--images fixtures"),
    ("--config sources.toml", "--config fixtures/sources.toml"),
    (
        "--hold-out chexgenbench-test-ids.txt",
        "--hold-out fixtures/hold-out.txt",
    ),
    ("--out file:///scratch/cxr7", "--out data-store"),
    ("s3://bucket/cxr7-1m", "cxr7-store"),
    ("s3://bucket/cxr7", "radit-quickstart/store"),
    (
        "--world 4 --rank 1 --from-step 1000",
        "--world 2 --rank 1 --from-step 10",
    ),
    (
        "--world 32 --rank 0 --cache $LOCALDIR/radit-cache",
        "--world 2 --rank 0 --cache node-cache",
    ),
    ("--global-batch 512", "--global-batch 8"),
    ("--cache /scratch/features", "--cache features-cache"),
    // The quickstart's store is small: a reference set of its size.
    (
        "--count 5000 --seed 0 --out mimic-5k.ids",
        "--count 1 --seed 0 --out mimic-5k.ids",
    ),
    ("--threads 8", "--threads 2"),
    // A user's weights and images: the quickstart's model and one of its images.
    (
        "--weights w.safetensors",
        "--weights radit-quickstart/run/final-ema.safetensors",
    ),
    (
        "--edit a.png b.png",
        "--edit radit-quickstart/synthetic/images/P0000/synth-0000003.png",
    ),
];

/// Commands that need what this machine does not have, by a piece of their text, with the reason.
const CLUSTER_ONLY: &[(&str, &str)] = &[
    ("./scripts/test.sh", "the test suite itself"),
    (
        "source scripts/env.sh",
        "the build environment, already set for this test",
    ),
    (
        "cargo build --release",
        "the release build (the test uses the debug binary)",
    ),
    ("radit=target/release/radit", "the release binary's path"),
    (
        "AWS_ENDPOINT_URL=...",
        "an object store of the cluster (tests/s3_moto.rs runs the same on moto)",
    ),
    ("s3://bucket/mimic-cxr", "a dataset in a bucket"),
    ("s3://cxr/checkpoints", "the XL run's checkpoints"),
    ("flux2-vae.safetensors", "FLUX.2's released weights"),
    ("--decoder ae.safetensors", "FLUX.2's released weights"),
    (
        "examples/radit-xl-job.toml",
        "the XL job's store (tests/examples.rs dry-runs every example job)",
    ),
    (
        "examples/encode-xl-job.toml",
        "FLUX.2's weights on the cluster",
    ),
    (
        "examples/radvae-job.toml",
        "the RadVAE job's store, Rad-DINO and Slurm account (tests/examples.rs dry-runs every example job)",
    ),
    (
        "examples/radunet-pixel-job.toml",
        "the U-Net job's store and Slurm account (tests/examples.rs dry-runs every example job)",
    ),
    ("radit-xl", "the XL run's weights"),
    (
        "LLAVARAD_ANNOTATIONS_TEST.csv",
        "CheXGenBench's test CSV (tests/data_cli.rs maps one)",
    ),
    (
        "chexgenbench.ids",
        "CheXGenBench's reference set, mapped from its CSV",
    ),
    (
        "pt_inception-2015-12-05",
        "the FID weights file (tests/eval_metrics.rs exports random ones)",
    ),
    ("srun ", "Slurm with GPUs"),
    (
        ".radit-token-$SLURM_JOB_ID",
        "a Slurm job's token file (tests/train_mpi.rs makes one for its srun step)",
    ),
    (
        "mpirun -np 4",
        "four MPI ranks of a user's run.toml (tests/train_mpi.rs runs mpirun)",
    ),
    (
        "mpirun -np 2",
        "the engine benchmark on b-latent (minutes on 2 cores; bench/ runs it)",
    ),
    ("--device cuda", "a GPU"),
    (
        "model init b-pixel",
        "a 1.2 GB file of a 307M-parameter model",
    ),
    ("coordinator bench --ranks 4096", "a minute-long benchmark"),
    (
        "cargo build --release --features",
        "a build with the C codecs",
    ),
    (
        "radit run radit-quickstart/job.toml",
        "the quickstart's job, already run by the first block",
    ),
];

/// The commands of one ```sh block: comments dropped, continuation lines joined.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        // A trailing comment starts at " #" outside quotes; the README's commands have no '#' in arguments.
        let code = line.find(" #").map_or(line, |i| &line[..i]).trim_end();
        if let Some(head) = code.strip_suffix('\\') {
            current.push_str(head.trim_end());
            current.push(' ');
        } else {
            current.push_str(code);
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// The README's ```sh blocks.
fn sh_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut inside: Option<String> = None;
    for line in readme.lines() {
        match (&mut inside, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => inside = Some(String::new()),
            (Some(b), l) if l.starts_with("```") => {
                blocks.push(std::mem::take(b));
                inside = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

fn substituted(command: &str) -> String {
    SUBSTITUTIONS
        .iter()
        .fold(command.to_string(), |c, (from, to)| c.replace(from, to))
}

#[test]
fn every_readme_command_runs_or_says_why_not() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let blocks = sh_blocks(&readme);
    assert!(blocks.len() >= 4, "found {} sh blocks", blocks.len());
    let dir = tempfile::tempdir().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_radit"));
    let mut script = String::from("set -euo pipefail\n");
    // What the Data section's commands read: the synthetic releases with their sources.toml, and a hold-out list.
    script.push_str("radit harmonise fixtures --out fixtures > /dev/null\n");
    script.push_str("echo '00000003_000.png' > fixtures/hold-out.txt\n");
    // The sweep the README dry-runs, at its path.
    script.push_str(&format!(
        "mkdir -p examples/sweeps && cp {} examples/sweeps/\n",
        repo().join("examples/sweeps/table8-lambda.toml").display()
    ));
    // The README's CPU training config at a tenth of its steps.
    script.push_str(&format!(
        "sed 's/^steps = 400/steps = 40/' {} > radit-tiny-cpu.toml\n",
        repo().join("examples/radit-tiny-cpu.toml").display()
    ));
    // The README's predictor at a fifth of its steps, validated and kept every 10.
    script.push_str(&format!(
        "sed 's/^steps = 100/steps = 20/; s/^every = 50/every = 10/' {} > predictor-tiny-cpu.toml\n",
        repo().join("examples/predictor-tiny-cpu.toml").display()
    ));
    let mut ran = 0;
    let mut skipped = Vec::new();
    for (b, block) in blocks.iter().enumerate() {
        for command in commands(block) {
            if let Some((_, why)) = CLUSTER_ONLY.iter().find(|(text, _)| command.contains(text)) {
                skipped.push(format!("{command}  ({why})"));
                continue;
            }
            let command = substituted(&command);
            script.push_str(&format!(
                "echo '>>> block {b}: {}' >&2\n{command}\n",
                command.replace('\'', "")
            ));
            ran += 1;
        }
    }
    // Each block's commands in order, in one shell, so a later command sees an earlier one's files.
    let script_path = dir.path().join("readme.sh");
    std::fs::write(&script_path, &script).unwrap();
    let started = std::time::Instant::now();
    let out = std::process::Command::new("bash")
        .arg(&script_path)
        .current_dir(dir.path())
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin.parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("RADIT_LOG", "warn")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "a README command failed ({}):\n{}\n--- the script ---\n{script}",
        out.status,
        err.lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!err.contains("panicked"), "{err}");
    eprintln!(
        "ran {ran} README commands in {:.0} s; not here ({}):\n  {}",
        started.elapsed().as_secs_f64(),
        skipped.len(),
        skipped.join("\n  ")
    );
    assert!(ran >= 20, "only {ran} README commands ran");
}

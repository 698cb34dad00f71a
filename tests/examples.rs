//! Every example in examples/ reads as what it claims to be: each job spec's `radit run --dry-run` prints its plan
//! (ranks and the command they run), and each train config validates.

mod common;

use common::*;

#[test]
fn every_example_job_spec_dry_runs_and_every_train_config_validates() {
    let dir = repo().join("examples");
    let mut jobs = 0;
    // The examples and their folders' (examples/vae-lora: Table 8, one job spec per row; examples/sweeps).
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            paths.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            paths.push(path);
        }
    }
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if text.lines().any(|l| l.trim() == "[job]") {
            // Their stores and weights are the cluster's: the plan alone.
            let out = run_ok(radit().args(["run", "--dry-run", "--no-check"]).arg(&path));
            let plan = stdout(&out);
            assert!(
                plan.contains("RADIT_RANK=0") || plan.contains("srun"),
                "{name}: {plan}"
            );
            // HTTPS by default for a job across nodes (the token crosses the network), plain HTTP on one node.
            let multi_node = text.lines().any(|l| {
                l.trim()
                    .strip_prefix("nodes = ")
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n > 1)
            });
            let https = plan.contains("coordinator: binds") && plan.contains("(HTTPS,");
            if text.contains("[sweep.") {
                // A sweep: every run with its settings and its own directory, and one Slurm array of them all.
                let runs = radit_run::sweep::expand(&text).unwrap().unwrap();
                assert!(
                    plan.contains(&format!("sweep of {} runs", runs.len())),
                    "{name}: {plan}"
                );
                assert!(
                    plan.contains(&format!("#SBATCH --array=0-{}", runs.len() - 1)),
                    "{name}: {plan}"
                );
                // The array script parses as bash.
                let script = plan.split_once("sbatch array script").unwrap().1;
                let script = script.split_once('\n').unwrap().1;
                let path = std::env::temp_dir()
                    .join(format!("radit-sweep-{}-{name}.sh", std::process::id()));
                std::fs::write(&path, script).unwrap();
                run_ok(std::process::Command::new("bash").arg("-n").arg(&path));
                std::fs::remove_file(&path).unwrap();
                for run in &runs {
                    assert!(
                        plan.contains(&format!("{}.toml", run.name)),
                        "{name}: {}",
                        run.name
                    );
                    assert!(
                        plan.matches(&format!("/{}\n", run.name)).count() >= 1,
                        "{name}: {}",
                        run.name
                    );
                }
            } else {
                assert_eq!(https, multi_node, "{name}: {plan}");
            }
            jobs += 1;
        } else {
            radit_jobs::train::TrainConfig::load(&path)
                .unwrap_or_else(|e| panic!("{name} does not validate: {e}"));
        }
    }
    assert!(jobs >= 15, "found {jobs} job specs");
}

/// The README's `radit train --config examples/radit-tiny-cpu.toml` after `radit quickstart`: it finds the store the
/// quickstart made, trains the tiny preset at the store's size, and checkpoints apart from the quickstart's job.
#[test]
fn the_tiny_cpu_example_trains_on_the_quickstart_store() {
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        radit()
            .current_dir(dir.path())
            .args(["quickstart", "--images", "48", "--no-train"]),
    );
    assert!(!dir.path().join("radit-quickstart/job.toml").exists());
    let example = std::fs::read_to_string(repo().join("examples/radit-tiny-cpu.toml")).unwrap();
    let short = example.replace("steps = 400", "steps = 3");
    assert_ne!(short, example, "the example's step count moved");
    let config = dir.path().join("tiny-cpu.toml");
    std::fs::write(&config, &short).unwrap();
    // `radit train --config <config>` where the quickstart was run.
    let train = || {
        radit()
            .current_dir(dir.path())
            .args(["train", "--threads", "1", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = train();
    assert!(out.status.success(), "{}", stderr(&out));
    let ours = dir.path().join("radit-quickstart/checkpoints-tiny-cpu");
    assert!(
        ours.join("step-0000000003/manifest.json").exists(),
        "no final checkpoint in {}",
        ours.display()
    );
    assert!(!dir.path().join("radit-quickstart/checkpoints").exists());

    // The same checkpoints with the preset's own size (16) are refused as another model's; on fresh ones, the
    // model against the 32x32 store is named at start, with the key that fixes it.
    let sixteen = short.replace("input_size = 32\n", "");
    std::fs::write(&config, &sixteen).unwrap();
    let out = train();
    assert!(
        stderr(&out).contains("written for another model"),
        "{}",
        stderr(&out)
    );
    std::fs::write(
        &config,
        sixteen.replace("checkpoints-tiny-cpu", "checkpoints-sixteen"),
    )
    .unwrap();
    let out = train();
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("model.input_size") && err.contains("1x32x32"),
        "{err}"
    );

    // As a job file in a folder of its own, its store given relative to it: `radit run --dry-run` opens the
    // store and names the same mismatch before any rank starts (on Slurm: before the queue), and passes once fixed.
    let jobs = dir.path().join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let job_text = |config: &str| {
        format!(
            "{}\n[job]\nname = \"tiny\"\nrun_dir = \"run\"\n[resources]\ncpu_ranks = 2\n[launcher]\nkind = \"local\"\n",
            config
                .replace(
                    "\"radit-quickstart/store\"",
                    "\"../radit-quickstart/store\""
                )
                .replace(
                    "radit-quickstart/checkpoints-",
                    "../radit-quickstart/job-checkpoints-"
                )
        )
    };
    let job = jobs.join("tiny-job.toml");
    std::fs::write(&job, job_text(&sixteen)).unwrap();
    let err = fails_with_usage(
        radit().args(["run", "--dry-run"]).arg(&job),
        "checked before launch, the ranks would fail at their start",
    );
    assert!(
        err.contains("model.input_size") && err.contains("1x32x32"),
        "{err}"
    );
    assert!(!jobs.join("run").exists(), "nothing started");
    std::fs::write(&job, job_text(&short)).unwrap();
    let plan = stdout(&run_ok(radit().args(["run", "--dry-run"]).arg(&job)));
    assert!(plan.contains("checked before launch:\n  store "), "{plan}");
    assert!(
        plan.contains("1x32x32 samples as the model takes them"),
        "{plan}"
    );
}

#[test]
fn input_size_goes_with_a_preset_only() {
    let text = "[data]\nurl = \"x\"\n[model]\ninput_size = 32\n[model.config]\nin_channels = 1\ninput_size = 16\n\
                patch_size = 4\nhidden = 64\ndepth = 2\nheads = 4\n[train]\nsteps = 1\nglobal_batch = 8\n";
    let cfg: radit_jobs::train::TrainConfig = toml::from_str(text).unwrap();
    let err = cfg.validated().unwrap_err();
    assert_eq!(err.field, "model.input_size", "{err:?}");
}

//! Every example in examples/ reads as what it claims to be: each job spec's `radit run --dry-run` prints its plan
//! (ranks and the command they run), and each train config validates.

mod common;

use common::*;

#[test]
fn every_example_job_spec_dry_runs_and_every_train_config_validates() {
    let dir = repo().join("examples");
    let mut jobs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".toml") {
            continue;
        }
        if name.ends_with("-job.toml") {
            let out = run_ok(radit().args(["run", "--dry-run"]).arg(&path));
            let plan = stdout(&out);
            assert!(
                plan.contains("RADIT_RANK=0") || plan.contains("srun"),
                "{name}: {plan}"
            );
            jobs += 1;
        } else {
            radit_trainer::train::TrainConfig::load(&path)
                .unwrap_or_else(|e| panic!("{name} does not validate: {e}"));
        }
    }
    assert!(jobs >= 6, "found {jobs} job specs");
}

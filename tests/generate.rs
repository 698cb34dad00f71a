//! `radit generate`: matched conditional sampling, one process and as a `[job] kind = "generate"` job under
//! `radit run` (2 ranks under the local launcher, mpirun and the single-host Slurm, one killed between writing a unit
//! and committing it), with the same files either way; each sample conditioned on its profile row and seeded by it (a `radit sample` of that profile with that
//! noise draws the same image); bad input named; and the samples scored against the store by `radit eval` (in tests/data_cli.rs, on a
//! reference set).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

/// Every file under `dir/images`, by name.
fn images(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir.join("images"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

const SETTINGS: [&str; 10] = [
    "--split",
    "train",
    "--limit",
    "20",
    "--unit-profiles",
    "3",
    "--batch",
    "2",
    "--seed",
    "11",
];

/// Where a job's ranks are started: radit's local launcher, mpirun, or the single-host Slurm (sbatch, then srun in
/// the allocation).
#[derive(Clone, Copy, Debug)]
enum Launcher {
    Local,
    Mpirun,
    Slurm,
}

impl Launcher {
    fn toml(self) -> &'static str {
        match self {
            Launcher::Local => "[launcher]\nkind = \"local\"\n",
            Launcher::Mpirun => {
                "[launcher]\nkind = \"mpirun\"\n\
                 mpirun_args = [\"--allow-run-as-root\", \"--oversubscribe\", \"--bind-to\", \"none\"]\n"
            }
            Launcher::Slurm => {
                "[launcher]\nkind = \"slurm\"\n[launcher.slurm]\ntime_limit = \"00:10:00\"\npoll_seconds = 0.5\n"
            }
        }
    }

    /// `radit run JOB` for this launcher, with `env` (which reaches the ranks: mpirun on one host and sbatch's
    /// default --export=ALL pass the environment on).
    fn run(self, job: &Path, env: &[(&str, &str)]) -> std::process::Output {
        let mut cmd = radit();
        cmd.arg("run")
            .arg(job)
            .env("RADIT_NO_PROGRESS_BAR", "1")
            .envs(env.iter().copied());
        if let Launcher::Slurm = self {
            cmd.env("SLURM_CONF", local_slurm());
        }
        run_ok(&mut cmd)
    }

    /// What the run's supervisor said: `radit run`'s stderr, and under Slurm the batch job's output file too (the
    /// supervisor runs inside the allocation).
    fn said(self, run: &std::process::Output, dir: &Path) -> String {
        let mut text = stderr(run);
        if let Launcher::Slurm = self {
            for e in std::fs::read_dir(dir.join("run")).unwrap() {
                let p = e.unwrap().path();
                if p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("slurm-")
                {
                    text += &std::fs::read_to_string(&p).unwrap();
                }
            }
        }
        text
    }
}

/// A job spec of `kind` with its work `section` (TOML) on 2 CPU ranks started by `launcher`, one relaunch
/// allowed, written to `dir/job.toml`.
fn two_rank_job(dir: &Path, kind: &str, section: &str, launcher: Launcher) -> PathBuf {
    let launcher = launcher.toml();
    write_job(
        dir,
        &format!(
            r#"
[job]
name = "{kind}"
kind = "{kind}"
run_dir = "run"

{section}

[resources]
cpu_ranks = 2
threads_per_rank = 1

{launcher}

[restart]
max_restarts = 1
heartbeat_seconds = 0.5

[monitoring]
progress_seconds = 0.5
"#
        ),
    )
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_generate_job_resumes_after_a_rank_dies_mid_unit_and_writes_what_one_process_writes() {
    generate_job_with_a_dead_rank(Launcher::Local);
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn under_mpirun_a_generate_job_with_a_dead_rank_writes_what_one_process_writes() {
    generate_job_with_a_dead_rank(Launcher::Mpirun);
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn under_slurm_a_generate_job_with_a_dead_rank_writes_what_one_process_writes() {
    generate_job_with_a_dead_rank(Launcher::Slurm);
}

fn generate_job_with_a_dead_rank(launcher: Launcher) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 48, "40x48", 8, &[]);
    let w = tiny_weights(d);
    let single = d.join("single");
    run_ok(&mut generate_cmd(&w, &store, &single, &SETTINGS));

    let out = d.join("job-out");
    let job = two_rank_job(
        d,
        "generate",
        &format!(
            "[generate]\nweights = \"{}\"\nprofiles = \"{}\"\nsplit = \"train\"\nlimit = 20\nunit_profiles = 3\n\
             batch = 2\nseed = 11\nout = \"{}\"",
            w.display(),
            store.display(),
            out.display()
        ),
        launcher,
    );
    // Rank 1 writes its second unit's images and dies before committing it; the relaunch redoes that unit.
    let run = launcher.run(
        &job,
        &[
            ("RADIT_FAULT_CRASH_BEFORE_COMMIT", "1:2"),
            ("RADIT_FAULT_ONLY_GENERATION", "1"),
        ],
    );
    let err = launcher.said(&run, d);
    assert!(err.contains("restart 1/1"), "{err}");
    // 7 units of 3 profiles over 2 ranks: the slower rank has 4.
    assert!(
        err.contains("step 4/4"),
        "the progress line reaches the last step: {err}"
    );
    let journal = std::fs::read_dir(out.join(".generate/journal"))
        .unwrap()
        .count();
    assert_eq!(journal, 7, "one record per unit");
    // The same 20 files, byte for byte, and the same table, as the one-process run: nothing drawn twice,
    // nothing skipped, and no dependence on the ranks.
    let (a, b) = (images(&single), images(&out));
    assert_eq!(a.len(), 20);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a == b, "the job's images differ from one process's");
    let csv = std::fs::read_to_string(out.join("samples.csv")).unwrap();
    assert_eq!(
        csv,
        std::fs::read_to_string(single.join("samples.csv")).unwrap()
    );
    assert_eq!(csv.lines().count(), 21);

    // Run again: finished, nothing rewritten.
    let again = launcher.run(&job, &[]);
    let said = launcher.said(&again, d);
    assert!(
        said.contains("all 2 ranks finished"),
        "{launcher:?}: {said}"
    );
    assert!(images(&out) == b);
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn each_sample_is_its_profile_and_its_row_seed_and_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 48, "40x48", 8, &[]);
    let w = tiny_weights(d);
    // Euler: a batch's samples do not share adaptive steps, so one sample alone must come out the same.
    let euler = ["--solver", "euler", "--steps", "6"];
    let out = d.join("gen");
    run_ok(&mut generate_cmd(
        &w,
        &store,
        &out,
        &[&SETTINGS[..], &euler[..], &["--per-profile", "2"]].concat(),
    ));
    let csv = std::fs::read_to_string(out.join("samples.csv")).unwrap();
    let mut rows = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = rows.headers().unwrap().iter().map(str::to_string).collect();
    let records: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 40);
    // The profiles are the split's rows in order, each with its image id.
    let ids = run_ok(
        python()
            .arg("-c")
            .arg("import sys, zarr; print('\\n'.join(str(i) for i in zarr.open_group(sys.argv[1], mode='r')['train/image_id'][:20]))")
            .arg(&store),
    );
    let want: Vec<String> = stdout(&ids)
        .lines()
        .flat_map(|l| [l.to_string(), l.to_string()])
        .collect();
    let got: Vec<String> = records.iter().map(|r| r[1].to_string()).collect();
    assert_eq!(got, want);
    // Row 5's second sample (noise index 5 x 2 + 1) is `radit sample` of row 5's profile with noise index 11:
    // the sample with index 11 of 12 drawn under that profile.
    let r = &records[11];
    assert_eq!((&r[2], &r[3]), ("5", "1"));
    let set: Vec<String> = header[4..header.len() - 1]
        .iter()
        .zip(r.iter().skip(4))
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let alone = d.join("alone");
    let mut sample = radit();
    sample
        .args(["sample", "--weights"])
        .arg(&w)
        .arg("--out")
        .arg(&alone)
        .args(["-n", "12", "--seed", "11", "--set", &set.join(",")])
        .args(euler);
    if !r[header.len() - 1].is_empty() {
        sample.args(["--age", &r[header.len() - 1]]);
    }
    run_ok(&mut sample);
    let decode = |p: &Path| {
        radit_sharding::image::decode_png(&std::fs::read(p).unwrap())
            .unwrap()
            .0
            .pixels
    };
    let (a, b) = (
        decode(&out.join(&r[0])),
        decode(&alone.join("sample_0011.png")),
    );
    let worst = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(
        worst <= 2,
        "row 5 sample 1 differs from `radit sample` of its profile by {worst} levels"
    );

    // Bad input: an id the split lacks, and an output of another seed.
    std::fs::write(d.join("ids.txt"), "synth-0000001\nno-such-image\n").unwrap();
    let ids_arg = d.join("ids.txt");
    let err = fails_with_usage(
        &mut generate_cmd(
            &w,
            &store,
            &d.join("other"),
            &["--split", "train", "--ids", ids_arg.to_str().unwrap()],
        ),
        "no-such-image",
    );
    assert!(err.contains("ids.txt"), "{err}");
    let err = fails_with_usage(
        &mut generate_cmd(
            &w,
            &store,
            &out,
            &[&SETTINGS[..8], &["--seed", "12"]].concat(),
        ),
        "overwrite",
    );
    assert!(err.contains("gen"), "{err}");
    run_ok(&mut generate_cmd(
        &w,
        &store,
        &out,
        &[&SETTINGS[..8], &["--seed", "12", "--overwrite"]].concat(),
    ));
    assert_eq!(images(&out).len(), 20);

    // Out of memory in the second unit's sampling (a real allocator failure, through tch's infallible form): the
    // report and exit 2, not a panic; the first unit stays committed.
    let oom_out = d.join("oom");
    fails_out_of_memory(
        generate_cmd(&w, &store, &oom_out, &SETTINGS).env("RADIT_FAULT_OOM", "0:2"),
        &[
            "out of memory in unit 1 on cpu: ",
            "generate.batch 2",
            "lower generate.batch",
        ],
    );
    assert_eq!(
        images(&oom_out).len(),
        3,
        "the first unit's samples are kept"
    );
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_features_job_resumes_after_a_rank_dies_and_a_second_request_is_answered_from_the_cache() {
    features_job_with_a_dead_rank(Launcher::Local);
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn under_mpirun_a_features_job_with_a_dead_rank_writes_what_one_process_writes() {
    features_job_with_a_dead_rank(Launcher::Mpirun);
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn under_slurm_a_features_job_with_a_dead_rank_writes_what_one_process_writes() {
    features_job_with_a_dead_rank(Launcher::Slurm);
}

fn features_job_with_a_dead_rank(launcher: Launcher) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 64, "40x48", 8, &[]);
    let net = feature_net(d);
    let features = |out: &Path, cache: &Path| {
        let mut cmd = radit();
        cmd.args([
            "eval",
            "features",
            "--split",
            "train",
            "--input-size",
            "32",
            "--device",
            "cpu",
        ])
        .arg("--store")
        .arg(&store)
        .arg("--net")
        .arg(&net)
        .arg("--cache")
        .arg(cache)
        .arg("--out")
        .arg(out);
        cmd
    };
    let single = d.join("single.npy");
    run_ok(&mut features(&single, &d.join("cache-single")));

    let out = d.join("job.npy");
    let job = two_rank_job(
        d,
        "features",
        &format!(
            "[features]\nnet = \"{}\"\ninput_size = 32\nstore = \"{}\"\nsplit = \"train\"\nout = \"{}\"\ncache = \"{}\"",
            net.display(),
            store.display(),
            out.display(),
            d.join("cache").display()
        ),
        launcher,
    );
    // Rank 0 writes its second shard's ids and dies before the features part; the relaunch redoes that shard.
    let run = launcher.run(
        &job,
        &[
            ("RADIT_FAULT_CRASH_BEFORE_COMMIT", "0:2"),
            ("RADIT_FAULT_ONLY_GENERATION", "1"),
        ],
    );
    let said = launcher.said(&run, d);
    assert!(said.contains("restart 1/1"), "{launcher:?}: {said}");
    // The same features and ids as one process, and the parts are gone.
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&single).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(d.join("job.ids.txt")).unwrap(),
        std::fs::read_to_string(d.join("single.ids.txt")).unwrap()
    );
    assert!(!d.join("job.parts").exists());
    // The same request again (store, split, network and preprocessing) is answered from the cache.
    let again = d.join("again.npy");
    let cached = run_ok(&mut features(&again, &d.join("cache")));
    let summary = stderr(&cached);
    assert!(summary.contains("\"cached\":true"), "{summary}");
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&single).unwrap()
    );
}

/// `radit eval recon` (Table 2's reconstructions) as a `[job] kind = "recon"` job on 2 ranks with rank 1 dying
/// between writing its second shard's PNGs and committing it: the relaunch redoes that shard, and the images and
/// tables equal one process's byte for byte. Each image's PSNR and SSIM are `radit_eval::image`'s of the store's
/// image and its reconstruction's PNG, both on [0, 1]; the output is a samples directory that `radit eval features
/// --samples` embeds (rFD).
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_recon_job_resumes_after_a_rank_dies_mid_shard_and_scores_each_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 48, "40x48", 8, &[]);
    let w = d.join("tiny-ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&w));
    let single = d.join("single");
    run_ok(
        radit()
            .args([
                "eval",
                "recon",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--split",
                "train",
            ])
            .args(["--limit", "20", "--batch", "3", "--store"])
            .arg(&store)
            .arg("--weights")
            .arg(&w)
            .arg("--out")
            .arg(&single),
    );
    let out = d.join("job-out");
    let job = two_rank_job(
        d,
        "recon",
        &format!(
            "[recon]\nstore = \"{}\"\nsplit = \"train\"\nlimit = 20\nbatch = 3\nweights = \"{}\"\nout = \"{}\"",
            store.display(),
            w.display(),
            out.display()
        ),
        Launcher::Local,
    );
    let run = Launcher::Local.run(
        &job,
        &[
            ("RADIT_FAULT_CRASH_BEFORE_COMMIT", "1:2"),
            ("RADIT_FAULT_ONLY_GENERATION", "1"),
        ],
    );
    let err = stderr(&run);
    assert!(err.contains("restart 1/1"), "{err}");
    // 20 images in shards of 8: three shards, committed once each.
    let journal = std::fs::read_dir(out.join(".recon/journal"))
        .unwrap()
        .count();
    assert_eq!(journal, 3);
    let (a, b) = (images(&single), images(&out));
    assert_eq!(a.len(), 20);
    assert!(
        a == b,
        "the job's reconstructions differ from one process's"
    );
    for table in ["recon.csv", "samples.csv"] {
        let text = std::fs::read_to_string(out.join(table)).unwrap();
        assert_eq!(
            text,
            std::fs::read_to_string(single.join(table)).unwrap(),
            "{table}"
        );
        assert_eq!(text.lines().count(), 21, "{table}");
    }
    // The metrics of the first image, recomputed from the store and the PNG.
    let reader = radit_sharding::reader::StoreReader::open(
        radit_sharding::store::Storage::open_existing(store.to_str().unwrap()).unwrap(),
    )
    .unwrap();
    let shard = reader
        .read_shard(radit_sharding::split::Split::Train, 0)
        .unwrap();
    let original: Vec<f64> = shard.images[..256]
        .iter()
        .map(|&v| f64::from(v) / 65535.0)
        .collect();
    let png = std::fs::read(out.join("images/train-00000000-0.png")).unwrap();
    let (img, _) = radit_sharding::image::decode_png(&png).unwrap();
    let recon: Vec<f64> = img.pixels.iter().map(|&v| f64::from(v) / 65535.0).collect();
    let psnr = radit_eval::image::psnr(&original, &recon, 16, 16, 1.0).unwrap();
    let ssim = radit_eval::image::ssim(&original, &recon, 16, 16, 1.0).unwrap();
    let csv = std::fs::read_to_string(out.join("recon.csv")).unwrap();
    let first: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(first[1], shard.image_ids[0]);
    let (p, s): (f64, f64) = (first[3].parse().unwrap(), first[4].parse().unwrap());
    assert!(
        (p - psnr).abs() < 1e-9 && (s - ssim).abs() < 1e-9,
        "{first:?} vs {psnr} {ssim}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("recon.json")).unwrap()).unwrap();
    assert_eq!(report["summary"]["images"], 20);
    assert!(report["summary"]["ssim_mean"].as_f64().unwrap() < 1.0);
    // A samples directory: its reconstructions embed like generated samples.
    let net = d.join("net");
    run_ok(radit().args(["eval", "random-dinov2", "--out"]).arg(&net));
    let npy = d.join("recon.npy");
    run_ok(
        radit()
            .args(["eval", "features", "--device", "cpu", "--samples"])
            .arg(&out)
            .arg("--net")
            .arg(&net)
            .arg("--out")
            .arg(&npy),
    );
    let ids = std::fs::read_to_string(npy.with_extension("ids.txt")).unwrap();
    assert_eq!(ids.lines().count(), 20);
    assert_eq!(ids.lines().next().unwrap(), shard.image_ids[0]);
}

/// Every file under `dir`, by path relative to it.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// What the edit tests edit with: a tiny store, the PyTorch twin's tiny RadiT with every layer active (so the
/// metadata moves the velocity) and a tiny SCM trained briefly on the store.
fn edit_fixture(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let store = tiny_store(d, 48, "40x48", 8, &[]);
    let (w, scm) = (perturbed_twin(d, "tiny"), tiny_scm(d, &store));
    (store, w, scm)
}

/// The PyTorch twin's `preset` with every layer active, exported under `d/twin`; its weights file.
fn perturbed_twin(d: &Path, preset: &str) -> PathBuf {
    let twin = d.join("twin");
    run_ok(
        python()
            .arg(repo().join("tests/python/radit_twin.py"))
            .args(["export", "--preset", preset, "--perturb", "--out"])
            .arg(&twin),
    );
    twin.join("weights.safetensors")
}

/// A tiny SCM trained for a few steps on `store`.
fn tiny_scm(d: &Path, store: &Path) -> PathBuf {
    let scm = d.join("scm.safetensors");
    run_ok(
        radit()
            .args([
                "scm", "train", "--preset", "tiny", "--steps", "10", "--batch", "32", "--store",
            ])
            .arg(store)
            .arg("--out")
            .arg(&scm),
    );
    scm
}

fn edit(w: &Path, store: &Path, scm: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = radit();
    cmd.args(["edit", "--threads", "1", "--split", "train", "--weights"])
        .arg(w)
        .arg("--store")
        .arg(store)
        .arg("--scm")
        .arg(scm)
        .arg("--out")
        .arg(out)
        .args(extra);
    cmd
}

/// `radit edit` as a 2-rank job under `radit run`, rank 1 killed between writing a unit's PNGs and committing
/// it: the relaunch redoes that unit, and the edits and their table are one process's, byte for byte.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn an_edit_job_resumes_after_a_rank_dies_mid_unit_and_writes_what_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, w, scm) = edit_fixture(d);
    let settings = [
        "--patients",
        "7",
        "--batch",
        "3",
        "--seed",
        "3",
        "--interventions",
        "sex,age,view",
    ];
    let single = d.join("single");
    run_ok(&mut edit(&w, &store, &scm, &single, &settings));
    let out = d.join("job-out");
    let job = two_rank_job(
        d,
        "edit",
        &format!(
            "[edit]\nweights = \"{}\"\nstore = \"{}\"\nsplit = \"train\"\nscm = \"{}\"\npatients = 7\nbatch = 3\n\
             seed = 3\ninterventions = [\"sex\", \"age\", \"view\"]\nout = \"{}\"",
            w.display(),
            store.display(),
            scm.display(),
            out.display()
        ),
        Launcher::Local,
    );
    let run = Launcher::Local.run(
        &job,
        &[
            ("RADIT_FAULT_CRASH_BEFORE_COMMIT", "1:2"),
            ("RADIT_FAULT_ONLY_GENERATION", "1"),
        ],
    );
    let err = stderr(&run);
    assert!(err.contains("restart 1/1"), "{err}");
    // 7 patients in batches of 3 for 3 interventions: 9 units, one record each.
    assert_eq!(
        std::fs::read_dir(out.join(".edit/journal"))
            .unwrap()
            .count(),
        9
    );
    let (a, b) = (tree(&single.join("images")), tree(&out.join("images")));
    assert_eq!(
        a.len(),
        7 * 3 + 7,
        "an edit per patient and intervention, and each original"
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a == b, "the job's edits differ from one process's");
    let csv = std::fs::read_to_string(out.join("edits.csv")).unwrap();
    assert_eq!(
        csv,
        std::fs::read_to_string(single.join("edits.csv")).unwrap()
    );
    assert_eq!(csv.lines().count(), 1 + 21);
}

/// The edits mean what they say: `none` (the patient's own profile) returns each image to the solver's
/// tolerance, a sex edit changes it and its table row carries the edited and the factual profile; the
/// from-noise baseline solves a fixed noise under both; a predictor scores the edits against their edited
/// profiles, and `eval identity` finds the round trip identical and the sex edit not.
#[test]
fn edits_follow_their_profiles_and_the_round_trip_returns_the_image() {
    use radit_models::predictor::{PredictorConfig, Variant};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, w, scm) = edit_fixture(d);
    let out = d.join("edits");
    let run = run_ok(&mut edit(
        &w,
        &store,
        &scm,
        &out,
        &[
            "--patients",
            "5",
            "--batch",
            "5",
            "--interventions",
            "none,sex",
        ],
    ));
    assert!(stdout(&run).contains("10 written here"), "{}", stdout(&run));
    // The rank's summary, on stderr.
    let said = stderr(&run);
    let summary: serde_json::Value =
        serde_json::from_str(said.lines().find(|l| l.starts_with("{\"rank\"")).unwrap()).unwrap();
    // The PyTorch twin redoes the same edits (torchdiffeq's dopri5, the same batches) from the originals and the
    // table's profiles: the same model evaluations and the same images to a level or two of 65,536.
    let twin: serde_json::Value = serde_json::from_str(&stdout(&run_ok(
        python()
            .arg(repo().join("tests/python/radit_twin.py"))
            .args(["bench-edit", "--batch", "5", "--threads", "1", "--dir"])
            .arg(w.parent().unwrap())
            .arg("--edits")
            .arg(&out),
    )))
    .unwrap();
    assert_eq!(
        twin["nfe_per_image"], summary["nfe_per_image"],
        "{twin} vs {summary}"
    );
    assert!(
        twin["max_level_difference"].as_u64().unwrap() <= 2,
        "{twin}"
    );
    let levels = |p: &Path| {
        radit_sharding::image::decode_png(&std::fs::read(p).unwrap())
            .unwrap()
            .0
            .pixels
    };
    let mut reader = csv::Reader::from_path(out.join("edits.csv")).unwrap();
    let header = reader.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|c| c == name).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 10);
    let (mut moved, mut round_trip) = (0, 0);
    for r in &rows {
        let (edited, original) = (
            levels(&out.join(&r[col("file")])),
            levels(&out.join(&r[col("original")])),
        );
        let worst = edited
            .iter()
            .zip(&original)
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).unsigned_abs())
            .max()
            .unwrap();
        match &r[col("intervention")] {
            // dopri5 at 1e-5 there and back: within a few hundredths of a percent of the range.
            "none" => {
                round_trip = round_trip.max(worst);
                assert!(
                    worst <= 40,
                    "the round trip moved {} by {worst} levels",
                    &r[col("file")]
                );
            }
            "sex" => {
                moved = moved.max(worst);
                assert_ne!(&r[col("from")], &r[col("to")]);
                assert_eq!(&r[col("sex")], &r[col("to")]);
                assert_eq!(&r[col("factual_sex")], &r[col("from")]);
            }
            other => panic!("{other}"),
        }
    }
    assert!(
        moved > 10 * round_trip.max(1),
        "the sex edits changed the images by at most {moved} levels, the round trip by {round_trip}"
    );

    // The baseline: the factual sample of a fixed noise and its counterfactual, no store image.
    let noise = d.join("noise");
    run_ok(&mut edit(
        &w,
        &store,
        &scm,
        &noise,
        &["--patients", "3", "--interventions", "sex", "--from-noise"],
    ));
    let first = std::fs::read_to_string(noise.join("edits.csv")).unwrap();
    let row = first.lines().nth(1).unwrap().split(',').collect::<Vec<_>>();
    let stored = out.join(row[1]);
    if stored.exists() {
        assert_ne!(
            levels(&noise.join(row[1])),
            levels(&stored),
            "from noise, the original is a sample"
        );
    }

    // A predictor (random attention pooling over a random Rad-DINO stand-in) scores the edits.
    let snapshot = d.join("rad-dino");
    radit_models::features::write_random_snapshot(&snapshot, 2).unwrap();
    let mut cfg = PredictorConfig::new(Variant::AttentionPool, Some(snapshot.clone()), 16);
    cfg.layers = vec![1, 2];
    let vs = radit_models::tch::nn::VarStore::new(radit_models::tch::Device::Cpu);
    radit_models::predictor::Predictor::new(&vs.root(), &cfg).unwrap();
    let predictor = d.join("predictor.safetensors");
    let arch = radit_models::network::Architecture::Predictor(cfg);
    arch.save_trained(&vs.variables().into_iter().collect(), &[], &predictor)
        .unwrap();
    let scored = stdout(&run_ok(
        radit()
            .args(["predictors", "eval", "--device", "cpu", "--weights"])
            .arg(&predictor)
            .arg("--edits")
            .arg(&out)
            .arg("--out")
            .arg(d.join("scores"))
            .arg("--csv")
            .arg(d.join("table.csv")),
    ));
    let scored: serde_json::Value = serde_json::from_str(&scored).unwrap();
    assert_eq!(scored["images"], 10);
    let sex = scored["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["variable"] == "sex")
        .unwrap();
    assert_eq!(sex["n"], 10, "{sex}");
    let table = std::fs::read_to_string(d.join("table.csv")).unwrap();
    assert_eq!(table.lines().count(), 2, "{table}");

    // Identity: the round trip is the image again; the sex edits are not.
    let id = d.join("identity");
    run_ok(
        radit()
            .args([
                "eval", "identity", "--device", "cpu", "--split", "train", "--pairs", "12",
                "--edits",
            ])
            .arg(&out)
            .arg("--perceptual-net")
            .arg(&snapshot)
            .arg("--predictor")
            .arg(&predictor)
            .arg("--store")
            .arg(&store)
            .arg("--out")
            .arg(&id),
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(id.join("identity.json")).unwrap()).unwrap();
    let by = |name: &str| {
        report["interventions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["intervention"] == name)
            .unwrap()
            .clone()
    };
    let (none, sex) = (by("none"), by("sex"));
    assert!(none["ssim"]["mean"].as_f64().unwrap() > 0.999, "{none}");
    assert!(
        none["attribute_cosine"]["mean"].as_f64().unwrap() > 0.999,
        "{none}"
    );
    assert!(
        sex["ssim"]["mean"].as_f64().unwrap() < none["ssim"]["mean"].as_f64().unwrap(),
        "{sex}"
    );
    assert!(
        sex["lpips"]["mean"].as_f64().unwrap() > none["lpips"]["mean"].as_f64().unwrap(),
        "{sex}"
    );
    assert_eq!(report["reference"]["pairs"], 12);
    assert_eq!(
        std::fs::read_to_string(id.join("identity.csv"))
            .unwrap()
            .lines()
            .count(),
        11
    );
}

/// A latent model edits the store's latents (the encoder's means, standardised with the store's statistics) and
/// the decoder makes the images: the round trip is the decoder's image of the stored latent, a sex edit is not,
/// and an edit job of a latent model without a decoder is refused naming `edit.decoder`.
#[test]
fn a_latent_model_edits_the_stores_latents_and_decodes_them() {
    use radit_models::autoencoder::{DecoderConfig, LatentDecoder, store_statistics};
    use radit_models::tch::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 48, "40x48", 8, &[]);
    let ae = d.join("ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&ae));
    run_ok(
        radit()
            .args([
                "encode",
                "--threads",
                "1",
                "--store",
                store.to_str().unwrap(),
                "--weights",
            ])
            .arg(&ae),
    );
    let (w, scm) = (perturbed_twin(d, "tiny-latent"), tiny_scm(d, &store));
    let out = d.join("edits");
    let settings = [
        "--patients",
        "4",
        "--batch",
        "4",
        "--interventions",
        "none,sex",
    ];
    let refused = edit(&w, &store, &scm, &out, &settings).output().unwrap();
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("edit.decoder"),
        "{}",
        stderr(&refused)
    );
    run_ok(
        edit(&w, &store, &scm, &out, &settings)
            .arg("--decoder")
            .arg(&ae),
    );

    // The stored latents of the edited rows, decoded by the library.
    let reader = radit_sharding::reader::StoreReader::open(
        radit_sharding::store::Storage::open_existing(store.to_str().unwrap()).unwrap(),
    )
    .unwrap();
    let split = radit_sharding::split::Split::Train;
    let latents = reader.latents(split).unwrap().unwrap();
    let decoder = LatentDecoder::load(
        &DecoderConfig {
            weights: ae.clone(),
            autoencoder: "auto".into(),
            batch: 4,
        },
        Some(store_statistics(store.to_str().unwrap()).unwrap()),
        Device::Cpu,
    )
    .unwrap();
    let levels = |p: &Path| {
        radit_sharding::image::decode_png(&std::fs::read(p).unwrap())
            .unwrap()
            .0
    };
    let mut reader_csv = csv::Reader::from_path(out.join("edits.csv")).unwrap();
    let header = reader_csv.headers().unwrap().clone();
    let col = |name: &str| header.iter().position(|c| c == name).unwrap();
    let (mut round_trip, mut moved) = (0u32, 0u32);
    for r in reader_csv.records().map(Result::unwrap) {
        let row: u64 = r[col("row")].parse().unwrap();
        let shard = reader.read_latent_shard(split, row / 8, &latents).unwrap();
        let per: usize = latents.sample_shape.iter().product();
        let i = (row % 8) as usize;
        let [c, h, wd] = latents.sample_shape.map(|v| v as i64);
        let z = Tensor::from_slice(&shard.latents[i * per..(i + 1) * per]).view([1, c, h, wd]);
        let want = radit_jobs::generate::to_u16(&decoder.decode(&z).unwrap()).unwrap();
        let got = levels(&out.join(&r[col("file")]));
        assert_eq!(
            (got.width, got.height),
            (16, 16),
            "the decoder's images at the store's side"
        );
        let worst = got
            .pixels
            .iter()
            .zip(&want)
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).unsigned_abs())
            .max()
            .unwrap();
        match &r[col("intervention")] {
            "none" => round_trip = round_trip.max(worst),
            _ => moved = moved.max(worst),
        }
        // The original is the store's image.
        assert_eq!(levels(&out.join(&r[col("original")])).width, 16);
    }
    assert!(
        round_trip <= 40,
        "the round trip's image is {round_trip} levels from the stored latent's"
    );
    assert!(
        moved > 10 * round_trip.max(1),
        "sex edits moved {moved} levels, the round trip {round_trip}"
    );
}

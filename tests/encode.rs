//! `radit encode`: a store's images to `<split>/latents` with the autoencoder's encoder, as a job under `radit run`
//! (2 CPU ranks, a rank killed between writing a shard and committing it) and as one process; checked against the
//! PyTorch twin reading the store with zarr-python. Then the latent quickstart path of the examples: encode, train
//! tiny-latent on 2 ranks, decoded samples. And bad input, by name.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use radit_sharding::manifest::Manifest;

/// The twin's tiny weights (original naming) in `dir/twin`.
fn twin_weights(dir: &Path) -> PathBuf {
    let twin = dir.join("twin");
    run_ok(
        python()
            .arg(repo().join("tests/python/flux2_ae_twin.py"))
            .arg("reference")
            .arg(&twin),
    );
    twin.join("weights_bfl.safetensors")
}

fn manifest(store: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap()
}

/// The encode summaries (JSON lines) in a rank's log or a command's stderr.
fn summaries(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| l.starts_with("{\"rank\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The twin re-encodes the store's images and compares with what radit stored (zarr-python reads both).
fn check_with_twin(store: &Path, weights: &Path) {
    let out = run_ok(
        python()
            .arg(repo().join("tests/python/flux2_ae_twin.py"))
            .arg("check-store")
            .arg(store)
            .arg(weights),
    );
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let m = manifest(store);
    let splits = report["splits"].as_object().unwrap();
    assert_eq!(splits.len(), 3, "{report}");
    for (split, r) in splits {
        let rows = m
            .counts
            .splits
            .iter()
            .find(|(s, _)| s.name() == split)
            .unwrap()
            .1
            .images;
        assert_eq!(r["shape"], serde_json::json!([rows, 4, 8, 8]), "{split}");
        // One shard per 8 rows, inner chunks of one row spanning C, H and W: what the loader reads.
        assert_eq!(r["shards"], serde_json::json!([8, 4, 8, 8]), "{split}");
        assert_eq!(r["chunks"], serde_json::json!([1, 4, 8, 8]), "{split}");
        // float16 rounding (2^-11 relative) and nothing else.
        let diff = r["max_rel_diff"].as_f64().unwrap();
        assert!(diff < 1e-3, "{split}: {diff}");
        // Every split carries the training statistics.
        for key in ["channel_mean", "channel_std"] {
            let attrs = r["attrs"][key].as_array().unwrap();
            let listed = report["latents"][key].as_array().unwrap();
            for (a, b) in attrs.iter().zip(listed) {
                assert!(
                    (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-6,
                    "{split} {key}"
                );
            }
        }
    }
    let entry = m.latents.expect("the manifest lists the latents");
    for c in 0..4 {
        let want_mean = report["numpy_mean"][c].as_f64().unwrap();
        let want_std = report["numpy_std"][c].as_f64().unwrap();
        let got_mean = f64::from(entry.channel_mean[c]);
        let got_std = f64::from(entry.channel_std[c]);
        assert!(
            (got_mean - want_mean).abs() < 1e-5 * (1.0 + want_mean.abs()),
            "c{c}"
        );
        assert!((got_std - want_std).abs() < 1e-5 * want_std, "c{c}");
    }
}

/// An encode job of `store` on 2 CPU ranks with one restart; `restart` is appended to its [restart].
fn encode_job(dir: &Path, store: &Path, weights: &Path, restart: &str) -> PathBuf {
    let text = format!(
        r#"
[job]
name = "encode"
kind = "encode"
run_dir = "run"

[encode]
store = "{}"
weights = "{}"
autoencoder = "tiny"
batch = 3

[resources]
cpu_ranks = 2
threads_per_rank = 1

[launcher]
kind = "local"

[restart]
max_restarts = 1
heartbeat_seconds = 0.5
{}

[monitoring]
progress_seconds = 0.5
"#,
        store.display(),
        weights.display(),
        restart
    );
    write_job(dir, &text)
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn an_encode_job_resumes_after_a_rank_dies_mid_shard_and_matches_the_pytorch_twin() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny_store(dir.path(), 100, "40x48", 8, &[]);
    let weights = twin_weights(dir.path());
    let job = encode_job(dir.path(), &store, &weights, "");
    let shards: u64 = manifest(&store)
        .counts
        .splits
        .values()
        .map(|s| s.images.div_ceil(8))
        .sum();

    // Rank 1 writes its second shard's latents and dies before committing them; the relaunch resumes.
    let out = run_job(
        &job,
        &[
            ("RADIT_FAULT_CRASH_BEFORE_COMMIT", "1:2"),
            ("RADIT_FAULT_ONLY_GENERATION", "1"),
        ],
    );
    let err = stderr(&out);
    assert!(err.contains("restart 1/1"), "{err}");
    assert!(
        err.contains(&format!(
            "step {}/{}",
            shards.div_ceil(2),
            shards.div_ceil(2)
        )),
        "the progress line reaches the last step: {err}"
    );
    let second = rank_summaries(&dir.path().join("run"), 2);
    assert_eq!(second.len(), 2, "{second:?}");
    // Rank 1 committed one shard before dying: it resumes after it, and redoes the uncommitted one.
    assert_eq!(second[1]["shards_resumed"], 1, "{second:?}");
    let done: u64 = second
        .iter()
        .map(|s| s["shards_resumed"].as_u64().unwrap() + s["shards_encoded"].as_u64().unwrap())
        .sum();
    assert_eq!(done, shards, "every shard once: {second:?}");
    assert_eq!(second[0]["finished"], true);
    // One journal record per shard, the store verifies (latents included), and the twin agrees.
    let records: usize = ["train", "val", "test"]
        .iter()
        .map(|s| std::fs::read_dir(store.join(".encode/journal").join(s)).map_or(0, |d| d.count()))
        .sum();
    assert_eq!(records as u64, shards);
    let verify = run_ok(radit().args(["shard", "--verify"]).arg(&store));
    assert!(stdout(&verify).contains("verified"), "{}", stdout(&verify));
    let m = manifest(&store);
    assert!(m.objects.iter().any(|o| o.key == "train/latents/zarr.json"));
    check_with_twin(&store, &weights);

    // Run again: nothing to do, nothing rewritten.
    let before = std::fs::read(store.join("manifest.json")).unwrap();
    let again = run_job(&job, &[]);
    assert!(stderr(&again).contains("all 2 ranks finished"));
    assert_eq!(std::fs::read(store.join("manifest.json")).unwrap(), before);
}

/// `radit run JOB` with `env` (fault injection, Slurm's config), no progress bar; it must succeed.
fn run_job(job: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = radit();
    cmd.arg("run").arg(job).env("RADIT_NO_PROGRESS_BAR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_ok(&mut cmd)
}

/// The encode summaries of a run's ranks (`gen-G-process-R.log` in `run_dir/logs`), by rank.
fn rank_summaries(run_dir: &Path, generation: u32) -> Vec<serde_json::Value> {
    (0..2)
        .flat_map(|r| {
            let log = run_dir.join(format!("logs/gen-{generation}-process-{r}.log"));
            summaries(&std::fs::read_to_string(log).unwrap())
        })
        .collect()
}

/// `radit encode` of `store` with the tiny autoencoder's `weights`, 4 images per pass.
fn encode_cmd(store: &str, weights: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = radit();
    cmd.args([
        "encode",
        "--store",
        store,
        "--autoencoder",
        "tiny",
        "--batch",
        "4",
    ])
    .arg("--weights")
    .arg(weights)
    .args(extra);
    cmd
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn encode_names_bad_input_and_resumes_a_half_written_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny_store(dir.path(), 40, "40x48", 8, &[]);
    let url = store.to_str().unwrap();
    let weights = twin_weights(dir.path());
    let encode = |extra: &[&str]| encode_cmd(url, &weights, extra);

    // A store whose images are not the encoder's input size (the weights, written by PyTorch without metadata, are
    // recognised as the tiny autoencoder by their shapes).
    let err = fails_with_usage(
        radit()
            .args(["encode", "--store", url, "--image-size", "32", "--weights"])
            .arg(&weights),
        "holds 16x16 images; the tiny encoder takes 32x32",
    );
    assert!(err.contains(url), "{err}");
    // Weights of another preset than the one asked for: named as what they look like, and nothing written.
    let err = fails_with_usage(
        radit()
            .args([
                "encode",
                "--store",
                url,
                "--autoencoder",
                "flux2",
                "--weights",
            ])
            .arg(&weights),
        "these weights look like the `tiny` autoencoder, not `flux2`",
    );
    assert!(err.contains("--autoencoder tiny"), "{err}");
    assert!(err.contains("weights_bfl.safetensors"), "{err}");
    assert!(!store.join(".encode").exists());
    assert!(latents_open_error(&store).contains("run `radit encode` first"));

    // Killed after writing its third shard's object, before the commit: detected, then resumed.
    let killed = encode(&[])
        .env("RADIT_FAULT_CRASH_BEFORE_COMMIT", "0:3")
        .output()
        .unwrap();
    assert!(!killed.status.success());
    let err = latents_open_error(&store);
    assert!(
        err.contains("train/latents")
            && err.contains("stopped after 2 of")
            && err.contains("resume"),
        "{err}"
    );
    let out = run_ok(&mut encode(&[]));
    let s = &summaries(&stderr(&out))[0];
    assert_eq!(
        (s["shards_resumed"].as_u64(), s["finished"].as_bool()),
        (Some(2), Some(true))
    );
    check_with_twin(&store, &weights);

    // The array written but the manifest not yet (killed in the last moment): named.
    let good_manifest = std::fs::read(store.join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&good_manifest).unwrap();
    m.as_object_mut().unwrap().remove("latents");
    std::fs::write(store.join("manifest.json"), m.to_string()).unwrap();
    assert!(latents_open_error(&store).contains("did not finish"));
    std::fs::write(store.join("manifest.json"), &good_manifest).unwrap();

    // Statistics missing or unusable: named at loader open.
    let meta = store.join("train/latents/zarr.json");
    let good_meta = std::fs::read(&meta).unwrap();
    let mut doc: serde_json::Value = serde_json::from_slice(&good_meta).unwrap();
    doc["attributes"]
        .as_object_mut()
        .unwrap()
        .remove("channel_std");
    std::fs::write(&meta, doc.to_string()).unwrap();
    assert!(latents_open_error(&store).contains("only one of channel_mean and channel_std"));
    doc["attributes"]
        .as_object_mut()
        .unwrap()
        .remove("channel_mean");
    std::fs::write(&meta, doc.to_string()).unwrap();
    assert!(latents_open_error(&store).contains("has no channel_mean and channel_std"));
    doc["attributes"]["channel_mean"] = serde_json::json!([0.0, 1.0, "NaN", 0.0]);
    doc["attributes"]["channel_std"] = serde_json::json!([1.0, 1.0, 1.0, 1.0]);
    std::fs::write(&meta, doc.to_string()).unwrap();
    assert!(latents_open_error(&store).contains("channel_mean"));
    std::fs::write(&meta, &good_meta).unwrap();

    // Another encoder's weights: refused by name, then replaced with --overwrite.
    let other = dir.path().join("other.safetensors");
    run_ok(
        radit()
            .args(["vae", "init", "tiny", "--seed", "9", "--out"])
            .arg(&other),
    );
    let with_other = |extra: &[&str]| encode_cmd(url, &other, extra);
    let err = fails_with_usage(
        &mut with_other(&[]),
        "set overwrite (--overwrite) to replace them",
    );
    assert!(err.contains("weights_bfl.safetensors"), "{err}");
    run_ok(&mut with_other(&["--overwrite"]));
    let latents = manifest(&store).latents.unwrap();
    assert!(latents.encoder.description.contains("other.safetensors"));
    let verify = run_ok(radit().args(["shard", "--verify"]).arg(&store));
    assert!(stdout(&verify).contains("verified"));
}

#[test]
fn the_latent_quickstart_examples_encode_train_on_two_ranks_and_decode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The commands of examples/encode-tiny-job.toml, in a copy of the examples.
    for name in ["encode-tiny-job.toml", "radit-tiny-latent-job.toml"] {
        std::fs::copy(repo().join("examples").join(name), d.join(name)).unwrap();
    }
    let (table, images) = synth(&d.join("synth"), 120, "64x64", &[]);
    run_ok(
        radit()
            .current_dir(d)
            .args(["shard", "--no-progress", "--table"])
            .arg(&table)
            .arg("--images")
            .arg(&images)
            .args([
                "--out",
                "store",
                "--image-size",
                "16",
                "--shard-images",
                "8",
            ]),
    );
    run_ok(
        radit()
            .current_dir(d)
            .args(["vae", "init", "tiny", "--out", "tiny-ae.safetensors"]),
    );
    let quiet = |job: &str| {
        let mut cmd = radit();
        cmd.current_dir(d)
            .args(["run", job])
            .env("RADIT_NO_PROGRESS_BAR", "1");
        cmd
    };
    run_ok(&mut quiet("encode-tiny-job.toml"));
    assert!(manifest(&d.join("store")).latents.is_some());
    let out = run_ok(&mut quiet("radit-tiny-latent-job.toml"));
    assert!(stderr(&out).contains("run complete"), "{}", stderr(&out));
    let samples = d.join("run-latent/samples");
    for i in 0..4 {
        let png = samples.join(format!("decoded_{i:04}.png"));
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
        let info = decoder.read_info().unwrap().info().clone();
        // The autoencoder's 2x: 8x8 latents become 16x16 16-bit greyscale images.
        assert_eq!(
            (info.width, info.height, info.bit_depth),
            (16, 16, png::BitDepth::Sixteen)
        );
    }
    assert!(samples.join("latents.safetensors").exists());
    assert!(samples.join("contact_sheet.png").exists());
    // The sheets during training were decoded too: 16x16 tiles, not latent channel 0's 8x8.
    let sheet = d.join("run-latent/samples/progress/latest.png");
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&sheet).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    let width = info.width as usize;
    assert!(width >= 512, "{}x{}", info.width, info.height);
    // Tiles are enlarged by a whole factor to fill 512 pixels: a 16-pixel tile's pixels are blocks half the size
    // of an 8-pixel tile's, so the first tile's row changes value inside the blocks an 8x8 tile would have.
    let (gap, title) = (4, 24);
    let row = &pixels[(title + gap + 8) * width + gap..(title + gap + 9) * width];
    let block = (width - 3 * gap) / 2 / 16;
    let changes_mid_block = (1..block * 16)
        .filter(|&x| x % (2 * block) == block && row[x] != row[x - 1])
        .count();
    assert!(
        changes_mid_block > 0,
        "the sheet shows 8x8 tiles, not decoded 16x16 ones"
    );
}

#[test]
fn under_mpirun_two_ranks_write_the_same_bytes_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let one = tiny_store(dir.path(), 50, "40x48", 8, &[]);
    let two = dir.path().join("store-mpi");
    run_ok(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(&one)
            .arg(&two),
    );
    let weights = dir.path().join("ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&weights));
    run_ok(&mut encode_cmd(
        one.to_str().unwrap(),
        &weights,
        &["--threads", "1"],
    ));
    let out = run_ok(
        std::process::Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "--bind-to",
                "none",
                "-np",
                "2",
            ])
            .args(["-x", "OMP_NUM_THREADS=1"])
            .arg(env!("CARGO_BIN_EXE_radit"))
            .args([
                "encode",
                "--store",
                two.to_str().unwrap(),
                "--autoencoder",
                "tiny",
            ])
            .args(["--batch", "4", "--threads", "1", "--weights"])
            .arg(&weights),
    );
    let ranks: Vec<u64> = summaries(&stderr(&out))
        .iter()
        .map(|s| s["rank"].as_u64().unwrap())
        .collect();
    assert_eq!(ranks.len(), 2, "{}", stderr(&out));
    // Every object (latents, their metadata, the statistics) byte for byte, whatever the world size.
    let (a, b) = (manifest(&one), manifest(&two));
    assert_eq!(a.latents, b.latents);
    assert_eq!(a.objects, b.objects);
    assert!(a.objects.iter().any(|o| o.key.starts_with("test/latents/")));
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_hung_encode_rank_is_named_and_the_job_relaunched() {
    let dir = tempfile::tempdir().unwrap();
    let store = tiny_store(dir.path(), 60, "40x48", 8, &[]);
    let weights = dir.path().join("ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&weights));
    let job = encode_job(
        dir.path(),
        &store,
        &weights,
        "hang_factor = 5.0\nhang_min_seconds = 3.0",
    );
    let out = run_job(
        &job,
        &[
            ("RADIT_FAULT_HANG", "1:3"),
            ("RADIT_FAULT_ONLY_GENERATION", "1"),
        ],
    );
    let err = stderr(&out);
    // Rank 0 finished its range and waits in the final barrier: the rank still in `compute` is the culprit.
    assert!(
        err.contains("culprit rank 1 is in `compute` after step 2"),
        "{err}"
    );
    assert!(err.contains("run complete after 1 restart(s)"), "{err}");
    assert!(manifest(&store).latents.is_some());
}

#[test]
fn a_stopped_encode_job_exits_for_requeue_and_the_next_run_resumes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    // 64x64 images: slow enough on this machine to stop part-way.
    let (table, images) = synth(&dir.path().join("synth"), 400, "64x64", &[]);
    let store = dir.path().join("store");
    run_ok(&mut shard_cmd(
        &table,
        &images,
        store.to_str().unwrap(),
        &[],
    ));
    let weights = dir.path().join("ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&weights));
    let job = encode_job(dir.path(), &store, &weights, "");
    let mut child = radit()
        .arg("run")
        .arg(&job)
        .env("RADIT_NO_PROGRESS_BAR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let started = line
            .strip_prefix("radit: step ")
            .and_then(|rest| rest.split('/').next())
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= 2);
        seen.push(line);
        if started {
            break;
        }
    }
    // What Slurm sends before the time limit reaches the supervisor: every rank stops after its current shard.
    let pid = child.id().to_string();
    run_ok(std::process::Command::new("kill").args(["-TERM", &pid]));
    seen.extend(lines.map_while(Result::ok));
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert_eq!(status.code(), Some(75), "{text}");
    assert!(latents_open_error(&store).contains("resume"));
    let out = run_job(&job, &[]);
    assert!(stderr(&out).contains("run complete"), "{}", stderr(&out));
    let resumed: u64 = rank_summaries(&dir.path().join("run"), 1)
        .iter()
        .map(|s| s["shards_resumed"].as_u64().unwrap())
        .sum();
    assert!(resumed >= 2, "the second run resumed {resumed} shards");
    assert!(manifest(&store).latents.is_some());
}

#[test]
fn an_encode_job_runs_as_a_slurm_job() {
    let conf = local_slurm();
    let dir = tempfile::tempdir().unwrap();
    let store = tiny_store(dir.path(), 40, "40x48", 8, &[]);
    let weights = dir.path().join("ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&weights));
    let job = encode_job(dir.path(), &store, &weights, "");
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "kind = \"local\"",
        "kind = \"slurm\"\n[launcher.slurm]\ntime_limit = \"00:05:00\"\npoll_seconds = 0.5",
    );
    std::fs::write(&job, text).unwrap();
    // Submitted with sbatch; its script runs `radit run --in-allocation`, which starts `radit encode` with srun.
    let out = run_job(&job, &[("SLURM_CONF", &conf)]);
    assert!(stderr(&out).contains("COMPLETED"), "{}", stderr(&out));
    let script = std::fs::read_to_string(dir.path().join("run/job.sbatch")).unwrap();
    assert!(script.contains("--in-allocation"), "{script}");
    assert!(manifest(&store).latents.is_some());
    let verify = run_ok(radit().args(["shard", "--verify"]).arg(&store));
    assert!(stdout(&verify).contains("verified"));
}

#[test]
fn radit_quickstart_latent_runs_the_whole_latent_path_in_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(
        radit()
            .args([
                "quickstart",
                "--latent",
                "--images",
                "64",
                "--steps",
                "20",
                "--dir",
            ])
            .arg(dir.path())
            .env("RADIT_NO_PROGRESS_BAR", "1"),
    );
    let text = stdout(&out);
    assert!(text.contains("6/6 training tiny-latent"), "{text}");
    assert!(text.contains("done: decoded samples"), "{text}");
    assert!(
        stderr(&out).contains("16 samples and contact sheet"),
        "{}",
        stderr(&out)
    );
    let store = dir.path().join("store");
    let latents = manifest(&store).latents.expect("the encode job finished");
    // 32x32 images through the tiny autoencoder: 4x16x16 latents, what the trained model's input is.
    assert_eq!(latents.sample_shape, [4, 16, 16]);
    assert!(
        dir.path()
            .join("run-latent/samples/decoded_0015.png")
            .exists()
    );
    assert!(
        dir.path()
            .join("run-latent/samples/progress/latest.png")
            .exists()
    );
    // The written job files run again as they are.
    for job in ["encode-job.toml", "latent-job.toml"] {
        radit_run::job::Job::load(&dir.path().join(job)).unwrap();
    }
}

/// The tiny autoencoder's attention over a 512x512 store's 65,536 latent positions would ask for 256 GiB in the
/// first shard's forward pass: said before anything is allocated, as the out-of-memory report with what to change
/// (exit 2), never a panic, and nothing of the store lost.
#[test]
fn an_encode_too_large_for_the_machine_is_an_out_of_memory_report_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (table, pngs) = synth(&d.join("synth"), 2, "512x512", &[]);
    let store = d.join("store");
    run_ok(
        radit()
            .args(["shard", "--no-progress", "--table"])
            .arg(&table)
            .arg("--images")
            .arg(&pngs)
            .arg("--out")
            .arg(&store)
            .args(["--image-size", "512", "--shard-images", "2"]),
    );
    let weights = d.join("ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&weights));
    let err = fails_with_usage(
        radit()
            .args(["encode", "--store", store.to_str().unwrap()])
            .args(["--autoencoder", "tiny", "--batch", "16", "--weights"])
            .arg(&weights),
        "the mid-block attention over 65536 latent positions needs 256.0 GiB for a batch of 16",
    );
    for want in [
        "out of memory in planning the encode on cpu: ",
        "the tiny autoencoder, weights ae.safetensors",
        "on 512x512 images, encode.batch 16",
        "checked before allocating",
        "A restart would fail the same way",
        "lower encode.batch",
    ] {
        assert!(err.contains(want), "expected `{want}` in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    let verify = run_ok(radit().args(["shard", "--verify"]).arg(&store));
    assert!(stdout(&verify).contains("verified"));
}

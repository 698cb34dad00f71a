//! The same ingest into a bucket on a real S3-compatible server (moto on 127.0.0.1): it completes, verifies,
//! resumes, is byte-identical to the local store, zarr-python reads what was stored, and the loader streams the same
//! batches from the bucket (then from its node-local cache) as from the local store.

mod common;

use common::*;
use radit_sharding::manifest::Manifest;

#[test]
fn ingest_to_s3_verifies_resumes_and_matches_the_local_store() {
    let moto = MotoServer::start();
    moto.create_bucket("cxr");
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 40, "64x64,96x80", &["--defects"]);

    let local = dir.path().join("local");
    run_ok(&mut shard_cmd(
        &table,
        &images,
        local.to_str().unwrap(),
        &[],
    ));

    let url = "s3://cxr/stores/cxr7";
    // Interrupted first, then resumed: exercises the journal on S3 too.
    let first =
        run_ok(shard_cmd(&table, &images, url, &["--stop-after-shards", "2"]).envs(moto.env()));
    assert!(
        stdout(&first).contains("stopped after 2 new shards"),
        "{}",
        stdout(&first)
    );
    let out = run_ok(shard_cmd(&table, &images, url, &[]).envs(moto.env()));
    assert!(
        stdout(&out).contains("resumed: 2 shards"),
        "{}",
        stdout(&out)
    );
    let v = run_ok(radit().args(["shard", "--verify", url]).envs(moto.env()));
    assert!(stdout(&v).contains("verified"), "{}", stdout(&v));

    let mirror = dir.path().join("mirror");
    run_ok(
        python()
            .envs(moto.env())
            .arg(repo().join("tests/python/s3_download.py"))
            .args(["cxr", "stores/cxr7", mirror.to_str().unwrap()]),
    );
    let read = |p: &std::path::Path| -> Manifest {
        serde_json::from_slice(&std::fs::read(p.join("manifest.json")).unwrap()).unwrap()
    };
    let (a, b) = (read(&local), read(&mirror));
    assert_eq!(a.counts, b.counts);
    assert_eq!(
        a.objects, b.objects,
        "S3 and local stores hold the same bytes"
    );
    check_store_with_zarr_python(&mirror, &table, &images, &dir.path().join("py.json"));

    // The loader streams the same batches from the bucket as from the local store; a second run through the
    // node-local cache reads nothing from S3.
    let cache = dir.path().join("cache");
    let bench = |url: &str, cache: Option<&std::path::Path>| -> serde_json::Value {
        let mut cmd = radit();
        cmd.args(["data", "bench", url, "--global-batch", "8", "--steps", "9"])
            .args(["--seed", "3", "--window-shards", "2", "--digest", "--json"])
            .envs(moto.env());
        if let Some(c) = cache {
            cmd.arg("--cache").arg(c);
        }
        serde_json::from_str(&stdout(&run_ok(&mut cmd))).unwrap()
    };
    let local_run = bench(local.to_str().unwrap(), None);
    let cold = bench(url, Some(&cache));
    let warm = bench(url, Some(&cache));
    assert_eq!(local_run["samples"], 72);
    assert_eq!(cold["digest"], local_run["digest"], "{cold} vs {local_run}");
    assert_eq!(warm["digest"], local_run["digest"]);
    assert!(cold["bytes_read"].as_u64().unwrap() > 0, "{cold}");
    assert_eq!(warm["bytes_read"], 0, "{warm}");
    assert_eq!(warm["cache_misses"], 0, "{warm}");
}

/// Every storage mistake a user can fix is bad input (exit 2) with the fix in the message, never the retryable 75
/// that the rendered sbatch script would requeue for ever: a plain-http endpoint without AWS_ALLOW_HTTP, a bucket
/// that does not exist, credentials the server refuses, an unreadable config file. (A full disk: tests/run_faults.rs;
/// a real transient failure, which is retried and then 75: the stalled-server test below and the store's unit tests.)
#[test]
fn storage_mistakes_exit_2_with_the_fix_never_75() {
    let moto = MotoServer::start();
    moto.create_bucket("cxr");
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 2, "64x64", &[]);
    let usage = |cmd: &mut std::process::Command, needle: &str| {
        let err = fails_with_usage(cmd, needle);
        // Said once: no wrapper repeats the chain's words.
        assert!(err.matches(needle).count() == 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    // http:// without AWS_ALLOW_HTTP: named at open, with the variable to set.
    usage(
        radit()
            .args(["shard", "--verify", "s3://cxr/x"])
            .envs(moto.env())
            .env_remove("AWS_ALLOW_HTTP"),
        "AWS_ALLOW_HTTP=true",
    );
    // A bucket that does not exist, for writing and for reading.
    usage(
        shard_cmd(&table, &images, "s3://no-such-bucket/x", &[]).envs(moto.env()),
        "bucket 'no-such-bucket' does not exist",
    );
    usage(
        radit()
            .args(["shard", "--verify", "s3://no-such-bucket/x"])
            .envs(moto.env()),
        "bucket 'no-such-bucket' does not exist",
    );
    // Credentials the server refuses.
    let strict = MotoServer::start_checking_credentials();
    usage(
        radit()
            .args(["shard", "--verify", "s3://cxr/x"])
            .envs(strict.env())
            .env("AWS_ACCESS_KEY_ID", "AKIANOTISSUED0000000"),
        "check the credentials",
    );
    // A config file that cannot be read (a directory in its place).
    usage(
        radit().args(["train", "--config"]).arg(dir.path()),
        &dir.path().display().to_string(),
    );
}

#[test]
fn a_dicom_release_in_a_bucket_is_surveyed_from_ranged_reads_like_on_disk() {
    let moto = MotoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run_ok(radit().args(["harmonise", "fixtures", "--out"]).arg(&data));
    let vindr = data.join("vindr-cxr");
    // A header longer than the first 64 KiB read (a 32,767-entry VOI LUT before the pixels): read whole instead.
    let mut big = radit_dicom::fixture::Fixture::grey(8, 8, 16, (0..64).map(|i| i * 500).collect());
    big.voi_lut = Some(radit_dicom::Lut {
        first: 0,
        bits: 16,
        entries: (0..32_767).map(|i| i * 2).collect(),
    });
    assert!(big.to_bytes().len() > 66_000);
    std::fs::write(vindr.join("big-header.dcm"), big.to_bytes()).unwrap();
    run_ok(
        python()
            .envs(moto.env())
            .arg(repo().join("bench/s3_upload.py"))
            .arg(&vindr)
            .args(["releases", "vindr-cxr"]),
    );
    let survey = |location: &str, json: &str| -> serde_json::Value {
        let path = dir.path().join(json);
        run_ok(
            radit()
                .args(["dicom", "survey", location, "--json"])
                .arg(&path)
                .envs(moto.env()),
        );
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    };
    let s3 = survey("s3://releases/vindr-cxr", "s3.json");
    let disk = survey(vindr.to_str().unwrap(), "disk.json");
    assert_eq!(s3["dicom"], 7, "{s3}");
    assert_eq!(s3["unreadable_count"], 0, "{s3}");
    assert_eq!(s3["fields"], disk["fields"]);
    assert_eq!(s3["fields"]["VOI LUT sequence items"]["1"], 1, "{s3}");
}

/// `radit train` on a store in a bucket whose server stalls for 4 s mid-run (moto paused with SIGSTOP, then
/// resumed): with `[data] request_timeout_seconds = 1` each stalled read times out and is retried, and the run
/// completes with the losses of the same run on the local copy of the store, instead of hanging.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "injects faults: build with --features fault-injection (scripts/test.sh does)"
)]
fn a_stalled_object_store_is_timed_out_and_retried_and_the_run_goes_on() {
    use std::io::BufRead;
    let moto = MotoServer::start();
    moto.create_bucket("cxr");
    let dir = tempfile::tempdir().unwrap();
    let local = tiny_store(dir.path(), 48, "40x48", 8, &[]);
    let url = "s3://cxr/tiny";
    run_ok(
        radit()
            .args(["shard", "--no-progress", "--table"])
            .arg(dir.path().join("synth/table.csv"))
            .arg("--images")
            .arg(dir.path().join("synth/images"))
            .args(["--out", url, "--image-size", "16", "--shard-images", "8"])
            .envs(moto.env()),
    );
    let config = |store: &str, name: &str| {
        write_train_config(
            &dir.path().join(name),
            &format!(
                "[data]\nurl = \"{store}\"\nwindow_shards = 2\nprefetch = 1\nrequest_timeout_seconds = 1.0\n\
                 [model]\npreset = \"tiny\"\n[train]\nsteps = 40\nglobal_batch = 8\nseed = 4\nlog_every = 1\n"
            ),
        )
    };
    let losses = |text: &str| -> Vec<f64> {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["loss"].as_f64())
            .collect()
    };
    let straight = losses(&stdout(&run_ok(
        radit()
            .args(["train", "--threads", "1", "--config"])
            .arg(config(local.to_str().unwrap(), "local.toml")),
    )));
    assert_eq!(straight.len(), 40);

    // 50 ms a step: the stall at step 5 lands mid-run, with every shard read again each epoch (no node cache).
    let mut child = radit()
        .args(["train", "--threads", "1", "--config"])
        .arg(config(url, "s3.toml"))
        .envs(moto.env())
        .env("RADIT_FAULT_STEP_SLEEP_MS", "50")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen += &line;
        seen.push('\n');
        if line.contains("\"step\":5,") {
            break;
        }
    }
    // SAFETY: kill(2) on the moto server this test started.
    unsafe { libc::kill(moto.pid() as i32, libc::SIGSTOP) };
    std::thread::sleep(std::time::Duration::from_secs(4));
    // SAFETY: as above.
    unsafe { libc::kill(moto.pid() as i32, libc::SIGCONT) };
    for line in lines {
        seen += &line.unwrap();
        seen.push('\n');
    }
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("retrying a storage request"), "{err}");
    assert_eq!(
        losses(&seen),
        straight,
        "the stalled run trains what the local one does"
    );
}

//! `radit synth` + `radit shard` through the real binary: zarr-python interop, resume after kill -9, verify,
//! bad input and exit codes.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use radit_sharding::manifest::Manifest;
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;

fn manifest(dir: &std::path::Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest exists"))
        .expect("manifest parses")
}

#[test]
fn zarr_python_reads_the_same_values_that_were_ingested() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(
        &dir.path().join("data"),
        48,
        "64x64,80x64,64x100,600x520",
        &[],
    );
    let store = dir.path().join("store");
    let out = run_ok(&mut shard_cmd(
        &table,
        &images,
        store.to_str().unwrap(),
        &[],
    ));
    assert!(stdout(&out).contains("48 accepted"), "{}", stdout(&out));
    let v = run_ok(radit().args(["shard", "--verify", store.to_str().unwrap()]));
    assert!(stdout(&v).contains("verified"), "{}", stdout(&v));

    let summary_path = dir.path().join("py.json");
    check_store_with_zarr_python(&store, &table, &images, &summary_path);
    let py: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    assert!(
        py["exact_images_checked"].as_u64().unwrap() > 10,
        "64x64 sources are compared pixel for pixel"
    );

    let reader = StoreReader::open(Storage::open(store.to_str().unwrap()).unwrap()).unwrap();
    let mut total = 0;
    for split in Split::ALL {
        let rust = reader.read_split(split).unwrap();
        let p = &py[split.name()];
        let ids: Vec<String> = serde_json::from_value(p["image_ids"].clone()).unwrap();
        assert_eq!(ids, rust.image_ids, "{split}: ids");
        let labels: Vec<Vec<u8>> = serde_json::from_value(p["labels"].clone()).unwrap();
        assert_eq!(labels.concat(), rust.labels, "{split}: labels");
        let ages: Vec<Option<f32>> = serde_json::from_value(p["age"].clone()).unwrap();
        for (a, b) in ages.iter().zip(&rust.age) {
            assert!(
                a.map_or(b.is_nan(), |a| a == *b),
                "{split}: age {a:?} vs {b}"
            );
        }
        let hashes: Vec<String> = serde_json::from_value(p["image_sha256"].clone()).unwrap();
        for (i, h) in hashes.iter().enumerate() {
            let px = &rust.images[i * 4096..(i + 1) * 4096];
            let bytes: Vec<u8> = px.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(h, &sha256_hex(&bytes), "{split}: image {i} pixels");
        }
        total += rust.rows;
    }
    assert_eq!(total, 48);
}

#[test]
fn the_independent_store_checker_counts_a_missing_age_on_one_side_as_a_difference() {
    let checker = repo().join("tests/python");
    run_ok(python().current_dir(&checker).arg("-c").arg(
        "from check_store import ages_differ as d; nan = float('nan')\n\
                 assert d(nan, 0.5) and d(0.5, nan) and not d(nan, nan)\n\
                 assert d(0.5, 0.51) and not d(0.5, 0.5 + 1e-9)",
    ));
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn an_ingest_killed_mid_way_resumes_without_duplicating_or_dropping_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 240, "400x400,520x480", &[]);
    let straight = dir.path().join("straight");
    run_ok(&mut shard_cmd(
        &table,
        &images,
        straight.to_str().unwrap(),
        &["--shard-images", "2"],
    ));

    let killed = dir.path().join("killed");
    let mut child = shard_cmd(
        &table,
        &images,
        killed.to_str().unwrap(),
        &["--shard-images", "2", "--threads", "1"],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let journal = killed.join(".ingest/journal/train");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = std::fs::read_dir(&journal).map(|d| d.count()).unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress within 120 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !killed.join("manifest.json").exists(),
        "killed before completing"
    );

    let out = run_ok(&mut shard_cmd(
        &table,
        &images,
        killed.to_str().unwrap(),
        &["--shard-images", "2"],
    ));
    assert!(stdout(&out).contains("resumed:"), "{}", stdout(&out));
    let (a, b) = (manifest(&straight), manifest(&killed));
    assert_eq!(a.counts, b.counts);
    assert_eq!(
        a.objects, b.objects,
        "the resumed store is byte-identical to the straight one"
    );
    let reader = StoreReader::open(Storage::open(killed.to_str().unwrap()).unwrap()).unwrap();
    let mut ids: Vec<String> = Split::ALL
        .iter()
        .flat_map(|s| reader.read_split(*s).unwrap().image_ids)
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!((ids.len(), n), (240, 240), "every row exactly once");
}

#[test]
fn verify_names_the_damaged_object_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 20, "64x64", &[]);
    let store = shard_into(dir.path(), &table, &images);
    let m = manifest(&store);
    let victim = m
        .objects
        .iter()
        .find(|o| o.key.starts_with("train/age/c/"))
        .unwrap();
    std::fs::write(store.join(&victim.key), b"garbage").unwrap();
    let out = radit()
        .args(["shard", "--verify", store.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains(&victim.key), "{}", stdout(&out));
}

#[test]
fn bad_rows_are_reported_by_line_and_the_rest_is_ingested() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 30, "64x64,90x70", &["--defects"]);
    let defects: Vec<radit_sharding::synth::Defect> =
        serde_json::from_slice(&std::fs::read(dir.path().join("data/defects.json")).unwrap())
            .unwrap();
    let store = dir.path().join("store");
    let out = run_ok(&mut shard_cmd(
        &table,
        &images,
        store.to_str().unwrap(),
        &["--show-rejected", "100"],
    ));
    let text = stdout(&out);
    let m = manifest(&store);
    assert_eq!(m.counts.accepted + m.counts.rejected, m.counts.table_rows);
    let rejected: HashMap<u64, &str> = defects
        .iter()
        .filter(|d| d.expect == "rejected")
        .map(|d| (d.line, d.kind.as_str()))
        .collect();
    assert_eq!(m.counts.rejected as usize, rejected.len());
    for (line, kind) in &rejected {
        assert!(
            text.contains(&format!("line {line} ")) || text.contains(&format!("line {line}:")),
            "{kind}: {text}"
        );
    }
    assert!(
        text.contains(&format!("{} accepted", 30 + defects.len() - rejected.len())),
        "{text}"
    );
    assert!(
        text.contains("stored as missing: non_numeric_age"),
        "{text}"
    );
}

#[test]
fn unusable_inputs_and_outputs_exit_2_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_, images) = synth(&dir.path().join("data"), 2, "64x64", &[]);
    let empty = dir.path().join("empty.csv");
    std::fs::write(&empty, b"").unwrap();
    let out = shard_cmd(&empty, &images, dir.path().join("s").to_str().unwrap(), &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("empty.csv"), "{}", stderr(&out));

    let table = dir.path().join("data/table.csv");
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let target = format!("file://{}/store", blocker.display());
    let out = shard_cmd(&table, &images, &target, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot be written") && stderr(&out).contains("blocker/store"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn info_reports_the_pip_libtorch() {
    let out = run_ok(radit().arg("info"));
    let text = stdout(&out);
    assert!(text.contains("site-packages/torch/lib"), "{text}");
    assert!(text.contains("(torch 2.13.0"), "{text}");
    // The pip wheel is a CUDA build: the binary must load its libtorch_cuda.so, and use the NCCL that libtorch_cuda
    // already loaded (the wheel's): one NCCL per process.
    assert!(
        text.contains("build: CUDA 13.0 (libtorch_cuda.so loaded)"),
        "{text}"
    );
    assert!(text.contains("NCCL: NCCL 2."), "{text}");
    assert!(text.contains("nvidia/nccl/lib/libnccl.so.2"), "{text}");
    assert!(text.contains("already loaded in this process"), "{text}");
}

#[test]
fn verifying_a_missing_or_incomplete_store_fails_without_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let out = radit()
        .args(["shard", "--verify", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(!missing.exists(), "verify must not create the directory");
    let incomplete = dir.path().join("incomplete");
    std::fs::create_dir(&incomplete).unwrap();
    let out = radit()
        .args(["shard", "--verify", incomplete.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("incomplete"), "{}", stdout(&out));
}

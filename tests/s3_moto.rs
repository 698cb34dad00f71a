//! The same ingest into a bucket on a real S3-compatible server (moto on 127.0.0.1): it completes, verifies,
//! resumes, is byte-identical to the local store, and zarr-python reads what was stored.

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
}

#[test]
fn a_bucket_that_does_not_exist_is_a_clear_error() {
    let moto = MotoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 2, "64x64", &[]);
    let out = shard_cmd(&table, &images, "s3://no-such-bucket/x", &[])
        .envs(moto.env())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("s3://no-such-bucket/x"), "{err}");
}

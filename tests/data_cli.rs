//! `radit data batches`: the audit of which images each rank sees at each step. `radit data stats` against an
//! independent count (zarr-python and numpy), exact split counts, and a reference set end to end: `data select`
//! and the CheXGenBench mapper, `generate --ids`, `eval features --ids`, and a fidelity row.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::*;
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;

fn batches(store: &str, world: u64, rank: u64, from: u64, steps: u64) -> Vec<(u64, Vec<String>)> {
    let out = run_ok(
        radit()
            .args([
                "data",
                "batches",
                store,
                "--seed",
                "5",
                "--global-batch",
                "12",
            ])
            .args([
                "--window-shards",
                "2",
                "--world",
                &world.to_string(),
                "--rank",
                &rank.to_string(),
                "--from-step",
                &from.to_string(),
                "--steps",
                &steps.to_string(),
            ]),
    );
    stdout(&out)
        .lines()
        .map(|l| {
            let (step, ids) = l.split_once(": ").expect("`step K: ids`");
            let step = step
                .strip_prefix("step ")
                .expect("starts with step")
                .parse()
                .expect("step number");
            (step, ids.split(' ').map(String::from).collect())
        })
        .collect()
}

#[test]
fn every_world_size_sees_the_same_global_batches_and_an_epoch_covers_the_split_once() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 120, "64x64", &["--split-column"]);
    let store = shard_into(dir.path(), &table, &images);
    let store = store.to_str().unwrap();
    let reader = radit_sharding::reader::StoreReader::open(
        radit_sharding::store::Storage::open(store).unwrap(),
    )
    .unwrap();
    let train = reader
        .read_split(radit_sharding::split::Split::Train)
        .unwrap()
        .image_ids;

    let single = batches(store, 1, 0, 3, 4);
    assert_eq!(
        single.iter().map(|s| s.0).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    for world in [2u64, 3, 4] {
        let per_rank: Vec<_> = (0..world).map(|r| batches(store, world, r, 3, 4)).collect();
        for (i, (step, ids)) in single.iter().enumerate() {
            let joined: Vec<String> = per_rank.iter().flat_map(|r| r[i].1.clone()).collect();
            assert_eq!(&joined, ids, "world {world}, step {step}");
            assert!(per_rank.iter().all(|r| r[i].1.len() == 12 / world as usize));
        }
    }
    // One epoch of steps covers every training image; the ids are the store's.
    let steps = (train.len() as u64).div_ceil(12);
    let mut seen: Vec<String> = batches(store, 1, 0, 0, steps)
        .into_iter()
        .flat_map(|s| s.1)
        .collect();
    seen.truncate(train.len());
    seen.sort();
    let mut expected = train.clone();
    expected.sort();
    assert_eq!(seen, expected);
}

#[test]
fn a_batch_that_does_not_divide_by_the_world_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (table, images) = synth(&dir.path().join("data"), 20, "64x64", &[]);
    let store = shard_into(dir.path(), &table, &images);
    let out = radit()
        .args([
            "data",
            "batches",
            store.to_str().unwrap(),
            "--seed",
            "1",
            "--global-batch",
            "12",
            "--world",
            "5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("divisible by the world size (5)"),
        "{}",
        stderr(&out)
    );
}

fn id_list(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// The store's (split, image_id, dataset) rows and each split's patients.
type StoreRows = (Vec<(Split, String, u8)>, BTreeMap<Split, BTreeSet<String>>);

fn rows_of(store: &Path) -> StoreRows {
    let reader = StoreReader::open(Storage::open(store.to_str().unwrap()).unwrap()).unwrap();
    let (mut rows, mut patients) = (Vec::new(), BTreeMap::new());
    for split in Split::ALL {
        let s = reader.read_split(split).unwrap();
        for i in 0..s.rows {
            rows.push((split, s.image_ids[i].clone(), s.labels[i * 18 + 17]));
        }
        patients.insert(split, s.patient_ids.into_iter().collect());
    }
    (rows, patients)
}

#[test]
fn data_stats_agree_with_an_independent_count_and_a_reference_set_makes_a_fidelity_row() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (table, pngs) = synth(&d.join("synth"), 72, "40x48", &[]);
    // Every other patient's rows become MIMIC-CXR's, with ids as its harmoniser writes them
    // (`MIMIC-CXR:<dicom_id>`), so that CheXGenBench's images are in several splits.
    let text = std::fs::read_to_string(&table).unwrap();
    let text: String = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut cells: Vec<String> = l.split(',').map(String::from).collect();
            let patient: u64 = cells[1].trim_start_matches('P').parse().unwrap_or(1);
            if i > 0 && (patient.is_multiple_of(2) || cells[2] == "MIMIC-CXR") {
                cells[2] = "MIMIC-CXR".into();
                cells[0] = format!("MIMIC-CXR:{}", cells[0]);
            }
            cells.join(",") + "\n"
        })
        .collect();
    std::fs::write(&table, text).unwrap();
    let store = d.join("store");
    run_ok(
        radit()
            .args([
                "shard",
                "--no-progress",
                "--image-size",
                "16",
                "--shard-images",
                "8",
            ])
            .args(["--split-patients", "4,6", "--table"])
            .arg(&table)
            .arg("--images")
            .arg(&pngs)
            .arg("--out")
            .arg(&store),
    );
    let (rows, patients) = rows_of(&store);
    assert_eq!(
        (patients[&Split::Val].len(), patients[&Split::Test].len()),
        (4, 6)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["settings"]["table"]["split"]["patients"],
        serde_json::json!({"val": 4, "test": 6})
    );

    // data stats: every group equals zarr-python's count; the CSV sums; the figure is a PNG.
    let (json, csv, png, py) = (
        d.join("s.json"),
        d.join("s.csv"),
        d.join("s.png"),
        d.join("py.json"),
    );
    let out = run_ok(
        radit()
            .args(["data", "stats"])
            .arg(&store)
            .arg("--json")
            .arg(&json)
            .arg("--csv")
            .arg(&csv)
            .arg("--png")
            .arg(&png),
    );
    assert!(stdout(&out).contains("age mean ± sd"), "{}", stdout(&out));
    run_ok(
        python()
            .arg(repo().join("tests/python/data_stats_count.py"))
            .arg(&store)
            .arg(&py),
    );
    let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let theirs: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&py).unwrap()).unwrap();
    let groups = ours["groups"].as_array().unwrap();
    assert_eq!(groups.len(), theirs.len());
    for (g, t) in groups.iter().zip(&theirs) {
        let at = format!("{} / {}", g["split"], g["dataset"]);
        for key in ["split", "dataset", "patients", "images"] {
            assert_eq!(g[key], t[key], "{at}: {key}");
        }
        for var in ["view", "sex", "race"] {
            for c in g[var].as_array().unwrap() {
                assert_eq!(
                    c["images"],
                    t[var][c["class"].as_str().unwrap()],
                    "{at}: {var} {c}"
                );
            }
        }
        assert_eq!(
            g["age"]["missing"], t["age"]["missing"],
            "{at}: age missing"
        );
        for m in ["mean", "sd"] {
            match (g["age"][m].as_f64(), t["age"][m].as_f64()) {
                (Some(a), Some(b)) => assert!(
                    (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                    "{at}: age {m} {a} {b}"
                ),
                (a, b) => assert_eq!(a, b, "{at}: age {m}"),
            }
        }
        for f in g["findings"].as_array().unwrap() {
            let counts = &t["findings"][f["finding"].as_str().unwrap()];
            assert_eq!(
                [&f["positive"], &f["negative"], &f["missing"]].map(|v| v.as_u64().unwrap()),
                [0, 1, 2].map(|i| counts[i].as_u64().unwrap()),
                "{at}: {f}"
            );
        }
    }
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), groups.len() + 1);
    let split_totals: u64 = csv
        .lines()
        .filter(|l| !l.starts_with("all,") && l.split(',').nth(1) == Some("all"))
        .map(|l| l.split(',').nth(3).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(split_totals, 72);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));

    // data select: seeded, of the split and datasets asked, store order, a larger count a superset.
    let select = |args: &[&str], name: &str| {
        let path = d.join(name);
        run_ok(
            radit()
                .args(["data", "select"])
                .arg(&store)
                .args(args)
                .arg("--out")
                .arg(&path),
        );
        id_list(&path)
    };
    let train_ids: Vec<&String> = rows
        .iter()
        .filter(|r| r.0 == Split::Train)
        .map(|r| &r.1)
        .collect();
    let five = select(
        &["--split", "train", "--count", "5", "--seed", "2"],
        "five.ids",
    );
    let ten = select(
        &["--split", "train", "--count", "10", "--seed", "2"],
        "ten.ids",
    );
    let other = select(
        &["--split", "train", "--count", "5", "--seed", "3"],
        "other.ids",
    );
    assert_eq!(five.len(), 5);
    assert!(five.iter().all(|id| ten.contains(id)) && five != other);
    let positions: Vec<usize> = ten
        .iter()
        .map(|id| train_ids.iter().position(|t| *t == id).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "store order: {positions:?}"
    );
    let mimic = select(
        &["--split", "train", "--dataset", "MIMIC-CXR", "--count", "3"],
        "m.ids",
    );
    assert!(
        mimic
            .iter()
            .all(|id| rows.iter().any(|r| &r.1 == id && r.2 == 1)),
        "{mimic:?}"
    );
    let err = fails_with_usage(
        radit()
            .args(["data", "select"])
            .arg(&store)
            .args(["--split", "val", "--count", "999", "--out"])
            .arg(d.join("x")),
        "at most",
    );
    assert!(!d.join("x").exists(), "{err}");

    // CheXGenBench's CSV: MIMIC-CXR images wherever CXR7-1M put them, one not in the store.
    let mimic_rows: Vec<&(Split, String, u8)> = rows.iter().filter(|r| r.2 == 1).collect();
    let splits: BTreeSet<Split> = mimic_rows.iter().map(|r| r.0).collect();
    assert!(
        splits.len() > 1,
        "the fixture's MIMIC-CXR rows span splits: {splits:?}"
    );
    let mut chex = String::from("path,annotated_prompt\n");
    for r in mimic_rows.iter().rev() {
        let dicom = r.1.strip_prefix("MIMIC-CXR:").unwrap();
        chex += &format!("files/p10/p10000001/s50000001/{dicom}.jpg,\"a prompt, with a comma\"\n");
    }
    chex += "files/p10/p10000001/s50000001/not-in-the-store.jpg,x\n";
    std::fs::write(d.join("LLAVARAD_ANNOTATIONS_TEST.csv"), chex).unwrap();
    let out = run_ok(
        radit()
            .args(["data", "select"])
            .arg(&store)
            .arg("--chexgenbench")
            .arg(d.join("LLAVARAD_ANNOTATIONS_TEST.csv"))
            .arg("--out")
            .arg(d.join("chex.ids")),
    );
    assert!(
        stderr(&out).contains("1 of CheXGenBench's"),
        "{}",
        stderr(&out)
    );
    let chex = id_list(&d.join("chex.ids"));
    let want: Vec<String> = mimic_rows.iter().map(|r| r.1.clone()).collect();
    assert_eq!(
        chex, want,
        "every MIMIC-CXR row, in store order (train, val, test)"
    );

    // The reference row end to end: samples on the reference ids, features of both, the fidelity row.
    let w = tiny_weights(d);
    let samples = d.join("gen");
    let chex_ids = d.join("chex.ids");
    run_ok(&mut generate_cmd(
        &w,
        &store,
        &samples,
        &[
            "--split",
            "any",
            "--ids",
            chex_ids.to_str().unwrap(),
            "--solver",
            "euler",
            "--steps",
            "4",
        ],
    ));
    let net = feature_net(d);
    let features = |source: &[&str], name: &str| tiny_features(&net, source, &d.join(name));
    let ids = d.join("chex.ids");
    let real = features(
        &[
            "--store",
            store.to_str().unwrap(),
            "--split",
            "any",
            "--ids",
            ids.to_str().unwrap(),
        ],
        "real.npy",
    );
    let fake = features(&["--samples", samples.to_str().unwrap()], "fake.npy");
    // One sample per reference row: the same ids in the same order.
    let real_ids = std::fs::read_to_string(d.join("real.ids.txt")).unwrap();
    assert_eq!(
        real_ids,
        std::fs::read_to_string(d.join("fake.ids.txt")).unwrap()
    );
    assert_eq!(real_ids.lines().collect::<Vec<_>>(), want);
    let table = d.join("fidelity.csv");
    run_ok(
        radit()
            .args(["eval", "fidelity", "--kd-subset-size", "min", "--k", "3"])
            .args([
                "--model",
                "tiny",
                "--reference",
                "chexgenbench",
                "--network",
                "tiny-ts",
                "--real",
            ])
            .arg(&real)
            .arg("--fake")
            .arg(&fake)
            .arg("--csv")
            .arg(&table),
    );
    let text = std::fs::read_to_string(&table).unwrap();
    let row: Vec<&str> = text.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(&row[..3], ["tiny", "chexgenbench", "tiny-ts"]);
    let fd: f64 = row[7].parse().unwrap();
    assert!(fd.is_finite() && fd > 0.0, "{text}");
}

//! From the seven releases to a verified store, through the binary: `radit harmonise fixtures` writes every
//! source's native layout, `radit dicom survey` reads their DICOM headers, `radit harmonise all` builds one table (a
//! hold-out list forcing images into test), and `radit shard` ingests PNGs and DICOMs into a store that `radit shard
//! --verify` and zarr-python accept with the table's rows, labels and ages. Bad input exits 2 naming what is wrong.

mod common;

use std::path::Path;

use common::{check_store_with_zarr_python, fails_with_usage, radit, run_ok, stdout};

/// `radit shard` of a harmonised table into `store` at 16x16, then `radit shard --verify`; returns the manifest.
fn shard(table: &Path, images: &Path, store: &Path) -> serde_json::Value {
    run_ok(
        radit()
            .args([
                "shard",
                "--no-progress",
                "--image-size",
                "16",
                "--shard-images",
                "4",
                "--table",
            ])
            .arg(table)
            .arg("--images")
            .arg(images)
            .args(["--out", store.to_str().unwrap()]),
    );
    run_ok(radit().args(["shard", "--verify", store.to_str().unwrap()]));
    serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap()
}

/// Rows each source's fixture writes (read, written), as the per-source tests in sources/tests check them.
const WRITTEN: [(&str, u64, u64); 7] = [
    ("MIMIC-CXR", 8, 8),
    ("CheXpert-Plus", 7, 7),
    ("ReXGradient-160K", 8, 6),
    ("PadChest", 5, 5),
    ("VinDr-CXR", 6, 6),
    ("NIH-CXR14", 6, 5),
    ("BRAX", 4, 4),
];

#[test]
fn seven_releases_harmonise_into_one_table_that_shards_verifies_and_reads_in_zarr_python() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = run_ok(radit().args(["harmonise", "fixtures", "--out"]).arg(&data));
    assert!(stdout(&out).contains("sources.toml"), "{}", stdout(&out));

    // The survey sees every DICOM of the four DICOM sources without decoding one.
    let survey = run_ok(
        radit()
            .args(["dicom", "survey"])
            .arg(&data)
            .arg("--json")
            .arg(dir.path().join("survey.json")),
    );
    let text = stdout(&survey);
    assert!(text.contains("MONOCHROME1"), "{text}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("survey.json")).unwrap()).unwrap();
    assert!(json["dicom"].as_u64().unwrap() >= 10, "{json}");
    assert_eq!(json["unreadable_count"], 0, "{json}");

    let hold_out = dir.path().join("hold-out.txt");
    std::fs::write(
        &hold_out,
        "# CheXGenBench-style list: table ids or native ids\nPadChest:p1_a.png\n00000003_000.png\nno-such-image\n",
    )
    .unwrap();
    let table = dir.path().join("cxr7.csv");
    let out = run_ok(
        radit()
            .args(["harmonise", "all", "--config"])
            .arg(data.join("sources.toml"))
            .arg("--images")
            .arg(&data)
            .arg("--out")
            .arg(&table)
            .arg("--hold-out")
            .arg(&hold_out),
    );
    let text = stdout(&out);
    let total: u64 = WRITTEN.iter().map(|(_, _, w)| w).sum();
    for (source, read, written) in WRITTEN {
        let rejected = read - written;
        assert!(
            text.contains(&format!(
                "{source}: {read} rows read, {written} written, {rejected} rejected"
            )),
            "{source}: {text}"
        );
    }
    assert!(
        text.contains(
            "held out for test: 2 images; 1 listed ids match no row (first: no-such-image)"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("all: {total} rows from 7 sources")),
        "{text}"
    );
    assert!(
        text.contains(" rejected: see each source's report"),
        "{text}"
    );
    // A list none of whose ids is in the table is the wrong list: refused, naming it, no table written.
    let wrong = dir.path().join("wrong-ids.txt");
    std::fs::write(&wrong, "s50414267\nno-such-image\n").unwrap();
    let unwritten = dir.path().join("unwritten.csv");
    fails_with_usage(
        radit()
            .args(["harmonise", "all", "--config"])
            .arg(data.join("sources.toml"))
            .arg("--images")
            .arg(&data)
            .arg("--out")
            .arg(&unwritten)
            .arg("--hold-out")
            .arg(&wrong),
        "none of its 2 ids is an image of the table",
    );
    assert!(!unwritten.exists());
    assert!(dir.path().join("cxr7.vindr.report.json").exists());
    assert!(dir.path().join("cxr7.report.txt").exists());

    let store = dir.path().join("store");
    let manifest = shard(&table, &data, &store);
    assert_eq!(manifest["counts"]["accepted"], total, "{manifest}");
    assert_eq!(manifest["counts"]["rejected_images"], 0, "{manifest}");
    assert!(
        manifest["image_notes"]["dicom"].as_u64().unwrap() >= 10,
        "{manifest}"
    );

    let summary = dir.path().join("zarr.json");
    check_store_with_zarr_python(&store, &table, &data, &summary);
    let py: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    let test: Vec<&str> = py["test"]["image_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // The held-out images, and the rest of their patients' images with them.
    for id in [
        "PadChest:p1_a.png",
        "PadChest:p1_b.png",
        "NIH-CXR14:00000003_000.png",
    ] {
        assert!(test.contains(&id), "{id} not in test: {test:?}");
    }
    let stored: usize = ["train", "val", "test"]
        .iter()
        .map(|s| py[s]["image_ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(stored as u64, total);
}

#[test]
fn bad_releases_and_configs_exit_2_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    // A release without its table.
    fails_with_usage(
        radit()
            .args(["harmonise", "nih", "--root"])
            .arg(&empty)
            .arg("--out")
            .arg(dir.path().join("x.csv")),
        "Data_Entry_2017_v2020.csv",
    );
    // A source root outside the images folder, and an unknown source.
    let config = dir.path().join("sources.toml");
    let all = |config: &Path| {
        let mut c = radit();
        c.args(["harmonise", "all", "--config"])
            .arg(config)
            .arg("--images")
            .arg(&empty)
            .arg("--out")
            .arg(dir.path().join("all.csv"));
        c
    };
    std::fs::write(&config, "[nih]\nroot = \"../elsewhere\"\n").unwrap();
    fails_with_usage(&mut all(&config), "[nih] root `../elsewhere`");
    std::fs::write(&config, "[chexpert]\nroot = \"x\"\n").unwrap();
    fails_with_usage(&mut all(&config), "unknown field `chexpert`");
    std::fs::write(&config, "[vindr]\nroot = \"v\"\ndefault_view = \"LL\"\n").unwrap();
    fails_with_usage(&mut all(&config), "[vindr] default_view");
    // A bad knob on the command line.
    fails_with_usage(
        radit()
            .args(["harmonise", "vindr", "--root"])
            .arg(&empty)
            .args(["--default-view", "XX", "--out"])
            .arg(dir.path().join("v.csv")),
        "--default-view",
    );
    assert!(!dir.path().join("all.csv").exists(), "nothing written");
}

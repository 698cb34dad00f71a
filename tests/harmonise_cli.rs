//! `radit harmonise` then `radit shard` through the binary: a source in its native layout becomes a verified store.

mod common;

use std::path::Path;

use common::{radit, run_ok, stderr, stdout};

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

#[test]
fn nih_as_released_harmonises_shards_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ChestX-ray14");
    std::fs::create_dir_all(root.join("images_001/images")).unwrap();
    let mut lines = vec![
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,\
         OriginalImage[Width, Height],OriginalImagePixelSpacing[x, y]"
            .to_string(),
    ];
    for i in 0..6u16 {
        let name = format!("0000000{i}_000.png");
        let pixels: Vec<u16> = (0..24 * 20u16).map(|p| p.wrapping_mul(97 + i)).collect();
        std::fs::write(
            root.join("images_001/images").join(&name),
            radit_sharding::image::encode_png16(24, 20, &pixels),
        )
        .unwrap();
        let labels = ["No Finding", "Effusion|Mass", "Cardiomegaly"][usize::from(i % 3)];
        lines.push(format!(
            "{name},{labels},0,{i},{},M,PA,24,20,0.1,0.1",
            40 + i
        ));
    }
    // A row whose image is missing: rejected by harmonise, not by the shard.
    lines.push("09999999_000.png,No Finding,0,9,50,F,AP,24,20,0.1,0.1".into());
    std::fs::write(root.join("Data_Entry_2017_v2020.csv"), lines.join("\n")).unwrap();

    let table = dir.path().join("nih.csv");
    let out = run_ok(
        radit()
            .args(["harmonise", "nih", "--root"])
            .arg(&root)
            .arg("--out")
            .arg(&table),
    );
    let text = stdout(&out);
    assert!(
        text.contains("7 rows read, 6 written, 1 rejected"),
        "{text}"
    );
    assert!(dir.path().join("nih.report.json").exists());
    let manifest = shard(&table, &root, &dir.path().join("store"));
    assert_eq!(manifest["counts"]["accepted"], 6, "{manifest}");
    assert_eq!(manifest["counts"]["rejected_images"], 0, "{manifest}");

    // A release without its table is bad input: exit 2, naming what is missing.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let bad = radit()
        .args(["harmonise", "nih", "--root"])
        .arg(&empty)
        .arg("--out")
        .arg(dir.path().join("x.csv"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("Data_Entry_2017_v2020.csv"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn padchest_as_released_harmonises_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("PadChest");
    let mut lines = vec![
        "ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,Projection,Labels"
            .to_string(),
    ];
    for i in 0..5u16 {
        let folder = root.join((i % 2).to_string());
        std::fs::create_dir_all(&folder).unwrap();
        let name = format!("{i}_img.png");
        let pixels: Vec<u16> = (0..20 * 24u16).map(|p| p.wrapping_mul(31 + i)).collect();
        std::fs::write(
            folder.join(&name),
            radit_sharding::image::encode_png16(20, 24, &pixels),
        )
        .unwrap();
        let labels =
            ["\"['normal']\"", "\"['cardiomegaly', ' NSG tube']\"", "nan"][usize::from(i % 3)];
        lines.push(format!(
            "{name},{},2015{:02}01,s{i},p{i},1950,F,PA,{labels}",
            i % 2,
            i + 1
        ));
    }
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"),
        lines.join("\n"),
    )
    .unwrap();
    let table = dir.path().join("padchest.csv");
    let out = run_ok(
        radit()
            .args(["harmonise", "padchest", "--root"])
            .arg(&root)
            .arg("--out")
            .arg(&table),
    );
    assert!(
        stdout(&out).contains("5 rows read, 5 written, 0 rejected"),
        "{}",
        stdout(&out)
    );
    let manifest = shard(&table, &root, &dir.path().join("store"));
    assert_eq!(manifest["counts"]["accepted"], 5, "{manifest}");
}

#[test]
fn brax_dicoms_harmonise_and_shard_through_the_dicom_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("BRAX");
    let findings = "No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Lesion,Lung Opacity,Edema,\
Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices";
    let mut lines = vec![format!(
        "DicomPath,PngPath,PatientID,AccessionNumber,ViewPosition,PatientSex,PatientAge,Manufacturer,StudyDate,\
Rows,Columns,{findings}"
    )];
    for i in 0..4u16 {
        let path = format!("Anonymized_DICOMs/id_{i}/Study_1/Series_1/image-{i}.dcm");
        let file = root.join(&path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let pixels: Vec<u16> = (0..24 * 20u16).map(|p| (p * (7 + i)) & 0x0FFF).collect();
        let mut f = radit_dicom::fixture::Fixture::grey(20, 24, 12, pixels);
        f.photometric = if i % 2 == 0 {
            "MONOCHROME1"
        } else {
            "MONOCHROME2"
        }
        .into();
        f.windows = vec![(2048.0, 3000.0)];
        std::fs::write(&file, f.to_bytes()).unwrap();
        let png = path
            .replace("Anonymized_DICOMs", "images")
            .replace(".dcm", ".png");
        lines.push(format!(
            "{path},{png},{i},a{i},PA,F,{},GE,20190101,20,24,1,,0,,,,,,,,,,,",
            30 + i
        ));
    }
    std::fs::write(root.join("master_spreadsheet_update.csv"), lines.join("\n")).unwrap();
    let table = dir.path().join("brax.csv");
    let out = run_ok(
        radit()
            .args(["harmonise", "brax", "--root"])
            .arg(&root)
            .arg("--out")
            .arg(&table),
    );
    assert!(
        stdout(&out).contains("4 rows read, 4 written, 0 rejected"),
        "{}",
        stdout(&out)
    );
    let manifest = shard(&table, &root, &dir.path().join("store"));
    assert_eq!(manifest["counts"]["accepted"], 4, "{manifest}");
    assert_eq!(manifest["image_notes"]["dicom"], 4, "{manifest}");
    assert_eq!(
        manifest["image_notes"]["dicom_monochrome1"], 2,
        "{manifest}"
    );
}

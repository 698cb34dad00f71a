//! ReXGradient-160K from its fixture in the native layout (three metadata JSONs, PNGs under `deid_png/`): ages as an
//! Age String, a number and empty, a study whose lists differ in length (rejected naming file and study key), studies
//! in the valid and test files, no labels file; then a labels CSV, and a metadata file that is not JSON.

use radit_sharding::schema::FINDINGS;
use radit_sharding::table::{TableConfig, read_table};
use radit_sources::SourceError;
use radit_sources::output::{Finding, write_table};
use radit_sources::rexgradient::{RexGradientOptions, TABLES, harmonise, write_fixture};

fn image(n: u32, i: u32) -> String {
    let study = format!("1.2.826.0.1.3680043.8.498.{}", 100 + n);
    format!(
        "deid_png/GRDN000{n}/GRDNA100{n}/studies/{study}/series/{study}.1/instances/{study}.1.{i}.png"
    )
}

#[test]
fn the_native_release_harmonises_to_the_hand_written_values() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let (rows, audit) = harmonise(&RexGradientOptions::new(dir.path())).unwrap();
    let expected = [
        (
            image(1, 1),
            "GRDN0001",
            Some(45.0),
            Some("Female"),
            Some("PA"),
        ),
        (
            image(1, 2),
            "GRDN0001",
            Some(45.0),
            Some("Female"),
            Some("Lateral"),
        ),
        (
            image(2, 1),
            "GRDN0002",
            Some(62.0),
            Some("Male"),
            Some("AP"),
        ),
        (
            image(4, 1),
            "GRDN0004",
            Some(30.0),
            Some("Female"),
            Some("Lateral"),
        ),
        (image(5, 1), "GRDN0005", None, None, None),
        (image(5, 2), "GRDN0005", None, None, Some("AP")),
    ];
    assert_eq!(rows.len(), expected.len());
    for (row, (path, patient, age, sex, view)) in rows.iter().zip(expected) {
        assert_eq!(row.image_id, format!("ReXGradient-160K:{path}"));
        assert_eq!(row.patient_id, format!("ReXGradient-160K:{patient}"));
        assert_eq!(row.path, path);
        assert_eq!(
            (row.age, row.sex, row.race, row.view),
            (age, sex, None, view),
            "{path}"
        );
        assert_eq!(row.findings, [Finding::Missing; 14]);
    }

    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (8, 6, 2)
    );
    assert_eq!(
        audit.rejected_by_reason["ImagePath and ImageViewPosition lengths differ"],
        2
    );
    let train = dir.path().join(TABLES[0]).display().to_string();
    for (i, r) in audit.rejections.iter().enumerate() {
        assert_eq!((r.file.as_str(), r.line), (train.as_str(), 0));
        assert_eq!(r.id, image(3, i as u32 + 1));
        let key = format!("study pGRDN0003_aGRDNA1003_s1.2.826.0.1.3680043.8.498.103, image {i}");
        assert!(r.reason.starts_with(&key), "{}", r.reason);
        assert!(
            r.reason.contains("2 ImagePath but 1 ImageViewPosition"),
            "{}",
            r.reason
        );
    }
    let v = |column: &str, raw: &str, to: &str| audit.values[column][raw].get(to).copied();
    assert_eq!(v("PatientAge", "045Y", "45"), Some(2));
    assert_eq!(v("PatientAge", "62", "62"), Some(1));
    assert_eq!(v("PatientAge", "", ""), Some(2));
    assert_eq!(v("PatientSex", "O", ""), Some(2));
    assert_eq!(v("ImageViewPosition", "LL", "Lateral"), Some(1));
    assert_eq!(v("ImageViewPosition", "", ""), Some(1));
    assert_eq!(v("labels", "(no labels file)", ""), Some(6));
    assert!(audit.summary().contains("(no labels file)"));

    assert_eq!(
        radit_sources::fixtures::undecodable(dir.path(), &rows),
        [""; 0]
    );
    let out = dir.path().join("rexgradient.csv");
    write_table(&out, &rows).unwrap();
    let table = read_table(&out, &TableConfig::default()).unwrap();
    assert_eq!(table.rows.len(), 6);
    assert!(table.rejected.is_empty(), "{:?}", table.rejected);
    assert_eq!(table.warnings.total(), 0, "{:?}", table.warnings);
}

#[test]
fn labels_join_on_the_chosen_record_key() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let names = "Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,\
                 Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices";
    let labels = dir.path().join("labels.csv");
    std::fs::write(
        &labels,
        format!(
            "AccessionNumber,{names}\nGRDNA1001,,1.0,,,,,,,,,,,,-1\nGRDNA1004,,,,,,,,,1,,,,,\nGRDNA1999,,,,,,,,,1,,,,,\n"
        ),
    )
    .unwrap();
    let opts = RexGradientOptions {
        labels: Some(labels),
        labels_key: "AccessionNumber".into(),
        ..RexGradientOptions::new(dir.path())
    };
    let (rows, audit) = harmonise(&opts).unwrap();
    let f =
        |r: usize, name: &str| rows[r].findings[FINDINGS.iter().position(|f| *f == name).unwrap()];
    assert_eq!(f(0, "cardiomegaly"), Finding::Positive);
    assert_eq!(f(1, "support_devices"), Finding::Uncertain);
    assert_eq!(f(1, "edema"), Finding::Missing);
    assert_eq!(f(2, "no_finding"), Finding::Missing);
    assert_eq!(f(3, "no_finding"), Finding::Positive);
    let v = |raw: &str| audit.values["label row"][raw].values().sum::<u64>();
    assert_eq!(v("found"), 3);
    assert_eq!(v("none for the study"), 3);
    assert_eq!(v("for no study (unused)"), 1);
}

#[test]
fn a_metadata_file_that_is_not_json_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let valid = dir.path().join(TABLES[1]);
    std::fs::write(&valid, "{\n  \"study\": {\"ImagePath\": [\n").unwrap();
    let e = harmonise(&RexGradientOptions::new(dir.path())).unwrap_err();
    match &e {
        SourceError::InvalidInput { path, .. } => assert_eq!(path, &valid),
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string().contains("valid_metadata_view_position.json"),
        "{e}"
    );

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        harmonise(&RexGradientOptions::new(empty.path())),
        Err(SourceError::NoTable { .. })
    ));
}

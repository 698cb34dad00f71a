//! MIMIC-CXR from its fixture in the native layout (gzipped tables, DICOMs at their paths, MIMIC-IV beside it): a study
//! with three images and one label row, a subject absent from `patients`, a subject with two races, `XTABLE LATERAL`,
//! a study with no label row and a label row with no image; then bad input naming its file and line.

use std::path::Path;

use radit_sharding::schema::FINDINGS;
use radit_sharding::table::{TableConfig, read_table};
use radit_sources::SourceError;
use radit_sources::mimic::{AGE_COLUMN, MimicImage, MimicOptions, harmonise, write_fixture};
use radit_sources::output::{Finding, write_table};

/// The findings with the given values, the rest missing.
fn findings(set: &[(&str, Finding)]) -> [Finding; 14] {
    FINDINGS.map(|f| {
        set.iter()
            .find(|(n, _)| *n == f)
            .map_or(Finding::Missing, |s| s.1)
    })
}

/// Every finding negative except `no_finding` and the positives.
fn all_negative_but(positive: &[&str]) -> [Finding; 14] {
    FINDINGS.map(|f| {
        if positive.contains(&f) {
            Finding::Positive
        } else {
            Finding::Negative
        }
    })
}

fn fixture() -> (tempfile::TempDir, MimicOptions) {
    let dir = tempfile::tempdir().unwrap();
    let (root, iv) = (dir.path().join("mimic-cxr"), dir.path().join("mimiciv"));
    write_fixture(&root, &iv).unwrap();
    (dir, MimicOptions::new(&root, &iv))
}

#[test]
fn the_native_release_harmonises_to_the_hand_written_values() {
    use Finding::*;
    let (dir, opts) = fixture();
    let (rows, audit) = harmonise(&opts).unwrap();
    let study1 = findings(&[
        ("cardiomegaly", Positive),
        ("edema", Uncertain),
        ("pleural_effusion", Negative),
        ("support_devices", Positive),
    ]);
    #[rustfmt::skip]
    let expected = [
        ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", Some(52.0), Some("Female"), Some("White"), Some("PA"), study1),
        ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", Some(52.0), Some("Female"), Some("White"), Some("Lateral"), study1),
        ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "50414267", Some(52.0), Some("Female"), Some("White"), None, study1),
        ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", Some(86.0), Some("Male"), None, Some("AP"), findings(&[("no_finding", Positive)])),
        ("4904ef8e-1e18f54b-1bbd9b0c-3b2a6c1d-9e1e4f6b", "10000898", "50771383", None, None, None, None, [Missing; 14]),
        ("5a4b0d1e-3c2f7a6b-8d9e0f1a-2b3c4d5e-6f7a8b9c", "10001217", "58913004", Some(55.0), Some("Female"), Some("Black"), Some("Lateral"), findings(&[
            ("atelectasis", Positive), ("cardiomegaly", Negative), ("consolidation", Uncertain), ("lung_opacity", Positive),
            ("no_finding", Negative), ("pleural_effusion", Positive), ("pneumonia", Negative), ("pneumothorax", Negative),
        ])),
        ("6b5c1e2f-4d3a8b7c-9eaf1b2c-3d4e5f6a-7b8c9dae", "10001217", "52067803", Some(57.0), Some("Female"), Some("Black"), Some("AP"), findings(&[("fracture", Positive), ("no_finding", Negative)])),
        ("7c6d2f3a-5e4b9c8d-afb02c3d-4e5f6a7b-8c9daebf", "10002428", "59258774", Some(81.0), Some("Female"), Some("Asian"), Some("AP"), all_negative_but(&["no_finding"])),
    ];
    assert_eq!(rows.len(), expected.len());
    for (row, (id, subject, study, age, sex, race, view, f)) in rows.iter().zip(expected) {
        assert_eq!(row.image_id, format!("MIMIC-CXR:{id}"));
        assert_eq!(row.patient_id, format!("MIMIC-CXR:{subject}"));
        assert_eq!(row.dataset, "MIMIC-CXR");
        let prefix = &subject[..2];
        assert_eq!(
            row.path,
            format!("files/p{prefix}/p{subject}/s{study}/{id}.dcm")
        );
        assert_eq!(
            (row.age, row.sex, row.race, row.view),
            (age, sex, race, view),
            "{id}"
        );
        assert_eq!(row.findings, f, "{id}");
    }

    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (8, 8, 0)
    );
    assert!(audit.rejected_by_reason.is_empty());
    let v = |column: &str, raw: &str, to: &str| audit.values[column][raw].get(to).copied();
    assert_eq!(v("label row", "found", "used"), Some(7));
    assert_eq!(v("label row", "none for the study", ""), Some(1));
    assert_eq!(v("label row", "for no study (unused)", ""), Some(1));
    assert_eq!(v("ViewPosition", "XTABLE LATERAL", ""), Some(1));
    assert_eq!(v("ViewPosition", "", ""), Some(1));
    assert_eq!(v("ViewPosition", "LL", "Lateral"), Some(1));
    assert_eq!(
        v("race", "inconsistent: BLACK/AFRICAN AMERICAN | WHITE", ""),
        Some(1)
    );
    assert_eq!(v("race", "BLACK/CAPE VERDEAN", "Black"), Some(2));
    assert_eq!(v("gender", "(subject not in patients)", ""), Some(1));
    assert_eq!(v(AGE_COLUMN, "(subject not in patients)", ""), Some(1));
    assert_eq!(v(AGE_COLUMN, "52", "52"), Some(3));
    assert_eq!(v("Fracture", "1", "1"), Some(1));
    assert!(audit.summary().contains("for no study (unused)"));

    assert_eq!(
        radit_sources::fixtures::undecodable(&opts.source.root, &rows),
        [""; 0]
    );

    // chexploration's recipe instead: the subject whose admissions disagree is dropped, with its line.
    let strict = MimicOptions {
        race_conflict: radit_sources::mimic::RaceConflict::Reject,
        ..opts.clone()
    };
    let (_, audit) = harmonise(&strict).unwrap();
    assert_eq!((audit.rows.written, audit.rows.rejected), (7, 1));
    assert_eq!(audit.rejections[0].line, 5);
    assert!(
        audit.rejections[0]
            .reason
            .contains("subject 10000764: inconsistent"),
        "{:?}",
        audit.rejections
    );
    let out = dir.path().join("mimic.csv");
    write_table(&out, &rows).unwrap();
    let table = read_table(&out, &TableConfig::default()).unwrap();
    assert_eq!(table.rows.len(), 8);
    assert!(table.rejected.is_empty(), "{:?}", table.rejected);
    assert_eq!(table.warnings.total(), 0, "{:?}", table.warnings);

    // The JPG copies: the same ids, `.jpg` paths (not in the fixture, so unchecked).
    let mut jpg = opts.clone();
    jpg.image = MimicImage::Jpg;
    jpg.source.check_files = false;
    let (rows, _) = harmonise(&jpg).unwrap();
    assert_eq!(
        rows[0].path,
        "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    );
    assert!(rows[0].image_id.ends_with("4e384014"));
    // And with JPGs expected but absent, every row is rejected as missing its image.
    jpg.source.check_files = true;
    let (rows, audit) = harmonise(&jpg).unwrap();
    assert!(rows.is_empty());
    assert_eq!(audit.rejected_by_reason["image file not found"], 8);
}

const HEADER: &str = "dicom_id,subject_id,study_id,ViewPosition,StudyDate";

fn table(dir: &Path, lines: &[&str]) -> std::path::PathBuf {
    let path = dir.join("metadata.csv");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn bad_rows_are_rejected_or_counted_with_their_file_and_line() {
    let (dir, mut opts) = fixture();
    let d1 = "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014";
    let d2 = "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962";
    let path = table(
        dir.path(),
        &[
            HEADER,
            &format!("{d1},10000032,50414267,PA,21800506"),
            ",10000032,50414267,PA,21800506",
            &format!("{d2},10000032,50414267,LATERAL,May 6"),
            &format!("{d1},10000032,50414267,PA,21800506"),
            "d9,10000032,50414267,PA,21800506",
        ],
    );
    opts.source.table = Some(path.clone());
    let (rows, audit) = harmonise(&opts).unwrap();
    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (5, 2, 3)
    );
    assert_eq!(
        rows[1].age, None,
        "an unparseable StudyDate makes the age missing"
    );
    assert_eq!(rows[1].view, Some("Lateral"));
    assert_eq!(
        audit.values[AGE_COLUMN]["StudyDate `May 6` is not YYYYMMDD"][""],
        1
    );
    let note = &audit.notes[0];
    assert_eq!((note.line, note.id.as_str()), (4, d2));
    assert!(note.file.ends_with("metadata.csv"), "{note:?}");
    assert!(
        note.reason.starts_with("age not understood") && note.reason.contains("May 6"),
        "{note:?}"
    );
    let got: Vec<(u64, &str)> = audit
        .rejections
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    assert_eq!(got[0], (3, "empty dicom_id"));
    assert_eq!(got[1].0, 5);
    assert!(got[1].1.contains("also on line 2"), "{got:?}");
    assert_eq!(got[2].0, 6);
    assert!(got[2].1.contains("d9.dcm"), "{got:?}");
    assert!(
        audit
            .rejections
            .iter()
            .all(|r| r.file == path.display().to_string())
    );
    assert_eq!(audit.rejected_by_reason["empty dicom_id"], 1);
    assert_eq!(audit.rejected_by_reason["duplicate dicom_id"], 1);
    assert_eq!(audit.rejected_by_reason["image file not found"], 1);
}

#[test]
fn a_missing_column_names_the_column_and_the_file() {
    let (dir, mut opts) = fixture();
    let path = table(
        dir.path(),
        &["dicom_id,subject_id,study_id,StudyDate", "a,1,2,21800506"],
    );
    opts.source.table = Some(path.clone());
    match harmonise(&opts) {
        Err(SourceError::MissingColumn {
            path: p, column, ..
        }) => {
            assert_eq!((p, column.as_str()), (path, "ViewPosition"));
        }
        other => panic!("{other:?}"),
    }
    // Admissions with neither `race` nor `ethnicity`.
    let iv = dir.path().join("iv-norace");
    std::fs::create_dir_all(iv.join("hosp")).unwrap();
    std::fs::copy(
        opts.mimic_iv.join("hosp/patients.csv.gz"),
        iv.join("hosp/patients.csv.gz"),
    )
    .unwrap();
    std::fs::write(iv.join("hosp/admissions.csv"), "subject_id,hadm_id\n1,2\n").unwrap();
    opts.source.table = None;
    opts.mimic_iv = iv;
    let e = harmonise(&opts).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("admissions.csv") && text.contains("race (or ethnicity)"),
        "{text}"
    );
}

#[test]
fn mimic_iv_1_0_ethnicity_in_a_plain_csv() {
    let (dir, mut opts) = fixture();
    let iv = dir.path().join("iv-1.0");
    std::fs::create_dir_all(iv.join("hosp")).unwrap();
    std::fs::write(
        iv.join("hosp/patients.csv"),
        "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod\n10000032,F,52,2180,2014 - 2016,\n",
    )
    .unwrap();
    std::fs::write(
        iv.join("hosp/admissions.csv"),
        "subject_id,hadm_id,ethnicity\n10000032,1,ASIAN\n10000032,2,\n",
    )
    .unwrap();
    opts.mimic_iv = iv;
    let (rows, audit) = harmonise(&opts).unwrap();
    assert_eq!(rows[0].race, Some("Asian"));
    assert_eq!(audit.values["ethnicity"]["ASIAN"]["Asian"], 3);
    assert_eq!(rows[3].sex, None, "10000764 is not in this patients table");
}

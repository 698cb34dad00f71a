//! CheXpert-Plus from its fixture in the native layout (the table with multiline quoted reports, DICOMs and PNGs,
//! CheXbert's JSON lines): age 0, `Unknown` sex, `ap_pa` `LL`, a lateral, race strings that map and one that does not,
//! a JSON line of `null`s, an image with no JSON line; then a broken JSON line, an error naming the file and line.

use radit_sharding::schema::FINDINGS;
use radit_sharding::table::{TableConfig, read_table};
use radit_sources::SourceError;
use radit_sources::chexpert_plus::{
    ChexpertPlusOptions, LABELS, PlusImage, TABLE, harmonise, write_fixture,
};
use radit_sources::output::{Finding, write_table};

/// The findings with the given values, the rest missing.
fn findings(set: &[(&str, Finding)]) -> [Finding; 14] {
    FINDINGS.map(|f| {
        set.iter()
            .find(|(n, _)| *n == f)
            .map_or(Finding::Missing, |s| s.1)
    })
}

#[test]
fn the_native_release_harmonises_to_the_hand_written_values() {
    use Finding::*;
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let opts = ChexpertPlusOptions::new(dir.path());
    let (rows, audit) = harmonise(&opts).unwrap();
    let mut all_negative = [Negative; 14];
    all_negative[FINDINGS.iter().position(|f| *f == "no_finding").unwrap()] = Positive;
    #[rustfmt::skip]
    let expected = [
        ("train/patient00001/study1/view1_frontal", "patient00001", Some(68.0), Some("Female"), Some("White"), Some("PA"),
            findings(&[("cardiomegaly", Positive), ("edema", Uncertain), ("pleural_effusion", Negative), ("support_devices", Positive)])),
        ("train/patient00001/study1/view2_lateral", "patient00001", Some(68.0), Some("Female"), Some("White"), Some("Lateral"), [Missing; 14]),
        ("train/patient00002/study1/view1_frontal", "patient00002", None, Some("Male"), Some("Black"), Some("AP"), all_negative),
        ("train/patient00003/study1/view1_frontal", "patient00003", Some(45.0), None, Some("Asian"), None,
            findings(&[("atelectasis", Positive), ("lung_opacity", Positive), ("pneumonia", Uncertain)])),
        ("train/patient00004/study1/view1_frontal", "patient00004", Some(77.0), Some("Male"), None, Some("AP"), [Missing; 14]),
        ("train/patient00004/study2/view1_frontal", "patient00004", Some(78.0), Some("Male"), None, Some("PA"), findings(&[("fracture", Positive)])),
        ("valid/patient00005/study1/view1_frontal", "patient00005", Some(34.0), Some("Female"), Some("White"), Some("PA"), findings(&[("no_finding", Positive)])),
    ];
    assert_eq!(rows.len(), expected.len());
    for (row, (stem, patient, age, sex, race, view, f)) in rows.iter().zip(expected) {
        assert_eq!(row.image_id, format!("CheXpert-Plus:{stem}.jpg"));
        assert_eq!(row.patient_id, format!("CheXpert-Plus:{patient}"));
        assert_eq!(row.path, format!("DICOM/{stem}.dcm"));
        assert_eq!(
            (row.age, row.sex, row.race, row.view),
            (age, sex, race, view),
            "{stem}"
        );
        assert_eq!(row.findings, f, "{stem}");
    }

    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (7, 7, 0)
    );
    let v = |column: &str, raw: &str, to: &str| audit.values[column][raw].get(to).copied();
    assert_eq!(v("label row", "found", "used"), Some(6));
    assert_eq!(v("label row", "none for the image", ""), Some(1));
    assert_eq!(v("age", "0", ""), Some(1));
    assert_eq!(v("sex", "Unknown", ""), Some(1));
    assert_eq!(v("race", "Other", ""), Some(2));
    assert_eq!(v("race", "White, non-Hispanic", "White"), Some(1));
    assert_eq!(v("frontal_lateral, ap_pa", "Frontal, LL", ""), Some(1));
    assert_eq!(v("frontal_lateral, ap_pa", "Lateral, ", "Lateral"), Some(1));
    assert_eq!(
        v("Support Devices", "", ""),
        Some(4),
        "null, absent key: missing"
    );

    assert_eq!(
        radit_sources::fixtures::undecodable(dir.path(), &rows),
        [""; 0]
    );
    let out = dir.path().join("chexpert-plus.csv");
    write_table(&out, &rows).unwrap();
    let table = read_table(&out, &TableConfig::default()).unwrap();
    assert_eq!(table.rows.len(), 7);
    assert!(table.rejected.is_empty(), "{:?}", table.rejected);
    assert_eq!(table.warnings.total(), 0, "{:?}", table.warnings);

    // The PNG copies: the same ids, the PNG paths, all present.
    let png = ChexpertPlusOptions {
        image: PlusImage::Png,
        ..opts
    };
    let (rows, audit) = harmonise(&png).unwrap();
    assert_eq!(audit.rows.written, 7);
    assert_eq!(
        radit_sources::fixtures::undecodable(dir.path(), &rows),
        [""; 0]
    );
    assert_eq!(
        rows[6].path,
        "PNG/valid/patient00005/study1/view1_frontal.png"
    );
    assert_eq!(
        rows[6].image_id,
        "CheXpert-Plus:valid/patient00005/study1/view1_frontal.jpg"
    );
}

#[test]
fn a_label_line_that_is_not_json_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let labels = dir.path().join(LABELS);
    let text = std::fs::read_to_string(&labels).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{\"path_to_image\": \"train/patient00002/study1/view1_frontal.jpg\", \"Edema\": 1";
    std::fs::write(&labels, lines.join("\n")).unwrap();
    match harmonise(&ChexpertPlusOptions::new(dir.path())) {
        Err(e @ SourceError::InvalidInput { .. }) => {
            let SourceError::InvalidInput { path, line, .. } = &e else {
                unreachable!()
            };
            assert_eq!((path, *line), (&labels, 3));
            assert!(e.to_string().contains("report_fixed.json: line 3"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rows_after_a_multiline_report_are_rejected_with_their_own_line() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let table = dir.path().join(TABLE);
    let mut text = std::fs::read_to_string(&table).unwrap();
    // The last record's report spans four lines, so the table has 11 lines; a duplicate of the first row comes next.
    assert_eq!(text.lines().count(), 11);
    let first = text.lines().nth(1).unwrap().to_string();
    text.push_str(&first);
    text.push('\n');
    text.push_str(",,,,patient9,,,,,,,,,,\n");
    std::fs::write(&table, text).unwrap();
    let (rows, audit) = harmonise(&ChexpertPlusOptions::new(dir.path())).unwrap();
    assert_eq!(rows.len(), 7);
    let got: Vec<(u64, &str)> = audit
        .rejections
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, 12);
    assert!(got[0].1.contains("also on line 2"), "{got:?}");
    assert_eq!(got[1], (13, "empty path_to_image"));
}

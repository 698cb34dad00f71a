//! VinDr-CXR from its synthetic release: the readers' vote, the consensus test file and its spelling, and the
//! demographics from the DICOM headers, against hand-written rows; a missing DICOM, a bad label cell and a missing
//! column are rejected or refused with the file and line.

use radit_sharding::table::{TableConfig, read_table};
use radit_sources::output::write_table;
use radit_sources::vindr::{VindrOptions, harmonise, write_fixture};

/// The findings of a row in schema order, as the table writes them.
fn findings(r: &radit_sources::output::HarmonisedRow) -> String {
    r.findings
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn the_vote_the_consensus_and_the_headers_give_the_hand_written_rows() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    let (rows, audit) = harmonise(&VindrOptions::new(dir.path())).unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.image_id.as_str(),
                r.patient_id.as_str(),
                r.path.as_str(),
                r.age,
                r.sex,
                r.view,
                findings(r),
            )
        })
        .collect();
    // atel card cons edema ecm frac lesion opacity nofind effusion plother pneumonia ptx devices
    let normal = "0,0,0,0,0,0,0,0,1,0,0,0,0,";
    let expected = vec![
        // Cardiomegaly 2 of 3 wins; Pleural effusion 1 of 3 does not. MONOCHROME1, PA.
        (
            "VinDr-CXR:v1",
            "VinDr-CXR:v1",
            "train/v1.dicom",
            Some(45.0),
            Some("Male"),
            Some("PA"),
            "0,1,0,0,0,0,0,0,0,0,0,0,0,".to_string(),
        ),
        // Unanimous normal; 000Y is a missing age; no ViewPosition is PA.
        (
            "VinDr-CXR:v2",
            "VinDr-CXR:v2",
            "train/v2.dicom",
            None,
            Some("Female"),
            Some("PA"),
            normal.to_string(),
        ),
        // Four readers, Nodule/Mass 2 of 4; no age; sex O; AP.
        (
            "VinDr-CXR:v3",
            "VinDr-CXR:v3",
            "train/v3.dicom",
            None,
            None,
            Some("AP"),
            "0,0,0,0,0,0,1,0,0,0,0,0,0,".to_string(),
        ),
        // One reader of three saw a pneumothorax: nothing wins, every mapped finding is negative. LL is lateral.
        (
            "VinDr-CXR:v4",
            "VinDr-CXR:v4",
            "train/v4.dicom",
            Some(62.0),
            Some("Female"),
            Some("Lateral"),
            "0,0,0,0,0,0,0,0,0,0,0,0,0,".to_string(),
        ),
        // The consensus file, `Other disease` spelling: unmapped, counted.
        (
            "VinDr-CXR:t1",
            "VinDr-CXR:t1",
            "test/t1.dicom",
            Some(30.0),
            Some("Male"),
            Some("PA"),
            "0,1,0,0,0,0,0,0,0,0,0,0,0,".to_string(),
        ),
        (
            "VinDr-CXR:t2",
            "VinDr-CXR:t2",
            "test/t2.dicom",
            Some(71.0),
            Some("Female"),
            Some("PA"),
            normal.to_string(),
        ),
    ];
    assert_eq!(got, expected);
    assert_eq!(
        radit_sources::fixtures::undecodable(dir.path(), &rows),
        [""; 0]
    );
    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (6, 6, 0)
    );
    assert_eq!(audit.values["readers per image"]["3"]["3"], 3);
    assert_eq!(audit.values["readers per image"]["4"]["not 3"], 1);
    assert_eq!(
        audit.values["votes (label: readers who marked it)"]["Pleural effusion: 1 of 3"]["absent"],
        1
    );
    assert_eq!(audit.values["PatientAge (DICOM)"]["000Y"][""], 1);
    assert_eq!(audit.values["ViewPosition (DICOM)"]["(absent)"]["PA"], 1);
    assert_eq!(audit.labels.unmapped["Other diseases"], 1);
    assert_eq!(audit.labels.touched["Cardiomegaly"], 2);

    let out = dir.path().join("vindr.csv");
    write_table(&out, &rows).unwrap();
    let table = read_table(&out, &TableConfig::default()).unwrap();
    assert_eq!(table.rows.len(), 6);
    assert!(table.rejected.is_empty(), "{:?}", table.rejected);
    assert_eq!(table.warnings.total(), 0, "{:?}", table.warnings);

    // Any one reader is enough with --min-votes 1; no default view leaves v2's view missing.
    let opts = VindrOptions {
        min_votes: 1,
        default_view: None,
        ..VindrOptions::new(dir.path())
    };
    let (rows, _) = harmonise(&opts).unwrap();
    assert_eq!(findings(&rows[0]), "0,1,0,0,0,0,0,0,0,1,0,0,0,");
    assert_eq!(findings(&rows[3]), "0,0,0,0,0,0,0,0,0,0,0,0,1,");
    assert_eq!(rows[1].view, None);
}

#[test]
fn a_missing_dicom_and_a_bad_label_are_rejected_with_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path()).unwrap();
    std::fs::remove_file(dir.path().join("train/v2.dicom")).unwrap();
    let table = dir.path().join("annotations/image_labels_test.csv");
    let text = std::fs::read_to_string(&table).unwrap();
    // t2's first label cell becomes 2.
    std::fs::write(&table, text.replace("t2,0,", "t2,2,")).unwrap();
    let (rows, audit) = harmonise(&VindrOptions::new(dir.path())).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (6, 4, 2)
    );
    let r = &audit.rejections;
    assert!(r[0].reason.contains("train/v2.dicom"), "{r:?}");
    assert_eq!(r[0].line, 5, "v2's first annotation row");
    assert!(r[1].file.ends_with("image_labels_test.csv"), "{r:?}");
    assert_eq!(r[1].line, 3);
    assert!(r[1].reason.contains("`Aortic enlargement` is `2`"), "{r:?}");

    // A table without image_id is refused, naming the column and the file.
    std::fs::write(&table, "id,No finding\nx,1\n").unwrap();
    let e = harmonise(&VindrOptions::new(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("image_id") && e.contains("image_labels_test.csv"),
        "{e}"
    );
}

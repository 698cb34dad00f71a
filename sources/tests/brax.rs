//! BRAX from a fixture in its native layout: the CheXpert columns in another order than the documented one, labels
//! as released (1, 0, -1, -1.0, blank), ages as a number, `85 or more` and a range, the views BRAX has; a label
//! outside the convention, a duplicate and a missing image are rejected with their lines.

use radit_sharding::schema::FINDINGS;
use radit_sharding::table::{TableConfig, read_table};
use radit_sources::brax::{AgeRange, BraxOptions, harmonise};
use radit_sources::output::{Finding, write_table};

/// The documented columns, the findings in a shuffled order (the header decides, not the position).
const HEADER: &str = "DicomPath,PngPath,PatientID,AccessionNumber,ViewPosition,PatientSex,PatientAge,Manufacturer,\
StudyDate,Rows,Columns,Edema,No Finding,Cardiomegaly,Pleural Effusion,Enlarged Cardiomediastinum,Lung Lesion,\
Lung Opacity,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Other,Fracture,Support Devices";

fn row(dicom: &str, patient: &str, view: &str, sex: &str, age: &str, labels: &str) -> String {
    let png = dicom
        .replace("Anonymized_DICOMs", "images")
        .replace(".dcm", ".png");
    format!("{dicom},{png},{patient},acc,{view},{sex},{age},GE,20190101,8,8,{labels}")
}

#[test]
fn the_native_release_harmonises_to_the_hand_written_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = |i: u32| format!("Anonymized_DICOMs/id_{i}/Study_1/Series_1/image-{i}.dcm");
    //             Edema NoF Card PlEff ECM LL LO Cons Pneu Atel Ptx PlOth Frac SD
    let lines = [
        HEADER.to_string(),
        row(&d(1), "1", "AP", "M", "45", "-1.0,0,1,0,,,,0,0,0,0,,,1"),
        row(&d(2), "2", "L", "F", "85 or more", ",,,1,,,,,,,,,,"),
        row(&d(3), "3", "RL", "O", "60-64", ",1,,,,,,,,,,,,"),
        row(&d(4), "4", "PA", "F", "50", "2,,,,,,,,,,,,,"),
        row(&d(1), "1", "AP", "M", "45", ",1,,,,,,,,,,,,"),
        row(&d(5), "5", "PA", "F", "50", ",1,,,,,,,,,,,,"),
    ];
    for i in 1..=4 {
        let p = dir.path().join(d(i));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"a DICOM").unwrap();
    }
    std::fs::write(
        dir.path().join("master_spreadsheet_update.csv"),
        lines.join("\n"),
    )
    .unwrap();
    let (rows, audit) = harmonise(&BraxOptions::new(dir.path())).unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.image_id.clone(),
                r.patient_id.as_str(),
                r.age,
                r.sex,
                r.view,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                format!("BRAX:{}", d(1)),
                "BRAX:1",
                Some(45.0),
                Some("Male"),
                Some("AP")
            ),
            (
                format!("BRAX:{}", d(2)),
                "BRAX:2",
                Some(85.0),
                Some("Female"),
                Some("Lateral")
            ),
            (format!("BRAX:{}", d(3)), "BRAX:3", Some(62.0), None, None),
        ]
    );
    assert_eq!(rows[0].path, d(1));
    let f =
        |r: usize, name: &str| rows[r].findings[FINDINGS.iter().position(|f| *f == name).unwrap()];
    assert_eq!(f(0, "edema"), Finding::Uncertain);
    assert_eq!(f(0, "cardiomegaly"), Finding::Positive);
    assert_eq!(f(0, "no_finding"), Finding::Negative);
    assert_eq!(f(0, "support_devices"), Finding::Positive);
    assert_eq!(f(0, "fracture"), Finding::Missing);
    assert_eq!(f(1, "pleural_effusion"), Finding::Positive);
    assert_eq!(f(2, "no_finding"), Finding::Positive);
    assert_eq!(f(2, "edema"), Finding::Missing);

    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (6, 3, 3)
    );
    let lines: Vec<(u64, &str)> = audit
        .rejections
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect();
    assert_eq!(lines[0].0, 5);
    assert!(lines[0].1.contains("`Edema` is `2`"), "{lines:?}");
    assert_eq!(lines[1].0, 6);
    assert!(lines[1].1.contains("also on line 2"), "{lines:?}");
    assert_eq!(lines[2].0, 7);
    assert_eq!(audit.values["PatientAge"]["85 or more"]["85"], 1);
    assert_eq!(audit.values["ViewPosition"]["RL"][""], 1);

    let out = dir.path().join("brax.csv");
    write_table(&out, &rows).unwrap();
    let table = read_table(&out, &TableConfig::default()).unwrap();
    assert_eq!(table.rows.len(), 3);
    assert!(table.rejected.is_empty(), "{:?}", table.rejected);
    assert_eq!(table.warnings.total(), 0, "{:?}", table.warnings);

    // The PNG copies and the lower bound of an age range, by option.
    let opts = BraxOptions {
        image: radit_sources::brax::BraxImage::Png,
        age_range: AgeRange::Lower,
        source: radit_sources::SourceOptions {
            check_files: false,
            ..radit_sources::SourceOptions::new(dir.path())
        },
    };
    let (rows, _) = harmonise(&opts).unwrap();
    assert_eq!(rows[0].path, "images/id_1/Study_1/Series_1/image-1.png");
    assert_eq!(
        rows[0].image_id,
        format!("BRAX:{}", d(1)),
        "the id is the DICOM's either way"
    );
    assert_eq!(rows[2].age, Some(60.0));
}

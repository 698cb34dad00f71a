//! PadChest from a fixture in its native layout: list-literal labels with leading spaces and mixed case, a normal
//! image with a device, `nan` labels, an empty birth year, `AP_horizontal`, `COSTAL`, an unmapped and an unknown
//! label; a duplicate, a missing image and a bad folder are rejected with their lines.

use std::path::Path;

use radit_sharding::image::encode_png16;
use radit_sharding::schema::FINDINGS;
use radit_sharding::table::{TableConfig, read_table};
use radit_sources::SourceOptions;
use radit_sources::output::{Finding, write_table};
use radit_sources::padchest::harmonise;

const TABLE: &str = r#"ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,Projection,Labels,Pediatric
img1.png,0,20150312,s1,p1,1932,M,POSTEROANTERIOR,PA,"['cardiomegaly', ' pleural effusion']",No
img2.png,0,20150312,s2,p2,1932.0,F,AP,AP_horizontal,"['NSG tube', 'normal']",No
img3.png,1,20160101,s3,p3,,O,,COSTAL,nan,No
img4.png,1,20160101,s4,p4,1950,F,,L,"['scoliosis', 'pneumonitis']",No
img1.png,0,20150312,s1,p1,1932,M,POSTEROANTERIOR,PA,"['normal']",No
img9.png,1,20160101,s9,p9,1950,F,,PA,"['normal']",No
img5.png,x,20160101,s5,p5,1950,F,,PA,"['normal']",No
"#;

fn release(root: &Path) {
    for (folder, image) in [
        ("0", "img1.png"),
        ("0", "img2.png"),
        ("1", "img3.png"),
        ("1", "img4.png"),
    ] {
        std::fs::create_dir_all(root.join(folder)).unwrap();
        let pixels: Vec<u16> = (0..64u16).map(|i| i * 1000).collect();
        std::fs::write(root.join(folder).join(image), encode_png16(8, 8, &pixels)).unwrap();
    }
    std::fs::write(
        root.join("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"),
        TABLE,
    )
    .unwrap();
}

/// Every finding 0 (the PadChest map covers all fourteen) except the positives listed.
fn findings(positive: &[&str]) -> [Finding; 14] {
    FINDINGS.map(|f| {
        if positive.contains(&f) {
            Finding::Positive
        } else {
            Finding::Negative
        }
    })
}

#[test]
fn the_native_release_harmonises_to_the_hand_written_values() {
    let dir = tempfile::tempdir().unwrap();
    release(dir.path());
    let (rows, audit) = harmonise(&SourceOptions::new(dir.path())).unwrap();
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
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "PadChest:img1.png",
                "PadChest:p1",
                "0/img1.png",
                Some(83.0),
                Some("Male"),
                Some("PA")
            ),
            (
                "PadChest:img2.png",
                "PadChest:p2",
                "0/img2.png",
                Some(83.0),
                Some("Female"),
                Some("AP")
            ),
            (
                "PadChest:img3.png",
                "PadChest:p3",
                "1/img3.png",
                None,
                None,
                None
            ),
            (
                "PadChest:img4.png",
                "PadChest:p4",
                "1/img4.png",
                Some(66.0),
                Some("Female"),
                Some("Lateral")
            ),
        ]
    );
    assert_eq!(
        rows[0].findings,
        findings(&["cardiomegaly", "pleural_effusion"])
    );
    assert_eq!(
        rows[1].findings,
        findings(&["support_devices", "no_finding"])
    );
    assert_eq!(
        rows[2].findings,
        [Finding::Missing; 14],
        "unreadable labels"
    );
    assert_eq!(rows[3].findings, findings(&[]));

    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (7, 4, 3)
    );
    let lines: Vec<(u64, &str)> = audit
        .rejections
        .iter()
        .map(|r| (r.line, r.id.as_str()))
        .collect();
    assert_eq!(
        lines,
        vec![(6, "img1.png"), (7, "img9.png"), (8, "img5.png")]
    );
    assert!(audit.rejections[2].reason.contains("ImageDir `x`"));
    assert_eq!(audit.values["Projection"]["AP_horizontal"]["AP"], 1);
    assert_eq!(audit.values["Projection"]["COSTAL"][""], 1);
    assert_eq!(audit.labels.unmapped["scoliosis"], 1);
    assert_eq!(audit.labels.unknown["pneumonitis"], 1);
    assert_eq!(audit.labels.touched["pleural effusion"], 1);
    assert_eq!(audit.labels.unparsed_rows, 1);

    let out = dir.path().join("padchest.csv");
    write_table(&out, &rows).unwrap();
    let table = read_table(&out, &TableConfig::default()).unwrap();
    assert_eq!(table.rows.len(), 4);
    assert!(table.rejected.is_empty(), "{:?}", table.rejected);
    assert_eq!(table.warnings.total(), 0, "{:?}", table.warnings);
}

//! NIH ChestX-ray14 from a fixture in its native layout: the v2020 table's bracketed header, an Age String, an
//! impossible age, other sexes and views, multi-labels with an unmapped and an unknown label, a duplicate, a missing
//! image and an empty id; PNGs in two `images_00N/images` folders. Rows are checked against hand-written values.

use std::path::Path;

use radit_sharding::image::encode_png16;
use radit_sharding::schema::FINDINGS;
use radit_sharding::table::{TableConfig, read_table};
use radit_sources::nih::{NihOptions, harmonise};
use radit_sources::output::{Finding, HarmonisedRow, write_table};

const HEADER: &str = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,\
OriginalImage[Width, Height],OriginalImagePixelSpacing[x, y]";

const ROWS: [&str; 7] = [
    "00000001_000.png,Cardiomegaly|Atelectasis,0,1,58,M,PA,1024,1024,0.143,0.143",
    "00000001_001.png,Cardiomegaly|Effusion,1,1,058Y,M,AP,1024,1024,0.143,0.143",
    "00000002_000.png,No Finding,0,2,414,F,PA,1024,1024,0.143,0.143",
    "00000003_000.png,Infiltration|Mass|Hernia|Pneumonitis,0,3,45,O,LL,1024,1024,0.143,0.143",
    "00000003_000.png,No Finding,1,3,45,F,PA,1024,1024,0.143,0.143",
    "00000004_000.png,No Finding,0,4,30,F,PA,1024,1024,0.143,0.143",
    ",No Finding,0,5,30,F,PA,1024,1024,0.143,0.143",
];

/// The release's layout under `root`, with `table_name` holding `text`.
fn release(root: &Path, table_name: &str, text: &str) {
    for (folder, image) in [
        ("images_001/images", "00000001_000.png"),
        ("images_001/images", "00000001_001.png"),
        ("images_002/images", "00000002_000.png"),
        ("images_002/images", "00000003_000.png"),
    ] {
        std::fs::create_dir_all(root.join(folder)).unwrap();
        let pixels: Vec<u16> = (0..64u16).map(|i| i * 1000).collect();
        std::fs::write(root.join(folder).join(image), encode_png16(8, 8, &pixels)).unwrap();
    }
    std::fs::write(root.join(table_name), text).unwrap();
}

fn table_text() -> String {
    format!("{HEADER}\n{}\n", ROWS.join("\n"))
}

/// Findings from the positives listed; the others the NIH map covers are 0, and the three it cannot say are missing.
fn findings(positive: &[&str]) -> [Finding; 14] {
    let uncovered = ["enlarged_cardiomediastinum", "fracture", "support_devices"];
    FINDINGS.map(|f| {
        if positive.contains(&f) {
            Finding::Positive
        } else if uncovered.contains(&f) {
            Finding::Missing
        } else {
            Finding::Negative
        }
    })
}

fn row(
    image: &str,
    patient: &str,
    folder: &str,
    age: Option<f64>,
    sex: Option<&'static str>,
    view: Option<&'static str>,
    positive: &[&str],
) -> HarmonisedRow {
    HarmonisedRow {
        image_id: format!("NIH-CXR14:{image}"),
        patient_id: format!("NIH-CXR14:{patient}"),
        dataset: "NIH-CXR14",
        path: format!("{folder}/{image}"),
        age,
        sex,
        race: None,
        view,
        findings: findings(positive),
        split: None,
    }
}

#[test]
fn the_native_release_harmonises_to_the_hand_written_rows_and_reads_back_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    release(dir.path(), "Data_Entry_2017_v2020.csv", &table_text());
    let (rows, audit) = harmonise(&NihOptions::new(dir.path())).unwrap();
    let expected = vec![
        row(
            "00000001_000.png",
            "1",
            "images_001/images",
            Some(58.0),
            Some("Male"),
            Some("PA"),
            &["cardiomegaly", "atelectasis"],
        ),
        row(
            "00000001_001.png",
            "1",
            "images_001/images",
            Some(58.0),
            Some("Male"),
            Some("AP"),
            &["cardiomegaly", "pleural_effusion"],
        ),
        row(
            "00000002_000.png",
            "2",
            "images_002/images",
            None,
            Some("Female"),
            Some("PA"),
            &["no_finding"],
        ),
        row(
            "00000003_000.png",
            "3",
            "images_002/images",
            Some(45.0),
            None,
            None,
            &["lung_opacity", "lung_lesion"],
        ),
    ];
    assert_eq!(rows, expected);

    assert_eq!(
        (audit.rows.read, audit.rows.written, audit.rows.rejected),
        (7, 4, 3)
    );
    let reasons: Vec<(&str, u64)> = audit
        .rejected_by_reason
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("duplicate Image Index", 1),
            ("empty Image Index", 1),
            ("image file not found", 1)
        ]
    );
    let duplicate = audit
        .rejections
        .iter()
        .find(|r| r.line == 6)
        .expect("the duplicate's line");
    assert!(duplicate.reason.contains("also on line 5"), "{duplicate:?}");
    assert!(duplicate.file.ends_with("Data_Entry_2017_v2020.csv"));
    assert_eq!(audit.values["Patient Age"]["414"][""], 1);
    assert_eq!(audit.values["Patient Age"]["058Y"]["58"], 1);
    assert_eq!(audit.values["Patient Gender"]["O"][""], 1);
    assert_eq!(audit.values["View Position"]["LL"][""], 1);
    assert_eq!(audit.labels.unknown["Pneumonitis"], 1);
    // Written with the value missing, and named with the file and row: the impossible age, the unknown label.
    let notes: Vec<(u64, &str, &str)> = audit
        .notes
        .iter()
        .map(|n| (n.line, n.id.as_str(), n.reason.as_str()))
        .collect();
    assert_eq!(
        notes,
        [
            (
                4,
                "00000002_000.png",
                "age out of range: Patient Age `414` is 414 years, not in 0..=100"
            ),
            (5, "00000003_000.png", "label not in the map: `Pneumonitis`"),
        ]
    );
    assert!(audit.notes[0].file.ends_with("Data_Entry_2017_v2020.csv"));
    assert_eq!(audit.noted_by_kind["age out of range"], 1);
    assert_eq!(audit.labels.unmapped["Hernia"], 1);
    assert_eq!(audit.labels.touched["Cardiomegaly"], 2);
    let summary = audit.summary();
    assert!(
        summary.contains("7 rows read, 4 written, 3 rejected"),
        "{summary}"
    );
    assert!(summary.contains("`414` -> (missing): 1"), "{summary}");

    // The written table is what `radit shard` reads: no rejection, no warning, every value as mapped.
    let out = dir.path().join("nih.csv");
    write_table(&out, &rows).unwrap();
    let table = read_table(&out, &TableConfig::default()).unwrap();
    assert_eq!(table.rows.len(), 4);
    assert!(table.rejected.is_empty(), "{:?}", table.rejected);
    assert_eq!(table.warnings.total(), 0, "{:?}", table.warnings);
    let (json, txt) = audit.write_beside(&out).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    assert_eq!(report["rows"]["rejected"], 3);
    assert_eq!(std::fs::read_to_string(txt).unwrap(), summary);
}

#[test]
fn the_2017_copy_with_its_extra_column_gzipped_and_the_opacity_knob() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    // The 2017 copy: a twelfth, empty column on every line.
    let text: String = std::iter::once(format!("{HEADER},"))
        .chain(ROWS.iter().map(|r| format!("{r},")))
        .map(|l| l + "\n")
        .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    release(dir.path(), "Data_Entry_2017.csv.gz", "");
    std::fs::remove_file(dir.path().join("Data_Entry_2017.csv.gz")).unwrap();
    std::fs::write(
        dir.path().join("Data_Entry_2017.csv.gz"),
        gz.finish().unwrap(),
    )
    .unwrap();
    let opts = NihOptions {
        opacity_includes_children: true,
        ..NihOptions::new(dir.path())
    };
    let (rows, audit) = harmonise(&opts).unwrap();
    assert_eq!(audit.rows.written, 4);
    let opacity = FINDINGS.iter().position(|f| *f == "lung_opacity").unwrap();
    // Atelectasis is a child of lung opacity with the knob on.
    assert_eq!(rows[0].findings[opacity], Finding::Positive);
    assert_eq!(rows[1].findings[opacity], Finding::Negative);
}

#[test]
fn a_table_without_a_needed_column_or_a_release_without_a_table_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = harmonise(&NihOptions::new(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Data_Entry_2017_v2020.csv"), "{e}");
    let broken = table_text().replace("Finding Labels", "Findings");
    release(dir.path(), "Data_Entry_2017_v2020.csv", &broken);
    let e = harmonise(&NihOptions::new(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Data_Entry_2017_v2020.csv") && e.contains("`Finding Labels`"),
        "{e}"
    );
    // A label map with a typo is refused before anything is read.
    release(dir.path(), "Data_Entry_2017_v2020.csv", &table_text());
    let map = dir.path().join("nih.toml");
    std::fs::write(
        &map,
        radit_sources::nih::LABEL_MAP.replace("[\"Nodule\", \"Mass\"]", "[\"Nodul\"]"),
    )
    .unwrap();
    let opts = NihOptions {
        source: radit_sources::SourceOptions {
            labelmap: Some(map),
            ..radit_sources::SourceOptions::new(dir.path())
        },
        ..NihOptions::new(dir.path())
    };
    let e = harmonise(&opts).unwrap_err().to_string();
    assert!(e.contains("nih.toml") && e.contains("Nodul"), "{e}");
}

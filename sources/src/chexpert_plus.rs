//! CheXpert-Plus as released (shared/design/sources.md A.2): `df_chexpert_plus_240401.csv`, one row per image
//! (`path_to_image, path_to_dcm, frontal_lateral, ap_pa, deid_patient_id, age, sex, race`, …, and the report in
//! multiline quoted cells, so it is read as real CSV), the DICOMs under `DICOM/` (`path_to_dcm`) and PNG copies under
//! `PNG/` (`path_to_image` with `.jpg` -> `.png`).
//!
//! Findings come from CheXbert's `chexbert_labels/report_fixed.json` (or `--labels`): JSON lines, each with
//! `path_to_image` and the 14 CheXpert names, values `1`/`0`/`-1`/`null`. A line that is not a JSON object with a
//! `path_to_image` string is an error naming the file and line (the file is broken, not one image); an image with no
//! line has every finding missing (counted). The image id is `path_to_image` whichever copy is read.
//! Age `0` is missing (as torchxrayvision reads it). Race is a case-sensitive match of `White`, `Black`, `Asian` in
//! `race` (so `Caucasian` is not Asian); Hispanic patients are kept. View: `frontal_lateral` `Lateral`, else `ap_pa`
//! `AP`/`PA`; `LL`, `RL` and blank are missing.

use std::path::{Path, PathBuf};

use crate::audit::{Audit, RowChecks};
use crate::chexpert::{LabelTable, chexpert_names};
use crate::output::HarmonisedRow;
use crate::parse::{CsvTable, locate_table, read_table_bytes};
use crate::{SourceError, SourceOptions};

pub const DATASET: &str = "CheXpert-Plus";
pub const TABLE: &str = "df_chexpert_plus_240401.csv";
/// The labels read when `--labels` is not given, relative to the root.
pub const LABELS: &str = "chexbert_labels/report_fixed.json";

choice! {
    /// Which copy of each image the table points at.
    pub enum PlusImage {
        /// The DICOMs (`path_to_dcm` under `dicom_dir`; the paper's choice).
        Dicom = "dicom",
        /// The PNGs (`path_to_image` as `.png` under `png_dir`).
        Png = "png",
    }
}

/// What `radit harmonise chexpert-plus` reads and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ChexpertPlusOptions {
    pub source: SourceOptions,
    /// CheXbert's JSON lines; else `<root>/chexbert_labels/report_fixed.json`.
    pub labels: Option<PathBuf>,
    pub image: PlusImage,
    /// The DICOMs' folder, relative to the root.
    pub dicom_dir: PathBuf,
    /// The PNGs' folder, relative to the root.
    pub png_dir: PathBuf,
}

impl ChexpertPlusOptions {
    pub fn new(root: &Path) -> Self {
        Self {
            source: SourceOptions::new(root),
            labels: None,
            image: PlusImage::default(),
            dicom_dir: "DICOM".into(),
            png_dir: "PNG".into(),
        }
    }
}

/// `White`, `Black` or `Asian` in `race`, case-sensitive.
fn plus_race(raw: &str) -> Option<&'static str> {
    ["White", "Black", "Asian"]
        .into_iter()
        .find(|r| raw.contains(r))
}

/// The labels' JSON lines, keyed by `path_to_image`; a line that is not an object with that key is an error.
fn read_labels(
    path: &Path,
    names: &[String],
    audit: &mut Audit,
) -> Result<LabelTable, SourceError> {
    let bytes = read_table_bytes(path)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut table = LabelTable::new("image");
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let invalid = |reason: String| SourceError::InvalidInput {
            path: path.to_path_buf(),
            line: i as u64 + 1,
            reason,
        };
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).map_err(|e| invalid(format!("not a JSON object: {e}")))?;
        let Some(key) = object.get("path_to_image").and_then(|v| v.as_str()) else {
            return Err(invalid("no `path_to_image` string".into()));
        };
        let cells = names
            .iter()
            .map(|n| match object.get(n) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            })
            .collect();
        table.insert(key.trim().to_string(), cells, audit);
    }
    Ok(table)
}

/// Harmonises the release under `opts.source.root`: the rows to write and the audit report.
pub fn harmonise(plus: &ChexpertPlusOptions) -> Result<(Vec<HarmonisedRow>, Audit), SourceError> {
    let opts = &plus.source;
    let table = locate_table(&opts.root, opts.table.as_deref(), &[TABLE])?;
    let labels_path = match &plus.labels {
        Some(p) => p.clone(),
        None => locate_table(&opts.root, None, &[LABELS])?,
    };
    let mut audit = Audit::new(DATASET);
    audit.inputs.push(table.display().to_string());
    audit.inputs.push(labels_path.display().to_string());
    audit.label_map = format!(
        "(none: the CheXpert-convention labels of {})",
        labels_path.display()
    );
    let names = chexpert_names();
    let mut labels = read_labels(&labels_path, &names, &mut audit)?;
    let mut csv = CsvTable::open(
        &table,
        &[
            "path_to_image",
            "path_to_dcm",
            "deid_patient_id",
            "frontal_lateral",
            "ap_pa",
            "age",
            "sex",
            "race",
        ],
    )?;
    let [
        id_col,
        dcm_col,
        patient_col,
        fl_col,
        ap_col,
        age_col,
        sex_col,
        race_col,
    ] = csv.columns[..]
    else {
        unreachable!("one position per name asked for");
    };
    let mut checks = RowChecks::new(
        &table,
        ("path_to_image", id_col),
        ("deid_patient_id", patient_col),
    );
    let mut rows = Vec::new();
    for record in csv.reader.records() {
        let Some(row) = checks.accept(&mut audit, record) else {
            continue;
        };
        let (line, field) = (row.line, |i: usize| row.field(i));
        let (id, patient) = (field(id_col), field(patient_col));
        let path = match plus.image {
            PlusImage::Dicom => plus.dicom_dir.join(field(dcm_col)),
            PlusImage::Png => {
                let png = id
                    .strip_suffix(".jpg")
                    .map_or_else(|| id.to_string(), |s| format!("{s}.png"));
                plus.png_dir.join(png)
            }
        };
        let path = path.to_string_lossy().replace('\\', "/");
        if let Some(reason) = opts.missing_image(&path) {
            audit.reject(&table, line, id, "image file not found", reason);
            continue;
        }
        let raw_age = field(age_col);
        // 0 is CheXpert's "unknown".
        let parsed = match raw_age.parse::<f64>() {
            _ if raw_age.is_empty() => Ok(None),
            Ok(0.0) => Ok(None),
            Ok(a) => Ok(Some(a)),
            Err(_) => Err("not a number".to_string()),
        };
        let age = audit.age("age", raw_age, parsed, opts);
        let raw_sex = field(sex_col);
        let sex = audit.mapped(
            "sex",
            raw_sex,
            match raw_sex {
                "Male" => Some("Male"),
                "Female" => Some("Female"),
                _ => None,
            },
        );
        let raw_race = field(race_col);
        let race = audit.mapped("race", raw_race, plus_race(raw_race));
        let (fl, ap) = (field(fl_col), field(ap_col));
        let view = match (fl, ap) {
            ("Lateral", _) => Some("Lateral"),
            (_, "AP") => Some("AP"),
            (_, "PA") => Some("PA"),
            _ => None,
        };
        let view = audit.mapped("frontal_lateral, ap_pa", &format!("{fl}, {ap}"), view);
        let findings = labels.findings(id, &names, &mut audit);
        let mut row = HarmonisedRow::native(DATASET, id, patient, path);
        (row.age, row.sex, row.race, row.view, row.findings) = (age, sex, race, view, findings);
        audit.written(&mut rows, row);
    }
    labels.count_unused(&mut audit);
    Ok((rows, audit))
}

/// The fixture's images: path_to_image, frontal_lateral, ap_pa, deid_patient_id, age, sex, race.
#[rustfmt::skip]
const FIXTURE_IMAGES: [(&str, &str, &str, &str, &str, &str, &str); 7] = [
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA", "patient00001", "68", "Female", "White"),
    ("train/patient00001/study1/view2_lateral.jpg", "Lateral", "", "patient00001", "68", "Female", "White"),
    ("train/patient00002/study1/view1_frontal.jpg", "Frontal", "AP", "patient00002", "0", "Male", "Black or African American"),
    ("train/patient00003/study1/view1_frontal.jpg", "Frontal", "LL", "patient00003", "45", "Unknown", "Asian"),
    ("train/patient00004/study1/view1_frontal.jpg", "Frontal", "AP", "patient00004", "77", "Male", "Other"),
    ("train/patient00004/study2/view1_frontal.jpg", "Frontal", "PA", "patient00004", "78", "Male", "Other"),
    ("valid/patient00005/study1/view1_frontal.jpg", "Frontal", "PA", "patient00005", "34", "Female", "White, non-Hispanic"),
];

/// Writes a small CheXpert-Plus release under `root` in the native layout (the table, the DICOMs under `DICOM/`,
/// the PNGs under `PNG/`, the CheXbert JSON lines): age `0`, `Unknown` sex, `ap_pa` `LL`, a lateral with a blank
/// `ap_pa`, race strings that map and one (`Other`) that does not, a JSON line with `null`s and one lacking a key, an
/// image with no JSON line, and report text with commas, newlines and quotes.
pub fn write_fixture(root: &Path) -> std::io::Result<()> {
    use crate::fixture_files::{dicom, png, write};
    let mut table = csv::Writer::from_writer(Vec::new());
    #[rustfmt::skip]
    table.write_record([
        "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id", "patient_report_date_order",
        "report", "section_findings", "section_impression", "age", "sex", "race", "ethnicity", "insurance_type",
        "split",
    ])?;
    for (i, (image, fl, ap, patient, age, sex, race)) in FIXTURE_IMAGES.into_iter().enumerate() {
        let dcm = image.replace(".jpg", ".dcm");
        let report = if i == 6 {
            "FINDINGS:\nHeart size normal, lungs clear.\nIMPRESSION:\n\"No acute\" process, per Dr. O'Neil."
        } else {
            "IMPRESSION: No acute cardiopulmonary process."
        };
        let split = image.split('/').next().unwrap_or_default();
        let order = (i + 1).to_string();
        #[rustfmt::skip]
        table.write_record([
            image, dcm.as_str(), fl, ap, patient, order.as_str(), report, "Lungs clear.", "No acute process.", age, sex, race,
            "Non-Hispanic/Non-Latino", "Medicare", split,
        ])?;
        let seed = 50 + i as u16;
        png(&root.join("PNG").join(image.replace(".jpg", ".png")), seed)?;
        dicom(&root.join("DICOM").join(dcm), seed, |_| {})?;
    }
    let table = table.into_inner().map_err(|e| e.into_error())?;
    write(&root.join(TABLE), &table)?;
    let names = chexpert_names();
    let line = |image: &str, values: [Option<i8>; 14]| {
        let mut object = serde_json::Map::new();
        object.insert("path_to_image".into(), image.into());
        for (name, value) in names.iter().zip(values) {
            object.insert(
                name.clone(),
                value.map_or(serde_json::Value::Null, Into::into),
            );
        }
        serde_json::Value::Object(object).to_string()
    };
    let (p, n, u, m) = (Some(1), Some(0), Some(-1), None);
    #[rustfmt::skip]
    let mut lines = [
        //                      Atel Card Cons Edema ECM Frac LL LO NoF PlEff PlOth Pneu Ptx SD
        line(FIXTURE_IMAGES[0].0, [m, p, m, u, m, m, m, m, m, n, m, m, m, p]),
        line(FIXTURE_IMAGES[1].0, [m; 14]),
        line(FIXTURE_IMAGES[2].0, [n, n, n, n, n, n, n, n, p, n, n, n, n, n]),
        line(FIXTURE_IMAGES[3].0, [p, m, m, m, m, m, m, p, m, m, m, u, m, m]),
        line(FIXTURE_IMAGES[5].0, [m, m, m, m, m, p, m, m, m, m, m, m, m, m]),
        line(FIXTURE_IMAGES[6].0, [m, m, m, m, m, m, m, m, p, m, m, m, m, m]),
    ];
    // A CheXbert line may lack a key: the same as `null`.
    lines[5] = lines[5].replace(",\"Support Devices\":null", "");
    write(&root.join(LABELS), (lines.join("\n") + "\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn race_is_matched_case_sensitively() {
        assert_eq!(plus_race("White, non-Hispanic"), Some("White"));
        assert_eq!(plus_race("Black or African American"), Some("Black"));
        assert_eq!(plus_race("Asian"), Some("Asian"));
        assert_eq!(plus_race("Caucasian"), None);
        assert_eq!(plus_race("Other"), None);
        assert_eq!(plus_race(""), None);
    }
}

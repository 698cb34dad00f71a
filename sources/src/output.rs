//! The harmonised table's rows, with canonical values only, and its CSV writer (the columns of dataset.md in schema
//! order, so `radit shard` reads every harmonised table with no warning).

use std::path::Path;

use radit_sharding::schema::FINDINGS;
use radit_sharding::table::{REQUIRED_COLUMNS, SPLIT_COLUMN};

use crate::SourceError;

/// One finding's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Finding {
    #[default]
    Missing,
    Negative,
    Positive,
    Uncertain,
}

impl Finding {
    pub fn as_str(self) -> &'static str {
        match self {
            Finding::Missing => "",
            Finding::Negative => "0",
            Finding::Positive => "1",
            Finding::Uncertain => "-1",
        }
    }
}

/// One harmonised row. Sex, race and view are the schema's class names or `None` (missing).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HarmonisedRow {
    /// `<dataset>:<native image id>`.
    pub image_id: String,
    /// `<dataset>:<native patient id>`.
    pub patient_id: String,
    pub dataset: &'static str,
    /// The native image, relative to the source's root.
    pub path: String,
    pub age: Option<f64>,
    pub sex: Option<&'static str>,
    pub race: Option<&'static str>,
    pub view: Option<&'static str>,
    /// In schema order ([`FINDINGS`]).
    pub findings: [Finding; 14],
    /// `train`, `val` or `test` when forced; else the shard's patient hash decides.
    pub split: Option<&'static str>,
}

impl HarmonisedRow {
    /// A row of `dataset` for the native ids and path, everything else missing.
    pub fn native(dataset: &'static str, image: &str, patient: &str, path: String) -> Self {
        Self {
            image_id: format!("{dataset}:{image}"),
            patient_id: format!("{dataset}:{patient}"),
            dataset,
            path,
            ..Self::default()
        }
    }
}

/// `M` and `F` (the DICOM spelling every source uses), else missing.
pub fn sex_mf(raw: &str) -> Option<&'static str> {
    match raw {
        "M" => Some("Male"),
        "F" => Some("Female"),
        _ => None,
    }
}

/// A DICOM ViewPosition (0018,5101) as MIMIC-CXR and VinDr-CXR write it: `PA`, `AP`, `LATERAL` or `LL` (left
/// lateral, the standard lateral); decubitus, oblique, axial and cross-table views are none of the three.
pub fn view_position(raw: &str) -> Option<&'static str> {
    match raw.trim().to_ascii_uppercase().as_str() {
        "PA" => Some("PA"),
        "AP" => Some("AP"),
        "LATERAL" | "LL" => Some("Lateral"),
        _ => None,
    }
}

/// Age as the table writes it: up to two decimals, trailing zeros trimmed.
fn age_text(age: Option<f64>) -> String {
    age.map_or_else(String::new, |a| {
        let s = format!("{a:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    })
}

/// Writes `rows` as a harmonised table.
pub fn write_table(path: &Path, rows: &[HarmonisedRow]) -> Result<(), SourceError> {
    let err = |source: std::io::Error| SourceError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut w = csv::Writer::from_path(path).map_err(|e| err(e.into()))?;
    let header = REQUIRED_COLUMNS
        .iter()
        .chain(FINDINGS.iter())
        .chain([SPLIT_COLUMN].iter());
    w.write_record(header).map_err(|e| err(e.into()))?;
    // Field by field: no per-row vector of owned strings (a release has up to a few hundred thousand rows).
    for r in rows {
        let age = age_text(r.age);
        let fields = [
            r.image_id.as_str(),
            &r.patient_id,
            r.dataset,
            &r.path,
            &age,
            r.sex.unwrap_or_default(),
            r.race.unwrap_or_default(),
            r.view.unwrap_or_default(),
        ];
        let findings = r.findings.iter().map(|f| f.as_str());
        for field in fields.into_iter().chain(findings) {
            w.write_field(field).map_err(|e| err(e.into()))?;
        }
        w.write_record([r.split.unwrap_or_default()])
            .map_err(|e| err(e.into()))?;
    }
    w.flush().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_written_short() {
        assert_eq!(age_text(Some(58.0)), "58");
        assert_eq!(age_text(Some(0.5)), "0.5");
        assert_eq!(age_text(Some(1.0 / 3.0)), "0.33");
        assert_eq!(age_text(None), "");
    }
}

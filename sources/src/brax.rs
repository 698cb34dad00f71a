//! BRAX as released (shared/design/sources.md A.7): `master_spreadsheet_update.csv` (or the older
//! `master_spreadsheet.csv`) beside `Anonymized_DICOMs/…/image-<UID>.dcm` and the same images as 16-bit PNGs under
//! `images/`. Its 14 CheXpert columns are taken as they are (1, 0, -1 uncertain, blank), located by name: public
//! loaders disagree on their order. `PatientAge`'s format is not documented, so it is read tolerantly (a number, an
//! Age String, `85 or more`, `60-64`) and every value that is not a plain age is in the report.

use std::path::Path;

use crate::audit::{Audit, RowChecks};
use crate::chexpert::{chexpert_names, finding};
use crate::output::{Finding, HarmonisedRow, sex_mf};
use crate::parse::{CsvTable, age_years, locate_table};
use crate::{SourceError, SourceOptions};

pub const DATASET: &str = "BRAX";
pub const TABLES: [&str; 2] = ["master_spreadsheet_update.csv", "master_spreadsheet.csv"];

choice! {
    /// Which of the release's copies of each image the table points at.
    pub enum BraxImage {
        /// `DicomPath` (the original pixels; the paper's choice for DICOM sources).
        Dicom = "dicom",
        /// `PngPath` (16-bit PNGs).
        Png = "png",
    }
}

choice! {
    /// How an age range such as `60-64` becomes one age.
    pub enum AgeRange {
        Midpoint = "midpoint",
        Lower = "lower",
    }
}

/// What `radit harmonise brax` reads and how.
#[derive(Debug, Clone, PartialEq)]
pub struct BraxOptions {
    pub source: SourceOptions,
    pub image: BraxImage,
    pub age_range: AgeRange,
}

impl BraxOptions {
    pub fn new(root: &Path) -> Self {
        Self {
            source: SourceOptions::new(root),
            image: BraxImage::default(),
            age_range: AgeRange::default(),
        }
    }
}

/// An age from BRAX's `PatientAge`: what [`age_years`] reads, or `85 or more` (its lower bound), or a range `NN-MM`.
pub fn brax_age(text: &str, range: AgeRange) -> Option<f64> {
    if let Ok(age) = age_years(text) {
        return age;
    }
    let t = text.trim().to_ascii_lowercase();
    if let Some(lower) = t.strip_suffix("or more").or_else(|| t.strip_suffix('+')) {
        return age_years(lower.trim()).ok().flatten();
    }
    let (lo, hi) = t.split_once('-')?;
    let (lo, hi) = (age_years(lo).ok()??, age_years(hi).ok()??);
    (lo <= hi).then_some(match range {
        AgeRange::Midpoint => (lo + hi) / 2.0,
        AgeRange::Lower => lo,
    })
}

/// Harmonises the release under `opts.source.root`: the rows to write and the audit report.
pub fn harmonise(brax: &BraxOptions) -> Result<(Vec<HarmonisedRow>, Audit), SourceError> {
    let opts = &brax.source;
    let table = locate_table(&opts.root, opts.table.as_deref(), &TABLES)?;
    let mut audit = Audit::new(DATASET);
    audit.inputs.push(table.display().to_string());
    audit.label_map = "(none: the CheXpert labels as released)".into();
    // The image id is always the DICOM's path (the same image whichever copy is read).
    let image_column = match brax.image {
        BraxImage::Dicom => "DicomPath",
        BraxImage::Png => "PngPath",
    };
    let finding_names = chexpert_names();
    let mut names = vec![
        "DicomPath",
        image_column,
        "PatientID",
        "ViewPosition",
        "PatientSex",
        "PatientAge",
    ];
    names.extend(finding_names.iter().map(String::as_str));
    let mut csv = CsvTable::open(&table, &names)?;
    let [id_col, path_col, patient_col, view_col, sex_col, age_col] = csv.columns[..6] else {
        unreachable!("one position per name asked for");
    };
    let finding_cols = csv.columns[6..].to_vec();
    let mut checks = RowChecks::new(&table, ("DicomPath", id_col), ("PatientID", patient_col));
    let mut rows = Vec::new();
    for record in csv.reader.records() {
        let Some(row) = checks.accept(&mut audit, record) else {
            continue;
        };
        let (line, field) = (row.line, |i: usize| row.field(i));
        let (id, path, patient) = (field(id_col), field(path_col), field(patient_col));
        if let Some(reason) = opts.missing_image(path) {
            audit.reject(&table, line, id, "image file not found", reason);
            continue;
        }
        let mut findings = [Finding::Missing; 14];
        let mut bad = None;
        for ((slot, &col), name) in findings.iter_mut().zip(&finding_cols).zip(&finding_names) {
            match finding(field(col)) {
                Some(f) => *slot = f,
                None => {
                    bad = Some(format!(
                        "`{name}` is `{}`, not 1, 0, -1 or blank",
                        field(col)
                    ))
                }
            }
            audit.value(name, field(col), slot.as_str());
        }
        if let Some(reason) = bad {
            audit.reject(&table, line, id, "label not 1, 0, -1 or blank", reason);
            continue;
        }
        let raw_age = field(age_col);
        let parsed = match brax_age(raw_age, brax.age_range) {
            _ if raw_age.is_empty() => Ok(None),
            Some(a) => Ok(Some(a)),
            None => Err("not a number, an Age String, `NN or more` or a range".to_string()),
        };
        let age = audit.age("PatientAge", raw_age, parsed, opts);
        let raw_sex = field(sex_col);
        let sex = audit.mapped("PatientSex", raw_sex, sex_mf(raw_sex));
        let raw_view = field(view_col);
        let view = audit.mapped(
            "ViewPosition",
            raw_view,
            match raw_view {
                "PA" => Some("PA"),
                "AP" => Some("AP"),
                "L" => Some("Lateral"),
                // `RL` is ambiguous (right lateral, or a decubitus); AP LLD, LT-DECUB and RLO are not the three views.
                _ => None,
            },
        );
        let mut row = HarmonisedRow::native(DATASET, id, patient, path.to_string());
        (row.age, row.sex, row.view, row.findings) = (age, sex, view, findings);
        audit.written(&mut rows, row);
    }
    Ok((rows, audit))
}

/// A synthetic release under `root`: the CheXpert columns in another order than the documented one, labels as
/// released (1, 0, -1, -1.0, blank), ages as a number, `85 or more` and a range, the views BRAX has (`RL` among them),
/// and the DICOMs (one MONOCHROME1 with a window) and PNGs at DicomPath and PngPath.
pub fn write_fixture(root: &Path) -> std::io::Result<()> {
    use crate::fixture_files::{dicom, png, write};
    let header = "DicomPath,PngPath,PatientID,AccessionNumber,ViewPosition,PatientSex,PatientAge,Manufacturer,\
StudyDate,Rows,Columns,Edema,No Finding,Cardiomegaly,Pleural Effusion,Enlarged Cardiomediastinum,Lung Lesion,\
Lung Opacity,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Other,Fracture,Support Devices";
    //  Edema NoF Card PlEff ECM LL LO Cons Pneu Atel Ptx PlOth Frac SD
    let rows = [
        ("1", "AP", "M", "45", "-1.0,0,1,0,,,,0,0,0,0,,,1"),
        ("2", "L", "F", "85 or more", ",,,1,,,,,,,,,,"),
        ("3", "RL", "O", "60-64", ",1,,,,,,,,,,,,"),
        ("4", "PA", "F", "50", ",,,,,,1,,,,,,,-1"),
    ];
    let mut lines = vec![header.to_string()];
    for (i, (patient, view, sex, age, labels)) in rows.iter().enumerate() {
        let dicom_path =
            format!("Anonymized_DICOMs/id_{patient}/Study_1.{i}/Series_2.{i}/image-3.{i}.dcm");
        let png_path = format!("images/id_{patient}/Study_1.{i}/Series_2.{i}/image-3.{i}.png");
        lines.push(format!(
            "{dicom_path},{png_path},{patient},acc{i},{view},{sex},{age},GE,20190101,20,24,{labels}"
        ));
        dicom(&root.join(&dicom_path), 20 + i as u16, |f| {
            if i == 1 {
                f.photometric = "MONOCHROME1".into();
                f.windows = vec![(1800.0, 3000.0)];
            }
        })?;
        png(&root.join(&png_path), 20 + i as u16)?;
    }
    write(&root.join(TABLES[0]), (lines.join("\n") + "\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_as_brax_may_write_them() {
        assert_eq!(brax_age("45", AgeRange::Midpoint), Some(45.0));
        assert_eq!(brax_age("045Y", AgeRange::Midpoint), Some(45.0));
        assert_eq!(brax_age("85 or more", AgeRange::Midpoint), Some(85.0));
        assert_eq!(brax_age("90+", AgeRange::Midpoint), Some(90.0));
        assert_eq!(brax_age("60-64", AgeRange::Midpoint), Some(62.0));
        assert_eq!(brax_age("60-64", AgeRange::Lower), Some(60.0));
        assert_eq!(brax_age("64-60", AgeRange::Midpoint), None);
        assert_eq!(brax_age("unknown", AgeRange::Midpoint), None);
        assert_eq!(brax_age("", AgeRange::Midpoint), None);
    }
}

//! PadChest as released (shared/design/sources.md A.4): `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv` (or
//! `.csv.gz`) and 16-bit PNGs in integer folders, `<ImageDir>/<ImageID>`.
//!
//! Age is `year(StudyDate_DICOM) - PatientBirth` (a year, `1932` or `1932.0`); `Projection` gives the view (`PA`;
//! `AP` and `AP_horizontal` are AP; `L` is lateral; `COSTAL`, `EXCLUDE`, `UNK` missing); `Labels` is a Python list
//! literal (`"['cardiomegaly', ' pleural effusion']"`, leading spaces and mixed case included), mapped through the
//! PadChest label map (`labelmaps/padchest.toml`, its 193-label vocabulary). A row whose labels cannot be read keeps
//! its other values and has every finding missing.

use crate::audit::{Audit, RowChecks};
use crate::labelmap::LabelMap;
use crate::output::{HarmonisedRow, sex_mf};
use crate::parse::{CsvTable, locate_table};
use crate::{SourceError, SourceOptions};

pub const DATASET: &str = "PadChest";
/// The built-in label map.
pub const LABEL_MAP: &str = include_str!("../labelmaps/padchest.toml");
pub const TABLES: [&str; 2] = [
    "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
    "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
];

/// The items of a Python list literal of strings: `['a', ' b']` -> `["a", " b"]`; `None` when it is not one
/// (`nan`, empty, unbalanced quotes).
pub fn list_literal(text: &str) -> Option<Vec<String>> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    let mut items = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        let Some(quote) = chars.next() else {
            return Some(items);
        };
        if quote != '\'' && quote != '"' {
            return None;
        }
        let mut item = String::new();
        loop {
            match chars.next()? {
                c if c == quote => break,
                '\\' => item.push(chars.next()?),
                c => item.push(c),
            }
        }
        items.push(item);
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if(|c| *c == ',').is_none() && chars.peek().is_some() {
            return None;
        }
    }
}

/// `year(study) - birth`: `study` is `YYYYMMDD`, `birth` a year (`1932`, `1932.0`).
fn age_at(study: &str, birth: &str) -> Option<f64> {
    let year: f64 = study.trim().get(..4)?.parse().ok()?;
    let birth: f64 = birth.trim().parse().ok()?;
    (birth.is_finite() && birth > 1800.0).then_some(year - birth.trunc())
}

/// Harmonises the release under `opts.root`: the rows to write and the audit report.
pub fn harmonise(opts: &SourceOptions) -> Result<(Vec<HarmonisedRow>, Audit), SourceError> {
    let table = locate_table(&opts.root, opts.table.as_deref(), &TABLES)?;
    let map = LabelMap::load(opts.labelmap.as_deref(), LABEL_MAP)?;
    let mut audit = Audit::new(DATASET);
    audit.inputs.push(table.display().to_string());
    audit.label_map = map.origin.clone();
    let mut csv = CsvTable::open(
        &table,
        &[
            "ImageID",
            "ImageDir",
            "StudyDate_DICOM",
            "PatientID",
            "PatientBirth",
            "PatientSex_DICOM",
            "Projection",
            "Labels",
        ],
    )?;
    let [
        image_col,
        dir_col,
        date_col,
        patient_col,
        birth_col,
        sex_col,
        view_col,
        labels_col,
    ] = csv.columns[..]
    else {
        unreachable!("one position per name asked for");
    };
    let mut checks = RowChecks::new(&table, ("ImageID", image_col), ("PatientID", patient_col));
    let mut rows = Vec::new();
    for record in csv.reader.records() {
        let Some(row) = checks.accept(&mut audit, record) else {
            continue;
        };
        let (line, field) = (row.line, |i: usize| row.field(i));
        let (image, patient) = (field(image_col), field(patient_col));
        let folder = field(dir_col);
        let Some(folder) = folder
            .parse::<f64>()
            .ok()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0)
        else {
            let reason = format!("ImageDir `{folder}` is not a folder number");
            audit.reject(&table, line, image, "bad ImageDir", reason);
            continue;
        };
        let path = format!("{}/{image}", folder as u64);
        if let Some(reason) = opts.missing_image(&path) {
            audit.reject(&table, line, image, "image file not found", reason);
            continue;
        }
        let (study, birth) = (field(date_col), field(birth_col));
        let parsed = match age_at(study, birth) {
            _ if birth.is_empty() || birth == "None" => Ok(None),
            Some(a) => Ok(Some(a)),
            None => Err("not a YYYYMMDD date and a year".to_string()),
        };
        let raw = format!("{study} - {birth}");
        let age = audit.age(
            "age (StudyDate_DICOM year - PatientBirth)",
            &raw,
            parsed,
            opts,
        );
        let raw_sex = field(sex_col);
        let sex = audit.mapped("PatientSex_DICOM", raw_sex, sex_mf(raw_sex));
        let raw_view = field(view_col);
        let view = audit.mapped(
            "Projection",
            raw_view,
            match raw_view {
                "PA" => Some("PA"),
                "AP" | "AP_horizontal" => Some("AP"),
                "L" => Some("Lateral"),
                _ => None,
            },
        );
        let labels = list_literal(field(labels_col)).unwrap_or_default();
        let labels: Vec<String> = labels
            .into_iter()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        let findings = audit.findings(&map, &labels);
        let mut row = HarmonisedRow::native(DATASET, image, patient, path);
        (row.age, row.sex, row.view, row.findings) = (age, sex, view, findings);
        audit.written(&mut rows, row);
    }
    Ok((rows, audit))
}

/// A synthetic release under `root`: the gzipped table with Python list-literal labels (leading spaces, `NSG tube`,
/// `nan`, an unknown label), `AP_horizontal` and `COSTAL` projections, an empty and a `1950.0` birth year, and
/// 16-bit PNGs in numbered folders.
pub fn write_fixture(root: &std::path::Path) -> std::io::Result<()> {
    use crate::fixture_files::{gzip, png};
    let rows = [
        (
            "p1_a.png",
            "0",
            "20150312",
            "p1",
            "1932",
            "M",
            "PA",
            "\"['normal']\"",
        ),
        (
            "p1_b.png",
            "0",
            "20150312",
            "p1",
            "1932.0",
            "M",
            "L",
            "\"['cardiomegaly', ' pleural effusion']\"",
        ),
        (
            "p2_a.png",
            "1",
            "20120101",
            "p2",
            "",
            "F",
            "AP_horizontal",
            "\"['NSG tube', ' pneumonia']\"",
        ),
        (
            "p3_a.png", "1", "20090605", "p3", "1950.0", "F", "COSTAL", "nan",
        ),
        (
            "p4_a.png",
            "54",
            "20170101",
            "p4",
            "1960",
            "O",
            "AP",
            "\"['heart insufficiency', 'lung tumour']\"",
        ),
    ];
    let mut lines = vec![
        "ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,\
         Projection,MethodProjection,Labels"
            .to_string(),
    ];
    for (i, (image, dir, date, patient, birth, sex, view, labels)) in rows.iter().enumerate() {
        lines.push(format!(
            "{image},{dir},{date},s{i},{patient},{birth},{sex},POSTEROANTERIOR,{view},Manual review,{labels}"
        ));
        png(&root.join(dir).join(image), 10 + i as u16)?;
    }
    crate::fixture_files::write(&root.join(TABLES[1]), &gzip(&(lines.join("\n") + "\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_list_literals() {
        assert_eq!(
            list_literal("['cardiomegaly', ' pleural effusion']"),
            Some(vec!["cardiomegaly".into(), " pleural effusion".into()])
        );
        assert_eq!(
            list_literal("[\"NSG tube\"]"),
            Some(vec!["NSG tube".into()])
        );
        assert_eq!(list_literal("[]"), Some(vec![]));
        assert_eq!(
            list_literal("['a', 'b',]"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(list_literal("nan"), None);
        assert_eq!(list_literal(""), None);
        assert_eq!(list_literal("['unbalanced]"), None);
        assert_eq!(list_literal("[a, b]"), None);
    }

    #[test]
    fn ages_from_the_study_year_and_the_birth_year() {
        assert_eq!(age_at("20150312", "1932"), Some(83.0));
        assert_eq!(age_at("20150312", "1932.0"), Some(83.0));
        assert_eq!(age_at("20150312", ""), None);
        assert_eq!(age_at("20150312", "None"), None);
        assert_eq!(age_at("2015", "0"), None);
    }
}

//! NIH ChestX-ray14 as released (shared/design/sources.md A.6): `Data_Entry_2017_v2020.csv` (or `.csv.gz`, or the
//! older `Data_Entry_2017.csv`) and the PNGs in `images_001/images/ …` (Kaggle) or `images/` (the NIH box).
//!
//! The header's bracketed names contain commas (`OriginalImage[Width, Height]`), so a CSV reader sees eleven names
//! (twelve with the 2017 copy's empty column): columns are found by name, never by position, and only the six used
//! are required. Ages may be integers or Age Strings (`058Y`, an early copy); impossible ages (414 in the 2017 copy)
//! become missing and are counted. Findings go through the NIH label map (`labelmaps/nih.toml`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::audit::{Audit, RowChecks};
use crate::labelmap::LabelMap;
use crate::output::{HarmonisedRow, sex_mf};
use crate::parse::{CsvTable, age_years, locate_table};
use crate::{SourceError, SourceOptions};

pub const DATASET: &str = "NIH-CXR14";
/// The built-in label map.
pub const LABEL_MAP: &str = include_str!("../labelmaps/nih.toml");
/// The table's names, newest first.
pub const TABLES: [&str; 4] = [
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
];

/// What `radit harmonise nih` reads and how.
#[derive(Debug, Clone, PartialEq)]
pub struct NihOptions {
    pub source: SourceOptions,
    /// Lung opacity also from Consolidation, Atelectasis, Edema and Pneumonia (CheXpert's hierarchy).
    pub opacity_includes_children: bool,
}

impl NihOptions {
    pub fn new(root: &Path) -> Self {
        Self {
            source: SourceOptions::new(root),
            opacity_includes_children: false,
        }
    }
}

/// Every PNG under `root`, by file name, as a path relative to `root` (the first found wins; walked in name order).
fn images_under(root: &Path) -> Result<HashMap<String, String>, SourceError> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let read = std::fs::read_dir(&dir).map_err(|source| SourceError::ReadInput {
            path: dir.clone(),
            source,
        })?;
        let mut entries: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries.into_iter().rev() {
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"))
                && let (Some(name), Ok(rel)) = (p.file_name(), p.strip_prefix(root))
            {
                out.entry(name.to_string_lossy().into_owned())
                    .or_insert_with(|| rel.to_string_lossy().into_owned());
            }
        }
    }
    Ok(out)
}

/// Harmonises the release under `opts.root`: the rows to write and the audit report.
pub fn harmonise(nih: &NihOptions) -> Result<(Vec<HarmonisedRow>, Audit), SourceError> {
    let opts = &nih.source;
    let table = locate_table(&opts.root, opts.table.as_deref(), &TABLES)?;
    let mut map = LabelMap::load(opts.labelmap.as_deref(), LABEL_MAP)?;
    if nih.opacity_includes_children {
        map.extend(
            "lung_opacity",
            &["Consolidation", "Atelectasis", "Edema", "Pneumonia"],
        );
    }
    let mut audit = Audit::new(DATASET);
    audit.inputs.push(table.display().to_string());
    audit.label_map = map.origin.clone();
    let mut csv = CsvTable::open(
        &table,
        &[
            "Image Index",
            "Finding Labels",
            "Patient ID",
            "Patient Age",
            "Patient Gender",
            "View Position",
        ],
    )?;
    let [
        image_col,
        labels_col,
        patient_col,
        age_col,
        sex_col,
        view_col,
    ] = csv.columns[..]
    else {
        unreachable!("one position per name asked for");
    };
    let images = if opts.check_files {
        images_under(&opts.root)?
    } else {
        HashMap::new()
    };
    let mut checks = RowChecks::new(
        &table,
        ("Image Index", image_col),
        ("Patient ID", patient_col),
    );
    let mut rows = Vec::new();
    for record in csv.reader.records() {
        let Some(row) = checks.accept(&mut audit, record) else {
            continue;
        };
        let (line, field) = (row.line, |i: usize| row.field(i));
        let (image, patient) = (field(image_col), field(patient_col));
        let path = if opts.check_files {
            match images.get(image) {
                Some(p) => p.clone(),
                None => {
                    let reason = format!("no file `{image}` under {}", opts.root.display());
                    audit.reject(&table, line, image, "image file not found", reason);
                    continue;
                }
            }
        } else {
            format!("images/{image}")
        };
        let raw_age = field(age_col);
        let age = audit.age("Patient Age", raw_age, age_years(raw_age), opts);
        let raw_sex = field(sex_col);
        let sex = audit.mapped("Patient Gender", raw_sex, sex_mf(raw_sex));
        let raw_view = field(view_col);
        let view = audit.mapped(
            "View Position",
            raw_view,
            match raw_view {
                "PA" => Some("PA"),
                "AP" => Some("AP"),
                _ => None,
            },
        );
        let labels: Vec<String> = field(labels_col)
            .split('|')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let findings = audit.findings(&map, &labels);
        let mut row = HarmonisedRow::native(DATASET, image, patient, path);
        (row.age, row.sex, row.view, row.findings) = (age, sex, view, findings);
        audit.written(&mut rows, row);
    }
    Ok((rows, audit))
}

/// A synthetic release under `root`: the v2020 table with its split bracketed headers, images in two Kaggle-style
/// folders, ages as a number, `058Y` and an impossible 414, single, multiple and unknown labels, and one row whose
/// image is missing (rejected).
pub fn write_fixture(root: &Path) -> std::io::Result<()> {
    use crate::fixture_files::{png, write};
    let rows = [
        ("00000001_000.png", "No Finding", "1", "58", "M", "PA"),
        ("00000001_001.png", "Effusion|Mass", "1", "058Y", "M", "AP"),
        (
            "00000002_000.png",
            "Cardiomegaly|Infiltration|Hernia",
            "2",
            "414",
            "F",
            "PA",
        ),
        (
            "00000003_000.png",
            "Pneumonia|Lung Tumour",
            "3",
            "33",
            "F",
            "AP",
        ),
        ("00000004_000.png", "Pneumothorax", "4", "70", "M", "PA"),
        ("00000099_000.png", "No Finding", "99", "40", "F", "PA"),
    ];
    let mut lines = vec![
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,\
         OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
            .to_string(),
    ];
    for (i, (image, labels, patient, age, sex, view)) in rows.iter().enumerate() {
        lines.push(format!(
            "{image},{labels},0,{patient},{age},{sex},{view},24,20,0.143,0.143"
        ));
        if *patient != "99" {
            let folder = if i < 3 { "images_001" } else { "images_002" };
            png(&root.join(folder).join("images").join(image), i as u16)?;
        }
    }
    write(
        &root.join("Data_Entry_2017_v2020.csv"),
        (lines.join("\n") + "\n").as_bytes(),
    )
}

//! ReXGradient-160K as released (shared/design/sources.md A.3): `metadata/{train,valid,test}_metadata_view_position.json`,
//! each one JSON object `{ "<study key>": record }` whose records have `PatientID, StudyInstanceUid, AccessionNumber,
//! PatientSex, PatientAge, StudyDate` and two parallel lists, `ImagePath` (`../deid_png/…/instances/<sop>.png`) and
//! `ImageViewPosition`. One row per `ImagePath` element, its path (and image id) without the leading `../`.
//!
//! Studies are read in key order, the files in the order train, valid, test (those that exist). A study whose two
//! lists differ in length has all its images rejected, naming the file and the study key (JSON has no useful line:
//! the rejection's line is 0 and its reason says `study <key>, image <i>`). `PatientAge` is a DICOM Age String
//! (`045Y`) or a plain number; sex `M`/`F`; view by the DICOM ViewPosition rule ([`crate::output::view_position`]); race is not in the release.
//! The release ships no label file that we know of: `--labels` is a CSV keyed by `StudyInstanceUid` (or another record
//! key, `labels_key`) + the 14 CheXpert names; without one every finding is missing and the report says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::audit::Audit;
use crate::chexpert::{LabelTable, chexpert_names};
use crate::output::{Finding, HarmonisedRow, sex_mf, view_position};
use crate::parse::{age_years, read_table_bytes};
use crate::{SourceError, SourceOptions};

pub const DATASET: &str = "ReXGradient-160K";
/// The metadata files, in the order they are read.
pub const TABLES: [&str; 3] = [
    "metadata/train_metadata_view_position.json",
    "metadata/valid_metadata_view_position.json",
    "metadata/test_metadata_view_position.json",
];

/// What `radit harmonise rexgradient` reads and how.
#[derive(Debug, Clone, PartialEq)]
pub struct RexGradientOptions {
    /// `source.table`, when given, is the one metadata JSON read.
    pub source: SourceOptions,
    /// A CSV of `labels_key` + the 14 CheXpert names; without one the findings are missing.
    pub labels: Option<PathBuf>,
    /// The record key that joins the labels (`StudyInstanceUid`, or `AccessionNumber`).
    pub labels_key: String,
}

impl RexGradientOptions {
    pub fn new(root: &Path) -> Self {
        Self {
            source: SourceOptions::new(root),
            labels: None,
            labels_key: "StudyInstanceUid".into(),
        }
    }
}

/// A record value as text: strings as they are, numbers written out, `null` or absent empty.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.trim().to_string(),
        Some(other) => other.to_string(),
    }
}

/// Harmonises the release under `opts.source.root`: the rows to write and the audit report.
pub fn harmonise(rex: &RexGradientOptions) -> Result<(Vec<HarmonisedRow>, Audit), SourceError> {
    let opts = &rex.source;
    let files: Vec<PathBuf> = match &opts.table {
        Some(t) => vec![t.clone()],
        None => TABLES
            .iter()
            .map(|t| opts.root.join(t))
            .filter(|p| p.is_file())
            .collect(),
    };
    if files.is_empty() {
        return Err(SourceError::NoTable {
            root: opts.root.clone(),
            candidates: TABLES.iter().map(|t| t.to_string()).collect(),
        });
    }
    let mut audit = Audit::new(DATASET);
    audit
        .inputs
        .extend(files.iter().map(|f| f.display().to_string()));
    let names = chexpert_names();
    let mut labels = match &rex.labels {
        Some(path) => {
            audit.inputs.push(path.display().to_string());
            audit.label_map = format!(
                "(none: the CheXpert-convention labels of {})",
                path.display()
            );
            Some(LabelTable::read(
                path,
                &[&rex.labels_key],
                &names,
                "study",
                &mut audit,
            )?)
        }
        None => {
            audit.label_map = "(none: no labels file, every finding missing)".into();
            None
        }
    };
    // Image id -> where it was first seen.
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut rows = Vec::new();
    for file in &files {
        let bytes = read_table_bytes(file)?;
        let studies: serde_json::Map<String, Value> =
            serde_json::from_slice(&bytes).map_err(|e| SourceError::InvalidInput {
                path: file.clone(),
                line: e.line() as u64,
                reason: format!("not a JSON object of studies: {e}"),
            })?;
        let mut keys: Vec<&String> = studies.keys().collect();
        keys.sort();
        for key in keys {
            let record = studies.get(key).and_then(Value::as_object);
            let list = |name: &str| record.and_then(|r| r.get(name)).and_then(Value::as_array);
            let Some(paths) = list("ImagePath") else {
                audit.rows.read += 1;
                let reason = format!("study {key}: no ImagePath list");
                audit.reject(file, 0, "", "no ImagePath list", reason);
                continue;
            };
            let views = list("ImageViewPosition").map_or(&[][..], Vec::as_slice);
            let field = |name: &str| text(record.and_then(|r| r.get(name)));
            let patient = field("PatientID");
            for (i, raw_path) in paths.iter().enumerate() {
                audit.rows.read += 1;
                let raw_path = text(Some(raw_path));
                let id = raw_path.strip_prefix("../").unwrap_or(&raw_path);
                let at = format!("study {key}, image {i}");
                if views.len() != paths.len() {
                    let reason = format!(
                        "{at}: {} ImagePath but {} ImageViewPosition",
                        paths.len(),
                        views.len()
                    );
                    audit.reject(
                        file,
                        0,
                        id,
                        "ImagePath and ImageViewPosition lengths differ",
                        reason,
                    );
                    continue;
                }
                if id.is_empty() {
                    audit.reject(
                        file,
                        0,
                        "",
                        "empty ImagePath",
                        format!("{at}: empty ImagePath"),
                    );
                    continue;
                }
                if let Some(first) = seen.get(id) {
                    let reason = format!("{at}: ImagePath also in {first}");
                    audit.reject(file, 0, id, "duplicate ImagePath", reason);
                    continue;
                }
                seen.insert(id.to_string(), format!("{}, {at}", file.display()));
                if patient.is_empty() {
                    audit.reject(
                        file,
                        0,
                        id,
                        "empty PatientID",
                        format!("{at}: empty PatientID"),
                    );
                    continue;
                }
                if let Some(reason) = opts.missing_image(id) {
                    audit.reject(
                        file,
                        0,
                        id,
                        "image file not found",
                        format!("{at}: {reason}"),
                    );
                    continue;
                }
                let raw_age = field("PatientAge");
                audit.at(file, 0, id);
                let age = audit.age("PatientAge", &raw_age, age_years(&raw_age), opts);
                let raw_sex = field("PatientSex");
                let sex = audit.mapped("PatientSex", &raw_sex, sex_mf(&raw_sex));
                let raw_view = text(views.get(i));
                let view = audit.mapped("ImageViewPosition", &raw_view, view_position(&raw_view));
                let findings = match labels.as_mut() {
                    Some(table) => table.findings(&field(&rex.labels_key), &names, &mut audit),
                    None => {
                        audit.value("labels", "(no labels file)", "");
                        [Finding::Missing; 14]
                    }
                };
                let mut row = HarmonisedRow::native(DATASET, id, &patient, id.to_string());
                (row.age, row.sex, row.view, row.findings) = (age, sex, view, findings);
                audit.written(&mut rows, row);
            }
        }
    }
    if let Some(table) = &labels {
        table.count_unused(&mut audit);
    }
    Ok((rows, audit))
}

/// Writes a small ReXGradient-160K release under `root` in the native layout (three metadata JSONs and the PNGs at
/// their `deid_png/…` paths): `PatientAge` as `045Y`, as a plain number and empty, a study whose lists differ in
/// length, studies in the valid and test files, sex `O`, a `null` and an `LL` view. No labels file.
pub fn write_fixture(root: &Path) -> std::io::Result<()> {
    use crate::fixture_files::{png, write};
    // File (0 train, 1 valid, 2 test), study number, PatientSex, PatientAge, images, ImageViewPosition.
    let studies = [
        (0, 1, "F", json!("045Y"), 2, json!(["PA", "LATERAL"])),
        (0, 2, "M", json!(62), 1, json!(["AP"])),
        (0, 3, "M", json!("070Y"), 2, json!(["PA"])),
        (1, 4, "F", json!("030Y"), 1, json!(["LL"])),
        (2, 5, "O", json!(""), 2, json!([null, "AP"])),
    ];
    let mut files = [
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
    ];
    let mut seed = 70;
    for (file, n, sex, age, images, views) in studies {
        let study = format!("1.2.826.0.1.3680043.8.498.{}", 100 + n);
        let dir =
            format!("deid_png/GRDN000{n}/GRDNA100{n}/studies/{study}/series/{study}.1/instances");
        let mut paths = Vec::new();
        for i in 0..images {
            let path = format!("{dir}/{study}.1.{}.png", i + 1);
            seed += 1;
            png(&root.join(&path), seed)?;
            paths.push(format!("../{path}"));
        }
        let record = json!({
            "PatientID": format!("GRDN000{n}"),
            "StudyInstanceUid": study,
            "AccessionNumber": format!("GRDNA100{n}"),
            "PatientSex": sex,
            "PatientAge": age,
            "StudyDate": format!("2019031{n}"),
            "ImagePath": paths,
            "ImageViewPosition": views,
            "Indication": "Cough, fever.",
            "Findings": "The lungs are clear. No pleural effusion.",
            "Impression": "No acute cardiopulmonary process.",
        });
        files[file].insert(format!("pGRDN000{n}_aGRDNA100{n}_s{study}"), record);
    }
    for (name, studies) in TABLES.iter().zip(files) {
        let text = serde_json::to_string_pretty(&Value::Object(studies))?;
        write(&root.join(name), text.as_bytes())?;
    }
    // What CheXbert over the reports gives (made outside radit): two studies labelled, keyed by StudyInstanceUid.
    let names = chexpert_names();
    let labels = format!(
        "StudyInstanceUid,{}\n1.2.826.0.1.3680043.8.498.101,{}\n1.2.826.0.1.3680043.8.498.104,{}\n",
        names.join(","),
        "0,1,,,,,,,0,-1,,,,",
        ",,,,,,,,1,,,,,"
    );
    write(&root.join(FIXTURE_LABELS), labels.as_bytes())
}

/// The CheXbert label file the fixture writes beside the release (`--labels`).
pub const FIXTURE_LABELS: &str = "chexbert_labels.csv";

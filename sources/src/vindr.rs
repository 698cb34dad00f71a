//! VinDr-CXR as released (shared/design/sources.md A.5): `annotations/image_labels_train.csv` has one row per reader
//! (three radiologists per image, `image_id, rad_id` and 28 label columns of 0/1), `annotations/image_labels_test.csv`
//! one consensus row per image (no `rad_id`, and `Other diseases` spelt `Other disease`); the images are
//! `train/<image_id>.dicom` and `test/<image_id>.dicom`.
//!
//! A training image's label is positive when at least `min_votes` readers (default 2, the majority of three) marked
//! it; images with other than three readers are counted in the report. There is no table of demographics: age, sex
//! and view come from each DICOM's header (read up to the pixel data, in parallel). An empty or `000Y` PatientAge is
//! missing; an absent ViewPosition is `default_view` (PA: VinDr's images are frontal). There is no patient id either,
//! so each image is its own patient. The report's rows are images (a training image is three table rows).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use radit_dicom::{DicomHeader, read_header};

use crate::audit::Audit;
use crate::labelmap::LabelMap;
use crate::output::{HarmonisedRow, sex_mf, view_position};
use crate::parse::{CsvTable, age_years};
use crate::{SourceError, SourceOptions};

pub const DATASET: &str = "VinDr-CXR";
/// The built-in label map.
pub const LABEL_MAP: &str = include_str!("../labelmaps/vindr.toml");
/// The release's label tables and the folder of each one's images.
pub const TABLES: [(&str, &str); 2] = [
    ("annotations/image_labels_train.csv", "train"),
    ("annotations/image_labels_test.csv", "test"),
];

/// What `radit harmonise vindr` reads and how.
#[derive(Debug, Clone, PartialEq)]
pub struct VindrOptions {
    pub source: SourceOptions,
    /// Readers who must mark a label for it to count (training images; the test file is a consensus).
    pub min_votes: u32,
    /// The view of an image whose header has no ViewPosition (`None`: missing).
    pub default_view: Option<&'static str>,
    /// A PatientAge of `000Y` is missing rather than a newborn (VinDr writes it for unknown ages).
    pub zero_age_missing: bool,
    /// Threads reading DICOM headers.
    pub threads: usize,
}

impl VindrOptions {
    pub fn new(root: &Path) -> Self {
        Self {
            source: SourceOptions::new(root),
            min_votes: 2,
            default_view: Some("PA"),
            zero_age_missing: true,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// `PA`, `AP` or `none`, for `--default-view`.
pub fn parse_default_view(text: &str) -> Result<Option<&'static str>, String> {
    match text {
        "PA" => Ok(Some("PA")),
        "AP" => Ok(Some("AP")),
        "none" => Ok(None),
        other => Err(format!("`{other}`: expected PA, AP or none")),
    }
}

/// One image's annotation rows, gathered.
struct Votes {
    image: String,
    folder: &'static str,
    table: PathBuf,
    line: u64,
    readers: u32,
    /// Label column -> readers who marked it.
    marked: Vec<u32>,
    /// Whether the table is a consensus (one row, no vote).
    consensus: bool,
    bad: Option<String>,
}

/// A 0/1 label cell (`0.0`/`1.0` too).
fn mark(cell: &str) -> Option<u32> {
    match cell.trim() {
        "0" | "0.0" => Some(0),
        "1" | "1.0" => Some(1),
        _ => None,
    }
}

/// Harmonises the release under `opts.source.root`: the rows to write and the audit report.
pub fn harmonise(vindr: &VindrOptions) -> Result<(Vec<HarmonisedRow>, Audit), SourceError> {
    let opts = &vindr.source;
    let map = LabelMap::load(opts.labelmap.as_deref(), LABEL_MAP)?;
    let mut audit = Audit::new(DATASET);
    audit.label_map = map.origin.clone();
    let tables: Vec<(PathBuf, &'static str)> = TABLES
        .iter()
        .map(|(t, folder)| (opts.root.join(t), *folder))
        .filter(|(t, _)| t.is_file())
        .collect();
    if tables.is_empty() {
        return Err(SourceError::NoTable {
            root: opts.root.clone(),
            candidates: TABLES.iter().map(|(t, _)| t.to_string()).collect(),
        });
    }
    let mut images: Vec<Votes> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    // Label columns by name, the same order for every table.
    let mut labels: Vec<String> = Vec::new();
    for (table, folder) in &tables {
        audit.inputs.push(table.display().to_string());
        let mut csv = CsvTable::open(table, &["image_id"])?;
        let id_col = csv.columns[0];
        let header = csv
            .reader
            .headers()
            .map_err(|e| SourceError::InvalidInput {
                path: table.clone(),
                line: 1,
                reason: e.to_string(),
            })?
            .clone();
        let names: Vec<String> = header
            .iter()
            .map(|h| h.trim().trim_start_matches('\u{feff}').to_string())
            .collect();
        let rad_col = names.iter().position(|n| n == "rad_id");
        let consensus = rad_col.is_none();
        // Column position -> label index.
        let mut columns = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if i == id_col || Some(i) == rad_col {
                continue;
            }
            let name = if name == "Other disease" {
                "Other diseases".to_string()
            } else {
                name.clone()
            };
            let at = labels.iter().position(|l| *l == name).unwrap_or_else(|| {
                labels.push(name);
                labels.len() - 1
            });
            columns.push((i, at));
        }
        for record in csv.reader.records() {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line());
                    audit.rows.read += 1;
                    audit.reject(table, line, "", "unreadable row", e.to_string());
                    continue;
                }
            };
            let line = record.position().map_or(0, |p| p.line());
            let image = record.get(id_col).unwrap_or_default().trim();
            if image.is_empty() {
                audit.rows.read += 1;
                audit.reject(table, line, "", "empty image_id", "empty image_id".into());
                continue;
            }
            let slot = match index.get(image) {
                Some(&i) if images[i].consensus || consensus || images[i].table != *table => {
                    let first = &images[i];
                    let reason = format!(
                        "image_id `{image}` is also on line {} of {}",
                        first.line,
                        first.table.display()
                    );
                    audit.rows.read += 1;
                    audit.reject(table, line, image, "duplicate image_id", reason);
                    continue;
                }
                Some(&i) => i,
                None => {
                    index.insert(image.to_string(), images.len());
                    images.push(Votes {
                        image: image.to_string(),
                        folder,
                        table: table.clone(),
                        line,
                        readers: 0,
                        marked: Vec::new(),
                        consensus,
                        bad: None,
                    });
                    images.len() - 1
                }
            };
            let votes = &mut images[slot];
            votes.readers += 1;
            votes.marked.resize(labels.len(), 0);
            for &(col, label) in &columns {
                let cell = record.get(col).unwrap_or_default();
                match mark(cell) {
                    Some(m) => votes.marked[label] += m,
                    None if votes.bad.is_none() => {
                        votes.bad = Some(format!(
                            "line {line}: `{}` is `{}`, not 0 or 1",
                            labels[label],
                            cell.trim()
                        ))
                    }
                    None => {}
                }
            }
        }
    }
    let headers = read_headers(&images, vindr);
    let mut rows = Vec::new();
    for (votes, header) in images.iter().zip(headers) {
        audit.rows.read += 1;
        let image = votes.image.as_str();
        if let Some(reason) = &votes.bad {
            audit.reject(
                &votes.table,
                votes.line,
                image,
                "label not 0 or 1",
                reason.clone(),
            );
            continue;
        }
        let path = format!("{}/{image}.dicom", votes.folder);
        let header = match header {
            Some(Ok(h)) => Some(h),
            Some(Err((kind, reason))) => {
                audit.reject(&votes.table, votes.line, image, kind, reason);
                continue;
            }
            None => None,
        };
        if !votes.consensus {
            audit.value(
                "readers per image",
                &votes.readers.to_string(),
                if votes.readers == 3 { "3" } else { "not 3" },
            );
        }
        let needed = if votes.consensus { 1 } else { vindr.min_votes };
        let mut present = Vec::new();
        for (label, &n) in labels.iter().zip(&votes.marked) {
            if n > 0 && !votes.consensus {
                let won = if n >= needed { "present" } else { "absent" };
                audit.value(
                    "votes (label: readers who marked it)",
                    &format!("{label}: {n} of {}", votes.readers),
                    won,
                );
            }
            if n >= needed {
                present.push(label.clone());
            }
        }
        audit.at(&votes.table, votes.line, image);
        let findings = audit.findings_labelled(&map, &present);
        let (age, sex, view) = demographics(&mut audit, header.as_ref(), vindr);
        let mut row = HarmonisedRow::native(DATASET, image, image, path);
        (row.age, row.sex, row.view, row.findings) = (age, sex, view, findings);
        audit.written(&mut rows, row);
    }
    Ok((rows, audit))
}

/// Age, sex and view from a header (all missing, the view defaulted, without one), counted in the report.
fn demographics(
    audit: &mut Audit,
    header: Option<&DicomHeader>,
    vindr: &VindrOptions,
) -> (Option<f64>, Option<&'static str>, Option<&'static str>) {
    let field = |f: fn(&DicomHeader) -> &Option<String>| {
        header.and_then(|h| f(h).clone()).unwrap_or_default()
    };
    let raw_age = field(|h| &h.patient_age);
    // VinDr writes 000Y for an unknown age.
    let parsed = age_years(&raw_age).map(|a| a.filter(|a| !(vindr.zero_age_missing && *a == 0.0)));
    let age = audit.age("PatientAge (DICOM)", &raw_age, parsed, &vindr.source);
    let raw_sex = field(|h| &h.patient_sex);
    let sex = audit.mapped("PatientSex (DICOM)", &raw_sex, sex_mf(&raw_sex));
    let raw_view = field(|h| &h.view_position);
    let view = if raw_view.is_empty() {
        audit.mapped("ViewPosition (DICOM)", "(absent)", vindr.default_view)
    } else {
        audit.mapped("ViewPosition (DICOM)", &raw_view, view_position(&raw_view))
    };
    (age, sex, view)
}

/// A header that could not be had: the rejection's kind and reason.
type HeaderProblem = (&'static str, String);

/// Each image's DICOM header, read in parallel (`None` for every image when files are not checked).
fn read_headers(
    images: &[Votes],
    vindr: &VindrOptions,
) -> Vec<Option<Result<DicomHeader, HeaderProblem>>> {
    if !vindr.source.check_files {
        return images.iter().map(|_| None).collect();
    }
    let root = &vindr.source.root;
    let paths: Vec<PathBuf> = images
        .iter()
        .map(|v| root.join(format!("{}/{}.dicom", v.folder, v.image)))
        .collect();
    crate::parallel_map(&paths, vindr.threads, |p| Some(header_of(p)))
}

/// The header of the DICOM at `path`, from its first 64 KiB (the whole file when the header is longer).
pub fn header_of(path: &Path) -> Result<DicomHeader, HeaderProblem> {
    let missing = |e: std::io::Error| ("image file not found", format!("{}: {e}", path.display()));
    let mut file = std::fs::File::open(path).map_err(missing)?;
    let mut prefix = Vec::with_capacity(64 << 10);
    (&mut file)
        .take(64 << 10)
        .read_to_end(&mut prefix)
        .map_err(missing)?;
    let unreadable = |e: radit_dicom::DicomProblem| {
        (
            "unreadable DICOM header",
            format!("{}: {e}", path.display()),
        )
    };
    match read_header(&prefix) {
        Ok(h) => Ok(h),
        Err(_) if prefix.len() == 64 << 10 => {
            file.read_to_end(&mut prefix).map_err(missing)?;
            read_header(&prefix).map_err(unreadable)
        }
        Err(e) => Err(unreadable(e)),
    }
}

/// The 28 label columns of the training table, in the release's order.
pub const TRAIN_COLUMNS: [&str; 28] = [
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
];

/// One annotation row: the columns marked 1.
fn annotation(marked: &[&str]) -> String {
    TRAIN_COLUMNS
        .iter()
        .map(|c| if marked.contains(c) { "1" } else { "0" })
        .collect::<Vec<_>>()
        .join(",")
}

/// A synthetic release under `root`: four training images (a 2-of-3 vote, a unanimous normal, four readers, a
/// label only one reader marked) and two test images (the `Other disease` spelling), with DICOM headers of every
/// demographic kind (`045Y`, `000Y`, empty age; sex `O`; no ViewPosition; `LL`) and a MONOCHROME1 image.
pub fn write_fixture(root: &Path) -> std::io::Result<()> {
    use crate::fixture_files::{dicom, write};
    let train = [
        ("v1", "R8", vec!["Cardiomegaly"]),
        ("v1", "R9", vec!["Cardiomegaly", "Pleural effusion"]),
        ("v1", "R10", vec![]),
        ("v2", "R8", vec!["No finding"]),
        ("v2", "R9", vec!["No finding"]),
        ("v2", "R10", vec!["No finding"]),
        ("v3", "R1", vec!["Nodule/Mass"]),
        ("v3", "R2", vec!["Nodule/Mass", "Lung tumor"]),
        ("v3", "R3", vec![]),
        ("v3", "R4", vec!["No finding"]),
        ("v4", "R8", vec!["Pneumothorax"]),
        ("v4", "R9", vec![]),
        ("v4", "R10", vec![]),
    ];
    let mut lines = vec![format!("image_id,rad_id,{}", TRAIN_COLUMNS.join(","))];
    lines.extend(
        train
            .iter()
            .map(|(id, rad, marked)| format!("{id},{rad},{}", annotation(marked))),
    );
    write(
        &root.join(TABLES[0].0),
        (lines.join("\n") + "\n").as_bytes(),
    )?;
    let test_header = TRAIN_COLUMNS
        .join(",")
        .replace("Other diseases", "Other disease");
    let test = [
        format!("image_id,{test_header}"),
        format!("t1,{}", annotation(&["Other diseases", "Cardiomegaly"])),
        format!("t2,{}", annotation(&["No finding"])),
    ];
    write(&root.join(TABLES[1].0), (test.join("\n") + "\n").as_bytes())?;
    // (image, seed, PatientAge, PatientSex, ViewPosition); "" leaves the attribute out.
    let headers = [
        ("train/v1", 1, "045Y", "M", "PA"),
        ("train/v2", 2, "000Y", "F", ""),
        ("train/v3", 3, "", "O", "AP"),
        ("train/v4", 4, "062Y", "F", "LL"),
        ("test/t1", 5, "030Y", "M", "PA"),
        ("test/t2", 6, "071Y", "F", "PA"),
    ];
    let given = |v: &str| (!v.is_empty()).then(|| v.to_string());
    for (name, seed, age, sex, view) in headers {
        dicom(&root.join(format!("{name}.dicom")), seed, |f| {
            if seed == 1 {
                f.photometric = "MONOCHROME1".into();
                f.windows = vec![(2048.0, 4096.0)];
            }
            f.patient_age = given(age);
            f.patient_sex = given(sex);
            f.view_position = given(view);
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_map_validates() {
        let m = LabelMap::load(None, LABEL_MAP).unwrap();
        assert_eq!(m.vocabulary_len(), 28);
    }

    #[test]
    fn marks_and_default_views() {
        assert_eq!(mark("1.0"), Some(1));
        assert_eq!(mark(" 0"), Some(0));
        assert_eq!(mark("2"), None);
        assert_eq!(parse_default_view("none"), Ok(None));
        assert!(parse_default_view("L").is_err());
    }
}

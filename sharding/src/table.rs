//! Reading and validating the harmonised metadata table (one CSV row per image).
//!
//! A problem with one row rejects that row (with its line number and reason) or, for values the schema tolerates,
//! stores the cell as missing and counts it. Only problems with the table as a whole (unreadable, no header, a
//! required column absent, no data rows) stop the ingest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ShardError;
use crate::schema::{self, Age, Cell, EncodingConfig, NUM_LABELS};
use crate::split::{Split, SplitConfig};

/// Columns every table must have.
pub const REQUIRED_COLUMNS: [&str; 8] = [
    "image_id",
    "patient_id",
    "dataset",
    "path",
    "age",
    "sex",
    "race",
    "view",
];
/// Optional column: an explicit patient-level split.
pub const SPLIT_COLUMN: &str = "split";

/// One accepted, encoded table row.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    /// 1-based line of the CSV file where the row starts (the header is line 1).
    pub line: u64,
    pub image_id: String,
    pub patient_id: String,
    /// Image path relative to the images root.
    pub path: String,
    pub labels: [u8; NUM_LABELS],
    /// Years/100, NaN = missing.
    pub age: f32,
    pub split: Split,
}

/// A row that will not be ingested, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub line: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(id) = &self.image_id {
            write!(f, " (image_id {id})")?;
        }
        if let Some(file) = &self.file {
            write!(f, " [{file}]")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Values stored as missing because they were not understood, counted by kind with the first few examples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Warnings(pub BTreeMap<String, WarningCount>);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WarningCount {
    pub count: u64,
    pub examples: Vec<String>,
}

const MAX_WARNING_EXAMPLES: usize = 20;

impl Warnings {
    pub fn add(&mut self, kind: &str, example: impl FnOnce() -> String) {
        let entry = self.0.entry(kind.to_string()).or_default();
        entry.count += 1;
        if entry.examples.len() < MAX_WARNING_EXAMPLES {
            entry.examples.push(example());
        }
    }

    pub fn merge(&mut self, other: &Warnings) {
        for (kind, w) in &other.0 {
            let entry = self.0.entry(kind.clone()).or_default();
            entry.count += w.count;
            let room = MAX_WARNING_EXAMPLES.saturating_sub(entry.examples.len());
            entry.examples.extend(w.examples.iter().take(room).cloned());
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().map(|w| w.count).sum()
    }
}

/// The validated table.
#[derive(Debug, Clone)]
pub struct Table {
    pub path: PathBuf,
    pub sha256: String,
    /// Data rows seen (every line after the header that held a record).
    pub data_rows: u64,
    pub rows: Vec<TableRow>,
    pub rejected: Vec<Rejection>,
    pub warnings: Warnings,
    pub ignored_columns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TableConfig {
    pub encoding: EncodingConfig,
    pub split: SplitConfig,
}

struct Columns {
    index: HashMap<&'static str, usize>,
    findings: [usize; 14],
    split: Option<usize>,
    count: usize,
}

fn locate_columns(
    path: &Path,
    header: &csv::ByteRecord,
) -> Result<(Columns, Vec<String>), ShardError> {
    let mut names = Vec::with_capacity(header.len());
    for raw in header.iter() {
        // Schema columns are ASCII, so a name that is not UTF-8 can only be an extra column: keep it, lossily
        // decoded, so it is ignored with a warning like any other.
        let name = String::from_utf8_lossy(raw);
        // A UTF-8 byte-order mark on the first column is common in exported CSVs.
        names.push(name.trim_start_matches('\u{feff}').trim().to_string());
    }
    let mut seen = HashSet::new();
    for name in &names {
        if !seen.insert(name.as_str()) {
            return Err(ShardError::InvalidTable {
                path: path.to_path_buf(),
                reason: format!("column '{name}' appears more than once in the header"),
            });
        }
    }
    let find = |want: &str| names.iter().position(|n| n == want);
    let mut missing = Vec::new();
    let mut index = HashMap::new();
    for col in REQUIRED_COLUMNS {
        match find(col) {
            Some(i) => {
                index.insert(col, i);
            }
            None => missing.push(col.to_string()),
        }
    }
    let mut findings = [0usize; 14];
    for (k, col) in schema::FINDINGS.iter().enumerate() {
        match find(col) {
            Some(i) => findings[k] = i,
            None => missing.push(col.to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(ShardError::InvalidTable {
            path: path.to_path_buf(),
            reason: format!(
                "required column(s) missing from the header: {}",
                missing.join(", ")
            ),
        });
    }
    let split = find(SPLIT_COLUMN);
    let known: HashSet<&str> = REQUIRED_COLUMNS
        .iter()
        .chain(schema::FINDINGS.iter())
        .copied()
        .chain([SPLIT_COLUMN])
        .collect();
    let ignored = names
        .iter()
        .filter(|n| !known.contains(n.as_str()))
        .cloned()
        .collect();
    Ok((
        Columns {
            index,
            findings,
            split,
            count: names.len(),
        },
        ignored,
    ))
}

/// A row after per-cell validation, before patient-level split checks.
struct Candidate {
    row: TableRow,
    explicit_split: Option<Split>,
}

/// Reads, validates and encodes the table at `path`.
pub fn read_table(path: &Path, cfg: &TableConfig) -> Result<Table, ShardError> {
    let bytes = std::fs::read(path).map_err(|source| ShardError::ReadInput {
        path: path.to_path_buf(),
        source,
    })?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ShardError::InvalidTable {
            path: path.to_path_buf(),
            reason: "the table is empty (no header)".into(),
        });
    }
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .has_headers(true)
        .from_reader(bytes.as_slice());
    let header = reader
        .byte_headers()
        .map_err(|e| ShardError::InvalidTable {
            path: path.to_path_buf(),
            reason: format!("cannot read header: {e}"),
        })?
        .clone();
    let (cols, ignored_columns) = locate_columns(path, &header)?;

    let mut warnings = Warnings::default();
    for name in &ignored_columns {
        tracing::warn!(table = %path.display(), column = %name, "ignoring column that is not part of the schema");
    }
    let mut rejected = Vec::new();
    let mut candidates = Vec::new();
    let mut data_rows = 0u64;
    let mut seen_ids: HashMap<String, u64> = HashMap::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let line_hint = reader.position().line();
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                // A structural CSV error: count it as a rejected row and carry on from the next record.
                data_rows += 1;
                rejected.push(Rejection {
                    line: e.position().map_or(line_hint, |p| p.line()),
                    image_id: None,
                    file: None,
                    reason: format!("malformed CSV record: {e}"),
                });
                continue;
            }
        }
        data_rows += 1;
        let line = record.position().map_or(line_hint, |p| p.line());
        match validate_row(&record, line, &cols, cfg, &mut warnings) {
            Ok(candidate) => {
                if let Some(first) = seen_ids.get(&candidate.row.image_id) {
                    rejected.push(Rejection {
                        line,
                        image_id: Some(candidate.row.image_id.clone()),
                        file: None,
                        reason: format!(
                            "duplicate image_id (first seen on line {first}); keeping the first"
                        ),
                    });
                } else {
                    seen_ids.insert(candidate.row.image_id.clone(), line);
                    candidates.push(candidate);
                }
            }
            Err(r) => rejected.push(r),
        }
    }
    if data_rows == 0 {
        return Err(ShardError::InvalidTable {
            path: path.to_path_buf(),
            reason: "the table has a header but no data rows".into(),
        });
    }
    let rows = assign_splits(candidates, &cfg.split, &mut rejected).map_err(|reason| {
        ShardError::InvalidTable {
            path: path.to_path_buf(),
            reason,
        }
    })?;
    rejected.sort_by_key(|r| r.line);
    Ok(Table {
        path: path.to_path_buf(),
        sha256,
        data_rows,
        rows,
        rejected,
        warnings,
        ignored_columns,
    })
}

fn validate_row(
    record: &csv::ByteRecord,
    line: u64,
    cols: &Columns,
    cfg: &TableConfig,
    warnings: &mut Warnings,
) -> Result<Candidate, Rejection> {
    let reject = |image_id: Option<String>, reason: String| Rejection {
        line,
        image_id,
        file: None,
        reason,
    };
    if record.len() != cols.count {
        return Err(reject(
            None,
            format!(
                "malformed row: expected {} fields like the header, found {}",
                cols.count,
                record.len()
            ),
        ));
    }
    let field = |i: usize, name: &str| -> Result<&str, String> {
        std::str::from_utf8(&record[i]).map(str::trim).map_err(|e| {
            format!(
                "column '{name}' is not valid UTF-8 (bad byte at offset {})",
                e.valid_up_to()
            )
        })
    };
    let get = |name: &'static str| field(cols.index[name], name);
    let image_id = get("image_id").map_err(|r| reject(None, r))?.to_string();
    let id = || Some(image_id.clone());
    if image_id.is_empty() {
        return Err(reject(None, "image_id is empty".into()));
    }
    let patient_id = get("patient_id").map_err(|r| reject(id(), r))?.to_string();
    if patient_id.is_empty() {
        return Err(reject(id(), "patient_id is empty".into()));
    }
    let path = get("path").map_err(|r| reject(id(), r))?.to_string();
    if path.is_empty() {
        return Err(reject(id(), "path is empty".into()));
    }
    if Path::new(&path).is_absolute()
        || Path::new(&path)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(reject(
            id(),
            format!("path '{path}' must be relative to the images root without '..'"),
        ));
    }

    let mut labels = [0u8; NUM_LABELS];
    let mut note = |kind: &str, column: &str, value: &str| {
        warnings.add(kind, || {
            format!("line {line} (image_id {image_id}): {column}='{value}'")
        });
    };
    for (k, &col) in cols.findings.iter().enumerate() {
        let name = schema::FINDINGS[k];
        let raw = field(col, name).map_err(|r| reject(id(), r))?;
        labels[k] = match schema::encode_finding(raw, cfg.encoding.uncertain) {
            Cell::Class(c) => c,
            Cell::Unknown => {
                note("unknown_finding_value", name, raw);
                0
            }
        };
    }
    type Encoder = fn(&str, bool) -> Cell;
    let enums: [(&'static str, usize, Encoder); 4] = [
        ("race", schema::RACE_INDEX, |v, _| schema::encode_race(v)),
        ("sex", schema::SEX_INDEX, |v, _| schema::encode_sex(v)),
        ("view", schema::VIEW_INDEX, schema::encode_view),
        ("dataset", schema::DATASET_INDEX, |v, _| {
            schema::encode_dataset(v)
        }),
    ];
    for (name, index, encode) in enums {
        let raw = get(name).map_err(|r| reject(id(), r))?;
        labels[index] = match encode(raw, cfg.encoding.view_aliases) {
            Cell::Class(c) => c,
            Cell::Unknown => {
                note(&format!("unknown_{name}"), name, raw);
                0
            }
        };
    }
    let raw_age = get("age").map_err(|r| reject(id(), r))?;
    let age = schema::encode_age(raw_age, &cfg.encoding);
    match age {
        Age::NotANumber => note("non_numeric_age", "age", raw_age),
        Age::Implausible(_) => note("implausible_age", "age", raw_age),
        _ => {}
    }
    let explicit_split = match cols.split {
        None => None,
        Some(i) => {
            let raw = field(i, SPLIT_COLUMN).map_err(|r| reject(id(), r))?;
            if raw.is_empty() {
                None
            } else {
                Some(raw.parse::<Split>().map_err(|e| reject(id(), e))?)
            }
        }
    };
    let row = TableRow {
        line,
        image_id,
        patient_id,
        path,
        labels,
        age: age.stored(),
        split: Split::Train,
    };
    Ok(Candidate {
        row,
        explicit_split,
    })
}

/// Gives each row its patient's split: the explicit one where the table has it, else the seeded hash. A patient
/// placed in two different splits explicitly would leak across splits, so all of that patient's rows are rejected.
fn assign_splits(
    candidates: Vec<Candidate>,
    cfg: &SplitConfig,
    rejected: &mut Vec<Rejection>,
) -> Result<Vec<TableRow>, String> {
    let mut explicit: HashMap<&str, BTreeMap<Split, Vec<u64>>> = HashMap::new();
    for c in &candidates {
        if let Some(s) = c.explicit_split {
            explicit
                .entry(c.row.patient_id.as_str())
                .or_default()
                .entry(s)
                .or_default()
                .push(c.row.line);
        }
    }
    let mut decided: HashMap<String, Result<Split, String>> = HashMap::new();
    for (patient, splits) in &explicit {
        let outcome = if splits.len() == 1 {
            Ok(*splits.keys().next().expect("one entry"))
        } else {
            let parts: Vec<String> = splits
                .iter()
                .map(|(s, lines)| {
                    let lines: Vec<String> = lines.iter().map(u64::to_string).collect();
                    format!("{s} (lines {})", lines.join(", "))
                })
                .collect();
            Err(format!(
                "patient {patient} is placed in more than one split: {}",
                parts.join(" and ")
            ))
        };
        decided.insert(patient.to_string(), outcome);
    }
    let hashed = cfg.assign_all(
        candidates
            .iter()
            .filter(|c| !decided.contains_key(&c.row.patient_id))
            .map(|c| c.row.patient_id.as_str()),
    )?;
    let hashed: HashMap<String, Split> = hashed
        .into_iter()
        .map(|(p, s)| (p.to_string(), s))
        .collect();
    let mut rows = Vec::with_capacity(candidates.len());
    for Candidate { mut row, .. } in candidates {
        match decided.get(&row.patient_id) {
            Some(Ok(s)) => row.split = *s,
            Some(Err(reason)) => {
                rejected.push(Rejection {
                    line: row.line,
                    image_id: Some(row.image_id),
                    file: None,
                    reason: reason.clone(),
                });
                continue;
            }
            None => row.split = hashed[&row.patient_id],
        }
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(extra: &str) -> String {
        let mut cols: Vec<&str> = REQUIRED_COLUMNS.to_vec();
        cols.extend(schema::FINDINGS);
        let mut h = cols.join(",");
        h.push_str(extra);
        h
    }

    fn row(id: &str, patient: &str, rest: &str) -> String {
        // image_id, patient_id, dataset, path, age, sex, race, view, 14 findings
        format!("{id},{patient},{rest}")
    }

    fn write(contents: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), contents).unwrap();
        f
    }

    const GOOD: &str = "MIMIC-CXR,a.png,63,Female,White,PA,,1,,,,,,,,-1,,,,1";

    #[test]
    fn encodes_rows_and_counts_everything() {
        let text = format!(
            "{}\n{},a\n{},b\n{},c\n",
            header(",notes"),
            row("i1", "p1", GOOD),
            row("i2", "p2", "NIH-CXR14,b.png,sixty,X,,LL,,,,,,,,,,,,,,"),
            row("i1", "p3", GOOD),
        );
        let f = write(text.as_bytes());
        let t = read_table(f.path(), &TableConfig::default()).unwrap();
        assert_eq!(t.data_rows, 3);
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rejected.len(), 1);
        assert!(
            t.rejected[0].reason.contains("duplicate image_id"),
            "{}",
            t.rejected[0]
        );
        assert_eq!(t.rejected[0].line, 4);
        assert_eq!(t.ignored_columns, vec!["notes".to_string()]);
        let r = &t.rows[0];
        assert_eq!(r.labels[1], 2); // cardiomegaly positive
        assert_eq!(r.labels[9], 0); // pleural effusion uncertain -> missing under U-Ignore
        assert_eq!(r.labels[13], 2);
        assert_eq!(&r.labels[14..], &[3, 2, 2, 1]);
        assert!((r.age - 0.63).abs() < 1e-6);
        let r2 = &t.rows[1];
        assert!(r2.age.is_nan());
        assert_eq!(r2.labels[schema::SEX_INDEX], 0);
        assert_eq!(r2.labels[schema::VIEW_INDEX], 3);
        assert_eq!(t.warnings.0["non_numeric_age"].count, 1);
        assert_eq!(t.warnings.0["unknown_sex"].count, 1);
        assert!(t.warnings.0["unknown_sex"].examples[0].contains("line 3"));
    }

    #[test]
    fn malformed_and_non_utf8_rows_are_rejected_by_line() {
        let mut text = format!("{}\n{}\n", header(""), row("i1", "p1", GOOD)).into_bytes();
        text.extend_from_slice(b"i2,p2,MIMIC-CXR,c.png,40\n");
        text.extend_from_slice(
            format!("{}\n", row("i3", "p\u{e9}", GOOD))
                .replace('\u{e9}', "\u{1}")
                .as_bytes(),
        );
        let bad = row("i4", "pX", GOOD).into_bytes();
        let mut bad = bad;
        bad[4] = 0xff; // inside patient_id
        text.extend_from_slice(&bad);
        text.push(b'\n');
        let f = write(&text);
        let t = read_table(f.path(), &TableConfig::default()).unwrap();
        assert_eq!(t.data_rows, 4);
        assert_eq!(t.rows.len(), 2);
        let reasons: Vec<String> = t.rejected.iter().map(|r| r.to_string()).collect();
        assert!(
            reasons[0].starts_with("line 3") && reasons[0].contains("expected 22 fields"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].starts_with("line 5") && reasons[1].contains("not valid UTF-8"),
            "{reasons:?}"
        );
    }

    #[test]
    fn patient_in_two_explicit_splits_is_rejected_whole() {
        let text = format!(
            "{}\n{},train\n{},test\n{},\n{},val\n",
            header(",split"),
            row("i1", "p1", GOOD),
            row("i2", "p1", GOOD),
            row("i3", "p2", GOOD),
            row("i4", "p3", GOOD)
        );
        let f = write(text.as_bytes());
        let t = read_table(f.path(), &TableConfig::default()).unwrap();
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rejected.len(), 2);
        assert!(
            t.rejected[0]
                .reason
                .contains("patient p1 is placed in more than one split")
        );
        assert!(
            t.rejected[0].reason.contains("lines 2") && t.rejected[0].reason.contains("lines 3")
        );
        assert_eq!(t.rows[1].split, Split::Val);
    }

    #[test]
    fn whole_table_problems_are_errors_naming_the_file() {
        let empty = write(b"");
        let e = read_table(empty.path(), &TableConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("empty") && e.contains(&empty.path().display().to_string()),
            "{e}"
        );
        let header_only = write(format!("{}\n", header("")).as_bytes());
        let e = read_table(header_only.path(), &TableConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no data rows"), "{e}");
        let no_age = write(b"image_id,patient_id\n1,2\n");
        let e = read_table(no_age.path(), &TableConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing from the header")
                && e.contains("age")
                && e.contains("cardiomegaly"),
            "{e}"
        );
        let e = read_table(Path::new("/nonexistent/t.csv"), &TableConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/t.csv"), "{e}");
    }
}

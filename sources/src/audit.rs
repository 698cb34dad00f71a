//! The audit report of one harmonisation: rows read, written and rejected (with file, line and reason), and for every
//! raw column mapped, each raw value with what it became and how often, so a person can check the mapping the way
//! the paper's clinicians did. Written as JSON and as a readable summary.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::SourceError;

/// The checks every source makes of a row before mapping it: the record is readable, its image id is present and
/// new, its patient id present. A row that fails is rejected in the audit with the file, line and reason.
pub struct RowChecks {
    table: std::path::PathBuf,
    /// The image id's and the patient id's (header name, position).
    image: (&'static str, usize),
    patient: (&'static str, usize),
    first_line: std::collections::HashMap<String, u64>,
}

/// A readable row whose ids passed [`RowChecks`].
pub struct Row {
    record: csv::StringRecord,
    pub line: u64,
}

impl Row {
    /// Column `i`, trimmed (empty when the row is short).
    pub fn field(&self, i: usize) -> &str {
        self.record.get(i).unwrap_or_default().trim()
    }
}

impl RowChecks {
    pub fn new(table: &Path, image: (&'static str, usize), patient: (&'static str, usize)) -> Self {
        Self {
            table: table.to_path_buf(),
            image,
            patient,
            first_line: Default::default(),
        }
    }

    /// The next record as a row to map, or `None` when it is rejected (unreadable, or ids that cannot be used). A
    /// row accepted is the one the audit's next notes are about.
    pub fn accept(
        &mut self,
        audit: &mut Audit,
        record: Result<csv::StringRecord, csv::Error>,
    ) -> Option<Row> {
        audit.rows.read += 1;
        let row = match record {
            Ok(record) => Row {
                line: record.position().map_or(0, |p| p.line()),
                record,
            },
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                audit.reject(&self.table, line, "", "unreadable row", e.to_string());
                return None;
            }
        };
        let usable = self.ids(
            audit,
            row.line,
            row.field(self.image.1),
            row.field(self.patient.1),
        );
        usable.then_some(row)
    }

    /// Whether the row's ids can be used (else it is rejected).
    fn ids(&mut self, audit: &mut Audit, line: u64, image: &str, patient: &str) -> bool {
        let reject = |audit: &mut Audit, id: &str, kind: String, reason: String| {
            audit.reject(&self.table, line, id, &kind, reason);
            false
        };
        let (image_column, patient_column) = (self.image.0, self.patient.0);
        if image.is_empty() {
            let kind = format!("empty {image_column}");
            return reject(audit, "", kind.clone(), kind);
        }
        if let Some(first) = self.first_line.get(image) {
            let reason = format!("{image_column} `{image}` is also on line {first}");
            return reject(audit, image, format!("duplicate {image_column}"), reason);
        }
        self.first_line.insert(image.to_string(), line);
        if patient.is_empty() {
            let kind = format!("empty {patient_column}");
            return reject(audit, image, kind.clone(), kind);
        }
        audit.at(&self.table, line, image);
        true
    }
}

/// The entry of `key`, created empty the first time: a key is allocated once, not on every count (harmonising
/// counts a dozen values a row).
fn slot<'a, V: Default>(map: &'a mut BTreeMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// Rejections kept in full in the report; the counts are always complete.
const KEPT_REJECTIONS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Serialize)]
/// A row named by its file, line (0 where the input is JSON) and id, and what about it.
pub struct RowIssue {
    pub file: String,
    pub line: u64,
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RowCounts {
    pub read: u64,
    pub written: u64,
    pub rejected: u64,
}

/// Labels of the source: how many images each mapped label touched, and labels outside the map.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LabelCounts {
    pub touched: BTreeMap<String, u64>,
    /// Not in the vocabulary (a typo in the source, or a label the map should learn).
    pub unknown: BTreeMap<String, u64>,
    /// In the vocabulary but mapped to no finding.
    pub unmapped: BTreeMap<String, u64>,
    /// Images without readable labels (unparseable or empty: their findings are missing).
    pub unparsed_rows: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Audit {
    pub source: String,
    pub inputs: Vec<String>,
    pub label_map: String,
    pub rows: RowCounts,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub rejections: Vec<RowIssue>,
    /// Rows written with a value that could not be used (an unparsed age or date, an age out of range, a label
    /// outside the map): how many of each kind, and the first of them with their file and line.
    pub noted_by_kind: BTreeMap<String, u64>,
    pub notes: Vec<RowIssue>,
    /// The row being mapped, that notes name.
    #[serde(skip)]
    at: Option<(String, u64, String)>,
    /// Raw column -> raw value -> mapped value ("" = missing) -> rows.
    pub values: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
    pub labels: LabelCounts,
}

impl Audit {
    pub fn new(source: &str) -> Self {
        Self {
            source: source.into(),
            ..Self::default()
        }
    }

    /// Records what a raw value of `column` became (`None`: missing) and returns it.
    pub fn mapped<'a>(
        &mut self,
        column: &str,
        raw: &str,
        value: Option<&'a str>,
    ) -> Option<&'a str> {
        self.value(column, raw, value.unwrap_or_default());
        value
    }

    /// The row the next notes are about.
    pub fn at(&mut self, file: &Path, line: u64, id: &str) {
        self.at = Some((file.display().to_string(), line, id.to_string()));
    }

    /// A value of the current row ([`Audit::at`]) that could not be used; the row is still written.
    pub fn note(&mut self, kind: &str, text: String) {
        *slot(&mut self.noted_by_kind, kind) += 1;
        if self.notes.len() < KEPT_REJECTIONS {
            let (file, line, id) = self.at.clone().unwrap_or_default();
            self.notes.push(RowIssue {
                file,
                line,
                id,
                reason: format!("{kind}: {text}"),
            });
        }
    }

    /// An age as a source read it from `raw`: `parsed` is the years, `Ok(None)` for an empty cell, or why it is
    /// not an age. Kept when plausible; an unparsed or implausible age is noted with its row; counted raw -> kept.
    pub fn age(
        &mut self,
        column: &str,
        raw: &str,
        parsed: Result<Option<f64>, String>,
        opts: &crate::SourceOptions,
    ) -> Option<f64> {
        let kept = match parsed {
            Ok(Some(a)) => {
                let kept = opts.plausible(a);
                if kept.is_none() {
                    let range = format!("{}..={}", opts.age_min, opts.age_max);
                    self.note(
                        "age out of range",
                        format!("{column} `{raw}` is {a} years, not in {range}"),
                    );
                }
                kept
            }
            Ok(None) => None,
            Err(why) => {
                self.note("age not understood", format!("{column} `{raw}`: {why}"));
                None
            }
        };
        self.value(
            column,
            raw,
            &kept.map_or_else(String::new, |a| format!("{a}")),
        );
        kept
    }

    /// One raw value of `column` and what it became.
    pub fn value(&mut self, column: &str, raw: &str, mapped: &str) {
        *slot(slot(slot(&mut self.values, column), raw), mapped) += 1;
    }

    /// A row that could not be used. `reason_kind` groups the counts ("duplicate image id"); `reason` is the full
    /// text of this one.
    pub fn reject(&mut self, file: &Path, line: u64, id: &str, reason_kind: &str, reason: String) {
        self.rows.rejected += 1;
        *self
            .rejected_by_reason
            .entry(reason_kind.into())
            .or_default() += 1;
        if self.rejections.len() < KEPT_REJECTIONS {
            self.rejections.push(RowIssue {
                file: file.display().to_string(),
                line,
                id: id.into(),
                reason,
            });
        }
    }

    /// One image's findings from its labels through `map`, its labels counted.
    pub fn findings(
        &mut self,
        map: &crate::labelmap::LabelMap,
        labels: &[String],
    ) -> [crate::output::Finding; 14] {
        let applied = map.apply(labels);
        self.labels_of(map, labels, &applied);
        applied.findings
    }

    /// Like [`Audit::findings`] for an image known to be labelled, even with no label present.
    pub fn findings_labelled(
        &mut self,
        map: &crate::labelmap::LabelMap,
        labels: &[String],
    ) -> [crate::output::Finding; 14] {
        let applied = map.apply_labelled(labels);
        self.labels_of(map, labels, &applied);
        applied.findings
    }

    /// A row harmonised: added to `rows` and counted.
    pub fn written(
        &mut self,
        rows: &mut Vec<crate::output::HarmonisedRow>,
        row: crate::output::HarmonisedRow,
    ) {
        rows.push(row);
        self.rows.written += 1;
    }

    /// Counts one image's labels: those that set a finding, those outside the map, those mapped to nothing.
    fn labels_of(
        &mut self,
        map: &crate::labelmap::LabelMap,
        labels: &[String],
        applied: &crate::labelmap::Applied,
    ) {
        if applied
            .findings
            .iter()
            .all(|f| *f == crate::output::Finding::Missing)
        {
            self.labels.unparsed_rows += 1;
        }
        for label in labels {
            if !map.targets(label).is_empty() {
                *self
                    .labels
                    .touched
                    .entry(label.trim().to_string())
                    .or_default() += 1;
            }
        }
        for label in &applied.unknown {
            *self.labels.unknown.entry(label.clone()).or_default() += 1;
            self.note("label not in the map", format!("`{label}`"));
        }
        for label in &applied.unmapped {
            *self.labels.unmapped.entry(label.clone()).or_default() += 1;
        }
    }

    /// The readable summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{}: {} rows read, {} written, {} rejected (label map {})\n",
            self.source, self.rows.read, self.rows.written, self.rows.rejected, self.label_map
        );
        for (reason, n) in &self.rejected_by_reason {
            s.push_str(&format!("  rejected, {reason}: {n}\n"));
        }
        for r in self.rejections.iter().take(10) {
            s.push_str(&format!(
                "    {} line {} ({}): {}\n",
                r.file, r.line, r.id, r.reason
            ));
        }
        for (kind, n) in &self.noted_by_kind {
            s.push_str(&format!("  written with a note, {kind}: {n}\n"));
        }
        for r in self.notes.iter().take(10) {
            s.push_str(&format!(
                "    {} line {} ({}): {}\n",
                r.file, r.line, r.id, r.reason
            ));
        }
        for (column, raws) in &self.values {
            s.push_str(&format!("  {column}:\n"));
            for (raw, mapped) in raws {
                for (to, n) in mapped {
                    let shown = |v: &str| {
                        if v.is_empty() {
                            "(missing)".to_string()
                        } else {
                            format!("`{v}`")
                        }
                    };
                    s.push_str(&format!("    {} -> {}: {n}\n", shown(raw), shown(to)));
                }
            }
        }
        let l = &self.labels;
        let list = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !l.touched.is_empty() {
            s.push_str(&format!(
                "  labels that set findings: {}\n",
                list(&l.touched)
            ));
        }
        if !l.unmapped.is_empty() {
            s.push_str(&format!(
                "  labels mapped to no finding: {}\n",
                list(&l.unmapped)
            ));
        }
        if !l.unknown.is_empty() {
            s.push_str(&format!(
                "  labels not in the map's vocabulary: {}\n",
                list(&l.unknown)
            ));
        }
        if l.unparsed_rows > 0 {
            s.push_str(&format!(
                "  rows whose labels could not be read: {}\n",
                l.unparsed_rows
            ));
        }
        s
    }

    /// Writes `<table>.report.json` and `<table>.report.txt` beside the table; returns their paths.
    pub fn write_beside(
        &self,
        table: &Path,
    ) -> Result<(std::path::PathBuf, std::path::PathBuf), SourceError> {
        let json = table.with_extension("report.json");
        let txt = table.with_extension("report.txt");
        let write = |path: &Path, bytes: Vec<u8>| {
            std::fs::write(path, bytes).map_err(|source| SourceError::Write {
                path: path.to_path_buf(),
                source,
            })
        };
        write(
            &json,
            serde_json::to_vec_pretty(self).expect("the report serialises"),
        )?;
        write(&txt, self.summary().into_bytes())?;
        Ok((json, txt))
    }
}

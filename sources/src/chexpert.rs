//! The CheXpert label convention that MIMIC-CXR, CheXpert-Plus, ReXGradient-160K and BRAX share: 14 columns named
//! as CheXpert names them (`Pleural Effusion`), cells `1`, `0`, `-1` (uncertain) or blank (also `1.0`...), and label
//! tables joined to images by a key (MIMIC's study, CheXpert-Plus's image, ReXGradient's study).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;

use radit_sharding::schema::FINDINGS;

use crate::SourceError;
use crate::audit::Audit;
use crate::output::Finding;
use crate::parse::CsvTable;

/// A CheXpert label cell: `1`, `0`, `-1` (also `1.0`...), blank; anything else is `None`.
pub(crate) fn finding(cell: &str) -> Option<Finding> {
    match cell.trim() {
        "" => Some(Finding::Missing),
        "1" | "1.0" => Some(Finding::Positive),
        "0" | "0.0" => Some(Finding::Negative),
        "-1" | "-1.0" => Some(Finding::Uncertain),
        _ => None,
    }
}

/// The CheXpert column names of the schema's findings, in schema order: `pleural_effusion` -> `Pleural Effusion`.
pub(crate) fn chexpert_names() -> Vec<String> {
    let word = |w: &str| {
        let mut c = w.chars();
        c.next().map_or_else(String::new, |f| {
            f.to_ascii_uppercase().to_string() + c.as_str()
        })
    };
    FINDINGS
        .iter()
        .map(|f| f.split('_').map(word).collect::<Vec<_>>().join(" "))
        .collect()
}

/// One image's findings from its 14 raw cells (schema order), each counted; a cell outside the convention is missing.
pub(crate) fn findings_of(audit: &mut Audit, names: &[String], cells: &[String]) -> [Finding; 14] {
    let mut findings = [Finding::Missing; 14];
    for ((slot, name), cell) in findings.iter_mut().zip(names).zip(cells) {
        *slot = finding(cell).unwrap_or(Finding::Missing);
        audit.value(name, cell.trim(), slot.as_str());
    }
    findings
}

/// CheXpert-convention labels by key (for a CSV, its key columns joined with `/`): the first row per key, and which
/// keys were used. Counted under `label row` in the audit.
pub(crate) struct LabelTable {
    rows: HashMap<String, (Vec<String>, bool)>,
    /// What a key names (`study`, `image`), for the audit.
    unit: &'static str,
}

impl LabelTable {
    pub(crate) fn new(unit: &'static str) -> Self {
        Self {
            rows: HashMap::new(),
            unit,
        }
    }

    /// Adds a row of 14 cells (schema order) unless its key has one already (then counted).
    pub(crate) fn insert(&mut self, key: String, cells: Vec<String>, audit: &mut Audit) {
        match self.rows.entry(key) {
            Entry::Occupied(_) => audit.value("label row", "duplicate (first kept)", ""),
            Entry::Vacant(v) => {
                v.insert((cells, false));
            }
        }
    }

    /// A CSV of `keys` + the CheXpert `names`.
    pub(crate) fn read(
        path: &Path,
        keys: &[&str],
        names: &[String],
        unit: &'static str,
        audit: &mut Audit,
    ) -> Result<Self, SourceError> {
        let mut columns: Vec<&str> = keys.to_vec();
        columns.extend(names.iter().map(String::as_str));
        let mut csv = CsvTable::open(path, &columns)?;
        let mut table = Self::new(unit);
        for record in csv.reader.records() {
            let record = record.map_err(|e| invalid_record(path, e))?;
            let field = |i: usize| record.get(i).unwrap_or_default().trim().to_string();
            let key: Vec<String> = csv.columns[..keys.len()]
                .iter()
                .map(|&i| field(i))
                .collect();
            let cells = csv.columns[keys.len()..]
                .iter()
                .map(|&i| field(i))
                .collect();
            table.insert(key.join("/"), cells, audit);
        }
        Ok(table)
    }

    /// The findings of the row for `key` (all missing when there is none), counted.
    pub(crate) fn findings(
        &mut self,
        key: &str,
        names: &[String],
        audit: &mut Audit,
    ) -> [Finding; 14] {
        match self.rows.get_mut(key) {
            Some((cells, used)) => {
                *used = true;
                audit.value("label row", "found", "used");
                findings_of(audit, names, cells)
            }
            None => {
                audit.value("label row", &format!("none for the {}", self.unit), "");
                [Finding::Missing; 14]
            }
        }
    }

    /// Counts the rows no image used.
    pub(crate) fn count_unused(&self, audit: &mut Audit) {
        for _ in self.rows.values().filter(|(_, used)| !used) {
            audit.value("label row", &format!("for no {} (unused)", self.unit), "");
        }
    }
}

/// A side table's unreadable record: an error naming the file and line.
pub(crate) fn invalid_record(path: &Path, e: csv::Error) -> SourceError {
    SourceError::InvalidInput {
        path: path.to_path_buf(),
        line: e.position().map_or(0, |p| p.line()),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chexpert_column_names() {
        let names = chexpert_names();
        assert_eq!(names[0], "Atelectasis");
        assert_eq!(names[4], "Enlarged Cardiomediastinum");
        assert_eq!(names[9], "Pleural Effusion");
        assert_eq!(names[13], "Support Devices");
    }

    #[test]
    fn cells_of_the_convention() {
        assert_eq!(finding("-1.0"), Some(Finding::Uncertain));
        assert_eq!(finding(" 1 "), Some(Finding::Positive));
        assert_eq!(finding(""), Some(Finding::Missing));
        assert_eq!(finding("2"), None);
    }
}

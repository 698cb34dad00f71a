//! Parsers every source shares: DICOM-style age strings, tables that may be gzipped.

use std::io::Read;
use std::path::Path;

use crate::SourceError;

/// An age in years from `45`, `45.5`, or a DICOM Age String `045Y`, `006M`, `010W`, `003D`; `Ok(None)` for an
/// empty cell, `Err` (the text) for anything else.
pub fn age_years(text: &str) -> Result<Option<f64>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let (number, per_year) = match t.as_bytes()[t.len() - 1].to_ascii_uppercase() {
        b'Y' => (&t[..t.len() - 1], 1.0),
        b'M' => (&t[..t.len() - 1], 12.0),
        b'W' => (&t[..t.len() - 1], 365.25 / 7.0),
        b'D' => (&t[..t.len() - 1], 365.25),
        _ => (t, 1.0),
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(Some(v / per_year)),
        _ => Err(t.to_string()),
    }
}

/// The bytes of a table file, gunzipped when its name ends in `.gz`.
pub fn read_table_bytes(path: &Path) -> Result<Vec<u8>, SourceError> {
    let err = |source: std::io::Error| SourceError::ReadInput {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(err)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(err)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The table `explicit` names, else the first of `candidates` that exists under `root`.
pub fn locate_table(
    root: &Path,
    explicit: Option<&Path>,
    candidates: &[&str],
) -> Result<std::path::PathBuf, SourceError> {
    match explicit {
        Some(t) => Ok(t.to_path_buf()),
        None => candidates
            .iter()
            .map(|t| root.join(t))
            .find(|p| p.is_file())
            .ok_or_else(|| SourceError::NoTable {
                root: root.to_path_buf(),
                candidates: candidates.iter().map(|t| t.to_string()).collect(),
            }),
    }
}

/// A CSV table's reader and the positions of the columns asked for, by exact (trimmed) header name.
pub struct CsvTable {
    pub reader: csv::Reader<std::io::Cursor<Vec<u8>>>,
    pub columns: Vec<usize>,
}

impl CsvTable {
    /// Opens `path` (gzipped or not) and finds `names` in its header; a missing one is an error naming it and the
    /// columns that are there.
    pub fn open(path: &Path, names: &[&str]) -> Result<Self, SourceError> {
        let bytes = read_table_bytes(path)?;
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(std::io::Cursor::new(bytes));
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| SourceError::InvalidInput {
                path: path.to_path_buf(),
                line: 1,
                reason: e.to_string(),
            })?
            .iter()
            .map(|h| h.trim().trim_start_matches('\u{feff}').to_string())
            .collect();
        let columns = names
            .iter()
            .map(|name| {
                header
                    .iter()
                    .position(|h| h == name)
                    .ok_or_else(|| SourceError::MissingColumn {
                        path: path.to_path_buf(),
                        column: name.to_string(),
                        found: header.join(", "),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { reader, columns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_in_years_and_dicom_age_strings() {
        assert_eq!(age_years("58"), Ok(Some(58.0)));
        assert_eq!(age_years(" 045Y "), Ok(Some(45.0)));
        assert_eq!(age_years("006M"), Ok(Some(0.5)));
        let days = age_years("003D").unwrap().unwrap();
        assert!((days - 3.0 / 365.25).abs() < 1e-12);
        let weeks = age_years("052W").unwrap().unwrap();
        assert!((weeks - 52.0 * 7.0 / 365.25).abs() < 1e-12);
        assert_eq!(age_years(""), Ok(None));
        assert_eq!(age_years("abc"), Err("abc".into()));
        assert_eq!(age_years("-3"), Err("-3".into()));
    }

    #[test]
    fn gzipped_tables_read_like_plain_ones() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("t.csv.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b"a,b\n1,2\n").unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        assert_eq!(read_table_bytes(&gz).unwrap(), b"a,b\n1,2\n");
        let e = read_table_bytes(&dir.path().join("missing.csv")).unwrap_err();
        assert!(e.to_string().contains("missing.csv"), "{e}");
    }
}

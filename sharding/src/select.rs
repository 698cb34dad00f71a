//! Reference sets (`radit data select`): lists of image ids that the fidelity tables are computed on, and the
//! id lists that `generate --ids` and `eval features --ids` read.
//!
//! An id list is a text file, one `image_id` per line; blank lines and lines starting with `#` (the selection
//! that made it) are ignored.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;

use rayon::prelude::*;

use crate::error::ShardError;
use crate::reader::StoreReader;
use crate::schema::{DATASET_CLASSES, DATASET_INDEX, NUM_LABELS};
use crate::split::{Split, SplitScope, id_key};

/// The dataset name of CheXGenBench's images, the prefix of their CXR7-1M ids (`MIMIC-CXR:<dicom_id>`).
pub const CHEXGENBENCH_DATASET: &str = "MIMIC-CXR";

/// A seeded subset of a split: `count` rows of the given datasets (all when empty).
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub split: Split,
    /// Dataset class ids (1..=7, see [`DATASET_CLASSES`]); empty: every dataset.
    pub datasets: Vec<u8>,
    pub count: u64,
    pub seed: u64,
}

/// The class id of a dataset name, as the table spells it (case-insensitive).
pub fn dataset_class(name: &str) -> Result<u8, String> {
    DATASET_CLASSES
        .iter()
        .skip(1)
        .position(|d| d.eq_ignore_ascii_case(name.trim()))
        .map(|i| i as u8 + 1)
        .ok_or_else(|| {
            format!(
                "dataset '{name}' is not one of {}",
                DATASET_CLASSES[1..].join(", ")
            )
        })
}

/// Image ids and dataset classes of every row of `split`, in store order (metadata objects only, read in
/// parallel: an object store answers many small reads at once).
fn split_ids(reader: &StoreReader, split: Split) -> Result<Vec<(String, u8)>, ShardError> {
    let shards: Vec<_> = (0..reader.shards(split))
        .into_par_iter()
        .map(|k| reader.read_metadata_of(split, k))
        .collect::<Result<_, _>>()?;
    Ok(shards
        .into_iter()
        .flat_map(|s| {
            let datasets: Vec<u8> = s
                .labels
                .chunks(NUM_LABELS)
                .map(|l| l[DATASET_INDEX])
                .collect();
            s.image_ids.into_iter().zip(datasets)
        })
        .collect())
}

/// The ids of `sel`, in store order: the rows of its datasets ordered by a seeded key of their id, the first
/// `count` of them. The same store, split, datasets and seed give the same ids on every machine; a larger
/// count gives a superset.
pub fn select(reader: &StoreReader, sel: &Selection) -> Result<Vec<String>, SelectError> {
    let rows = split_ids(reader, sel.split)?;
    let mut eligible: Vec<(u64, usize)> = rows
        .iter()
        .enumerate()
        .filter(|(_, (_, d))| sel.datasets.is_empty() || sel.datasets.contains(d))
        .map(|(i, (id, _))| (id_key(sel.seed, id), i))
        .collect();
    if (eligible.len() as u64) < sel.count {
        let datasets: Vec<&str> = sel
            .datasets
            .iter()
            .map(|d| DATASET_CLASSES[usize::from(*d)])
            .collect();
        return Err(SelectError::TooFew(format!(
            "the {} split of {} has {} rows{} and {} were asked for: lower --count to at most {}",
            sel.split,
            reader.describe(),
            eligible.len(),
            if datasets.is_empty() {
                String::new()
            } else {
                format!(" of {}", datasets.join(", "))
            },
            sel.count,
            eligible.len()
        )));
    }
    eligible.sort_unstable();
    let mut chosen: Vec<usize> = eligible[..sel.count as usize]
        .iter()
        .map(|(_, i)| *i)
        .collect();
    chosen.sort_unstable();
    Ok(chosen.into_iter().map(|i| rows[i].0.clone()).collect())
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Store(#[from] ShardError),
    /// The request cannot be met; the text says how to change it.
    #[error("{0}")]
    TooFew(String),
    /// An input file is malformed; the text names it.
    #[error("{0}")]
    BadInput(String),
}

/// Reads an id list (see the module note), keeping the first of repeated ids.
pub fn read_id_list(path: &Path) -> Result<Vec<String>, SelectError> {
    let text = std::fs::read_to_string(path).map_err(|source| ShardError::ReadInput {
        path: path.to_path_buf(),
        source,
    })?;
    let mut seen = BTreeSet::new();
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| seen.insert(l.to_string()))
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return Err(SelectError::BadInput(format!(
            "{}: no image ids (one per line; lines starting with # are comments)",
            path.display()
        )));
    }
    Ok(ids)
}

/// Writes an id list with `header` lines (the selection) as comments.
pub fn write_id_list(path: &Path, header: &[String], ids: &[String]) -> std::io::Result<()> {
    let mut text = String::new();
    for h in header {
        text.push_str(&format!("# {h}\n"));
    }
    for id in ids {
        text.push_str(id);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// CheXGenBench's test CSV (`LLAVARAD_ANNOTATIONS_TEST.csv`: a `path` column of MIMIC-CXR-JPG files,
/// `files/p1x/p<subject>/s<study>/<dicom_id>.jpg`) as CXR7-1M ids: `MIMIC-CXR:<dicom_id>`, in the CSV's order.
pub fn chexgenbench_ids(csv_path: &Path, column: &str) -> Result<Vec<String>, SelectError> {
    let bad = |reason: String| SelectError::BadInput(format!("{}: {reason}", csv_path.display()));
    let mut reader = csv::Reader::from_path(csv_path).map_err(|e| match e.kind() {
        csv::ErrorKind::Io(_) => bad(format!("cannot read it: {e}")),
        _ => bad(e.to_string()),
    })?;
    let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let col = headers
        .iter()
        .position(|h| h.trim() == column)
        .ok_or_else(|| {
            bad(format!(
                "has no '{column}' column (columns: {}); give the image column with --column",
                headers.iter().collect::<Vec<_>>().join(", ")
            ))
        })?;
    let mut seen = BTreeSet::new();
    let mut ids = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        // A prompt may span lines: the record's own line, not a count of records.
        let line = record.position().map_or(i as u64 + 2, |p| p.line());
        let cell = record.get(col).unwrap_or("").trim();
        let stem = Path::new(cell)
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad(format!("line {line}: '{cell}' is not an image path")))?;
        let id = format!("{CHEXGENBENCH_DATASET}:{stem}");
        if seen.insert(id.clone()) {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        return Err(bad("has no data rows".into()));
    }
    Ok(ids)
}

/// Where the given ids are in the store: per split, the found ids in store order; the shards that hold them (what a
/// reader of just those rows reads); and the ids no split has.
pub struct Located {
    pub found: BTreeMap<Split, Vec<String>>,
    pub shards: Vec<(Split, u64)>,
    pub missing: Vec<String>,
}

/// Looks `ids` up in the splits of `scope`: each shard's image ids (one small object each), read in parallel.
pub fn locate(
    reader: &StoreReader,
    scope: SplitScope,
    ids: &[String],
) -> Result<Located, ShardError> {
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let all: Vec<(Split, u64)> = scope
        .splits()
        .into_iter()
        .flat_map(|s| (0..reader.shards(s)).map(move |k| (s, k)))
        .collect();
    let per_shard: Vec<Vec<String>> = all
        .par_iter()
        .map(|&(split, k)| {
            Ok(reader
                .read_image_ids(split, k)?
                .into_iter()
                .filter(|id| wanted.contains(id.as_str()))
                .collect())
        })
        .collect::<Result<_, ShardError>>()?;
    let mut found: BTreeMap<Split, Vec<String>> = BTreeMap::new();
    let mut shards = Vec::new();
    for (&(split, k), here) in all.iter().zip(per_shard) {
        if !here.is_empty() {
            shards.push((split, k));
            found.entry(split).or_default().extend(here);
        }
    }
    let seen: BTreeSet<&str> = found.values().flatten().map(String::as_str).collect();
    let missing = ids
        .iter()
        .filter(|i| !seen.contains(i.as_str()))
        .cloned()
        .collect();
    Ok(Located {
        found,
        shards,
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chexgenbench_paths_become_mimic_ids_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("LLAVARAD_ANNOTATIONS_TEST.csv");
        std::fs::write(
            &csv,
            "path,annotated_prompt\n\
             files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg,\"a, b\"\n\
             files/p11/p11000011/s51000001/ffee.jpg,c\n\
             files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg,dup\n",
        )
        .unwrap();
        assert_eq!(
            chexgenbench_ids(&csv, "path").unwrap(),
            ["MIMIC-CXR:02aa804e-bde0afdd", "MIMIC-CXR:ffee"]
        );
        let err = chexgenbench_ids(&csv, "image").unwrap_err().to_string();
        assert!(
            err.contains("LLAVARAD_ANNOTATIONS_TEST.csv") && err.contains("--column"),
            "{err}"
        );
        std::fs::write(&csv, "path\n\"\"\n").unwrap();
        let err = chexgenbench_ids(&csv, "path").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn id_lists_skip_comments_and_repeats_and_an_empty_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.txt");
        write_id_list(&path, &["made by a test".into()], &["a".into(), "b".into()]).unwrap();
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap() + "\na\n").unwrap();
        assert_eq!(read_id_list(&path).unwrap(), ["a", "b"]);
        std::fs::write(&path, "# only a comment\n").unwrap();
        assert!(
            read_id_list(&path)
                .unwrap_err()
                .to_string()
                .contains("ids.txt")
        );
        assert_eq!(dataset_class("mimic-cxr").unwrap(), 1);
        assert!(dataset_class("MIMIC").unwrap_err().contains("BRAX"));
    }
}

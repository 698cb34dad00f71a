//! `radit data stats` and `radit data select`: what a store holds, and the reference sets the fidelity tables
//! are computed on.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use radit_sharding::reader::StoreReader;
use radit_sharding::select::{self, SelectError, Selection};
use radit_sharding::split::{Split, SplitScope};
use radit_sharding::stats;
use radit_sharding::store::Storage;

use crate::exit;

#[derive(Args)]
pub struct StatsArgs {
    /// The store (path, file:// or s3:// URL).
    store: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write one CSV row per (split, dataset) here: counts only, so that the file sums.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Also draw the composition figure (per dataset: images by split, sex, view, race, age; findings) here.
    #[arg(long)]
    png: Option<PathBuf>,
}

#[derive(Args)]
pub struct SelectArgs {
    /// The store (path, file:// or s3:// URL).
    store: String,
    /// The split to draw from (a seeded subset), or, with --chexgenbench, where to look (default: any split).
    #[arg(long)]
    split: Option<SplitScope>,
    /// Only rows of these datasets (comma-separated, as the table spells them: MIMIC-CXR, NIH-CXR14, ...).
    #[arg(long, value_delimiter = ',')]
    dataset: Vec<String>,
    /// How many rows: the first COUNT of the eligible rows in a seeded order (a larger count gives a superset).
    #[arg(long, required_unless_present = "chexgenbench")]
    count: Option<u64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Instead of a seeded subset: CheXGenBench's test CSV (LLAVARAD_ANNOTATIONS_TEST.csv), its MIMIC-CXR images
    /// mapped to this store's ids by their dicom_id, wherever they are (CheXGenBench's test images are in any of
    /// CXR7-1M's splits).
    #[arg(long, conflicts_with_all = ["count", "dataset"])]
    chexgenbench: Option<PathBuf>,
    /// The image column of the CheXGenBench CSV.
    #[arg(long, default_value = "path", requires = "chexgenbench")]
    column: String,
    /// The id list to write (one image_id per line, the selection as # comments).
    #[arg(long)]
    out: PathBuf,
}

fn open(url: &str) -> anyhow::Result<StoreReader> {
    StoreReader::open(Storage::open_existing(url)?).with_context(|| format!("opening {url}"))
}

fn select_error(e: SelectError) -> anyhow::Error {
    match e {
        SelectError::Store(s) => s.into(),
        other => exit::usage!("{other}"),
    }
}

pub fn run_stats(a: StatsArgs) -> anyhow::Result<u8> {
    let reader = open(&a.store)?;
    let report = stats::compute(&reader)?;
    print!("{}", report.table());
    let write = |path: &PathBuf, bytes: &[u8]| -> anyhow::Result<()> {
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
        Ok(())
    };
    if let Some(path) = &a.json {
        write(path, &serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(path) = &a.csv {
        write(path, report.csv().as_bytes())?;
    }
    if let Some(path) = &a.png {
        write(path, &stats::composition_png(&report))?;
    }
    Ok(0)
}

pub fn run_select(a: SelectArgs) -> anyhow::Result<u8> {
    let reader = open(&a.store)?;
    let mut header = vec![format!("radit data select, store {}", a.store)];
    let ids = match &a.chexgenbench {
        Some(csv) => {
            let scope = a.split.unwrap_or(SplitScope::Any);
            let wanted = select::chexgenbench_ids(csv, &a.column).map_err(select_error)?;
            let located = select::locate(&reader, scope, &wanted)?;
            let per_split: Vec<String> = located
                .found
                .iter()
                .map(|(s, ids)| format!("{} in {s}", ids.len()))
                .collect();
            header.push(format!(
                "CheXGenBench {}: {} rows, {} found ({}), {} not in the store",
                csv.display(),
                wanted.len(),
                wanted.len() - located.missing.len(),
                per_split.join(", "),
                located.missing.len()
            ));
            if !located.missing.is_empty() {
                let first: Vec<&str> = located.missing.iter().take(5).map(String::as_str).collect();
                eprintln!(
                    "warning: {} of CheXGenBench's {} images are not in the {scope} split(s) of {} (first: {}); \
                     the reference set is the rest",
                    located.missing.len(),
                    wanted.len(),
                    a.store,
                    first.join(", ")
                );
            }
            let ids: Vec<String> = located.found.into_values().flatten().collect();
            exit::ensure_usage!(
                !ids.is_empty(),
                "none of the images of {} are in {}: is this the store of CXR7-1M with MIMIC-CXR in it?",
                csv.display(),
                a.store
            );
            ids
        }
        None => {
            let split = match a.split {
                Some(SplitScope::One(s)) => s,
                Some(SplitScope::Any) => exit::bail_usage!(
                    "--split any is for --chexgenbench; a seeded subset is drawn from one split"
                ),
                None => Split::Test,
            };
            let datasets = a
                .dataset
                .iter()
                .map(|d| select::dataset_class(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| exit::usage!("--dataset: {e}"))?;
            let count = a.count.unwrap_or(0);
            exit::ensure_usage!(count > 0, "--count must be positive");
            let sel = Selection {
                split,
                datasets,
                count,
                seed: a.seed,
            };
            header.push(format!(
                "split {split}, datasets {}, count {count}, seed {}",
                if a.dataset.is_empty() {
                    "all".to_string()
                } else {
                    a.dataset.join(",")
                },
                a.seed
            ));
            select::select(&reader, &sel).map_err(select_error)?
        }
    };
    select::write_id_list(&a.out, &header, &ids)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!("{} ids -> {}", ids.len(), a.out.display());
    Ok(0)
}

//! `radit data stats`: what a store holds, per split and dataset, as the paper describes CXR7-1M (its Appendix A
//! and Figure 1): patients, images, views, sex, race, age (mean, sd, missing) and positive / negative / missing
//! counts per finding. Read from the store's metadata objects (never the images), in parallel.

mod figure;

use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use crate::error::ShardError;
use crate::reader::StoreReader;
use crate::schema::{
    DATASET_CLASSES, DATASET_INDEX, FINDINGS, NUM_LABELS, RACE_CLASSES, RACE_INDEX, SEX_CLASSES,
    SEX_INDEX, VIEW_CLASSES, VIEW_INDEX,
};
use crate::split::Split;

pub use figure::composition_png;

/// The name of a total over splits or datasets.
pub const ALL: &str = "all";

/// One row of the report: a split (or all) and a dataset (or all).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupStats {
    pub split: String,
    pub dataset: String,
    pub patients: u64,
    pub images: u64,
    /// Images per view class (`missing` included), in the schema's order.
    pub view: Vec<ClassCount>,
    pub sex: Vec<ClassCount>,
    pub race: Vec<ClassCount>,
    pub age: AgeStats,
    /// Per finding, in the schema's order.
    pub findings: Vec<FindingCounts>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassCount {
    pub class: String,
    pub images: u64,
}

/// Age in years over the images that have one; the sample standard deviation (n - 1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgeStats {
    pub mean: Option<f64>,
    pub sd: Option<f64>,
    pub missing: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FindingCounts {
    pub finding: String,
    pub positive: u64,
    pub negative: u64,
    pub missing: u64,
}

/// The whole report: per split, each dataset present and the split's total; then each dataset over all splits,
/// and the store's total.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataStats {
    pub store: String,
    pub groups: Vec<GroupStats>,
}

/// Counts of one (split, dataset) cell, mergeable.
#[derive(Default, Clone)]
struct Cell {
    patients: HashSet<String>,
    images: u64,
    /// Per label column, images per class id (dataset ids run to 7).
    classes: Vec<[u64; 8]>,
    age_n: u64,
    age_sum: f64,
    age_sum_sq: f64,
    age_missing: u64,
}

impl Cell {
    fn merge(&mut self, other: &Cell) {
        self.patients.extend(other.patients.iter().cloned());
        self.images += other.images;
        if self.classes.is_empty() {
            self.classes = vec![[0; 8]; NUM_LABELS];
        }
        for (a, b) in self.classes.iter_mut().zip(&other.classes) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.age_n += other.age_n;
        self.age_sum += other.age_sum;
        self.age_sum_sq += other.age_sum_sq;
        self.age_missing += other.age_missing;
    }

    fn class_counts(&self, column: usize, names: &[&str]) -> Vec<ClassCount> {
        // "missing" (class 0) last: the present classes are what a reader looks for first.
        (1..names.len())
            .chain([0])
            .map(|c| ClassCount {
                class: names[c].to_string(),
                images: self.classes.get(column).map_or(0, |k| k[c]),
            })
            .collect()
    }

    fn group(&self, split: &str, dataset: &str) -> GroupStats {
        let n = self.age_n as f64;
        let mean = (self.age_n > 0).then(|| self.age_sum / n);
        let sd = (self.age_n > 1).then(|| {
            let m = self.age_sum / n;
            ((self.age_sum_sq - n * m * m) / (n - 1.0)).max(0.0).sqrt()
        });
        GroupStats {
            split: split.to_string(),
            dataset: dataset.to_string(),
            patients: self.patients.len() as u64,
            images: self.images,
            view: self.class_counts(VIEW_INDEX, &VIEW_CLASSES),
            sex: self.class_counts(SEX_INDEX, &SEX_CLASSES),
            race: self.class_counts(RACE_INDEX, &RACE_CLASSES),
            age: AgeStats {
                mean,
                sd,
                missing: self.age_missing,
            },
            findings: FINDINGS
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let k = self.classes.get(i).copied().unwrap_or_default();
                    FindingCounts {
                        finding: f.to_string(),
                        positive: k[2],
                        negative: k[1],
                        missing: k[0],
                    }
                })
                .collect(),
        }
    }
}

/// Counts every split of the store.
pub fn compute(reader: &StoreReader) -> Result<DataStats, ShardError> {
    let mut cells: BTreeMap<(Split, u8), Cell> = BTreeMap::new();
    for split in Split::ALL {
        let partial: Vec<HashMap<u8, Cell>> = (0..reader.shards(split))
            .into_par_iter()
            .map(|k| {
                let shard = reader.read_metadata_of(split, k)?;
                let mut here: HashMap<u8, Cell> = HashMap::new();
                for i in 0..shard.rows {
                    let labels = &shard.labels[i * NUM_LABELS..(i + 1) * NUM_LABELS];
                    let cell = here.entry(labels[DATASET_INDEX]).or_default();
                    if cell.classes.is_empty() {
                        cell.classes = vec![[0; 8]; NUM_LABELS];
                    }
                    cell.patients.insert(shard.patient_ids[i].clone());
                    cell.images += 1;
                    for (column, class) in labels.iter().enumerate() {
                        cell.classes[column][usize::from(*class).min(7)] += 1;
                    }
                    let age = shard.age[i];
                    if age.is_finite() {
                        let years = f64::from(age) * 100.0;
                        cell.age_n += 1;
                        cell.age_sum += years;
                        cell.age_sum_sq += years * years;
                    } else {
                        cell.age_missing += 1;
                    }
                }
                Ok(here)
            })
            .collect::<Result<_, ShardError>>()?;
        for here in partial {
            for (dataset, cell) in here {
                cells.entry((split, dataset)).or_default().merge(&cell);
            }
        }
    }
    let mut groups = Vec::new();
    let mut everything = Cell::default();
    let mut per_dataset: BTreeMap<u8, Cell> = BTreeMap::new();
    for split in Split::ALL {
        let mut total = Cell::default();
        for ((_, dataset), cell) in cells.range((split, 0)..=(split, u8::MAX)) {
            let name = DATASET_CLASSES
                .get(usize::from(*dataset))
                .copied()
                .unwrap_or("unknown");
            groups.push(cell.group(split.name(), name));
            total.merge(cell);
            per_dataset.entry(*dataset).or_default().merge(cell);
        }
        groups.push(total.group(split.name(), ALL));
        everything.merge(&total);
    }
    for (dataset, cell) in &per_dataset {
        let name = DATASET_CLASSES
            .get(usize::from(*dataset))
            .copied()
            .unwrap_or("unknown");
        groups.push(cell.group(ALL, name));
    }
    groups.push(everything.group(ALL, ALL));
    Ok(DataStats {
        store: reader.describe().to_string(),
        groups,
    })
}

fn age_text(a: &AgeStats) -> String {
    match (a.mean, a.sd) {
        (Some(m), Some(s)) => format!("{m:.1} ± {s:.1}"),
        (Some(m), None) => format!("{m:.1}"),
        _ => "-".into(),
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}", 100.0 * part as f64 / whole as f64)
    }
}

impl DataStats {
    /// Two tables for a terminal: the composition (views, sex and race as % of images, age), then each finding's
    /// positive share of the images where it is known.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<6} {:<17} {:>9} {:>10} {:>5} {:>5} {:>5} {:>5} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>13} {:>8}\n",
            "split",
            "dataset",
            "patients",
            "images",
            "AP%",
            "PA%",
            "Lat%",
            "v?%",
            "Male%",
            "Fem%",
            "s?%",
            "Asi%",
            "Blk%",
            "Wht%",
            "r?%",
            "age mean ± sd",
            "age?"
        );
        for g in &self.groups {
            let share = |counts: &[ClassCount]| -> Vec<String> {
                counts.iter().map(|c| percent(c.images, g.images)).collect()
            };
            let (v, s, r) = (share(&g.view), share(&g.sex), share(&g.race));
            out.push_str(&format!(
                "{:<6} {:<17} {:>9} {:>10} {:>5} {:>5} {:>5} {:>5} {:>6} {:>6} {:>5} {:>5} {:>5} {:>5} {:>5} {:>13} {:>8}\n",
                g.split,
                g.dataset,
                g.patients,
                g.images,
                v[0],
                v[1],
                v[2],
                v[3],
                s[0],
                s[1],
                s[2],
                r[0],
                r[1],
                r[2],
                r[3],
                age_text(&g.age),
                g.age.missing
            ));
        }
        out.push_str(
            "\npositive findings, % of the images where the finding is known (n known below)\n",
        );
        out.push_str(&format!("{:<6} {:<17}", "split", "dataset"));
        for f in FINDINGS {
            out.push_str(&format!(" {:>7}", short(f)));
        }
        out.push('\n');
        for g in &self.groups {
            out.push_str(&format!("{:<6} {:<17}", g.split, g.dataset));
            for f in &g.findings {
                out.push_str(&format!(
                    " {:>7}",
                    percent(f.positive, f.positive + f.negative)
                ));
            }
            out.push('\n');
            out.push_str(&format!("{:<6} {:<17}", "", "  n known"));
            for f in &g.findings {
                out.push_str(&format!(" {:>7}", f.positive + f.negative));
            }
            out.push('\n');
        }
        out
    }

    /// One CSV row per group: counts, never percentages, so the file sums.
    pub fn csv(&self) -> String {
        let mut header: Vec<String> = ["split", "dataset", "patients", "images"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let Some(first) = self.groups.first() else {
            return String::new();
        };
        for (name, counts) in [
            ("view", &first.view),
            ("sex", &first.sex),
            ("race", &first.race),
        ] {
            header.extend(counts.iter().map(|c| format!("{name}_{}", c.class)));
        }
        header.extend(["age_mean", "age_sd", "age_missing"].map(String::from));
        for f in &first.findings {
            for kind in ["positive", "negative", "missing"] {
                header.push(format!("{}_{kind}", f.finding));
            }
        }
        let mut out = header.join(",") + "\n";
        for g in &self.groups {
            let mut row = vec![
                g.split.clone(),
                g.dataset.clone(),
                g.patients.to_string(),
                g.images.to_string(),
            ];
            for counts in [&g.view, &g.sex, &g.race] {
                row.extend(counts.iter().map(|c| c.images.to_string()));
            }
            let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
            row.extend([opt(g.age.mean), opt(g.age.sd), g.age.missing.to_string()]);
            for f in &g.findings {
                row.extend([f.positive, f.negative, f.missing].map(|v| v.to_string()));
            }
            out.push_str(&(row.join(",") + "\n"));
        }
        out
    }
}

/// A finding's name shortened to a table column.
fn short(finding: &str) -> String {
    let words: Vec<&str> = finding.split('_').collect();
    if words.len() == 1 {
        finding.chars().take(7).collect()
    } else {
        words
            .iter()
            .map(|w| w.chars().take(3).collect::<String>())
            .collect::<Vec<_>>()
            .join("_")
            .chars()
            .take(7)
            .collect()
    }
}

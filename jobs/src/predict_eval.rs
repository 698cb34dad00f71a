//! `radit predictors eval`: a trained metadata predictor over images with known profiles, scored as the paper's
//! Table 15 and editing tables score it. The images are a store split's (against their recorded metadata), or
//! those a CSV lists with the profile they should show: `radit generate`'s `samples.csv` (the conditioning) or
//! `radit edit`'s `edits.csv` (the counterfactual profile). Per variable the ROC-AUC over the images whose value
//! is known (a finding or sex: the positive class's probability; race, view and dataset: the one-vs-rest macro
//! over the classes present), and age's MAE in years. Writes `predictions.csv` (per image, each class's
//! probability and the predicted age), `metrics.json`, optionally a row of a table, and optionally the attention
//! pooling's per-task embeddings (`embeddings.npy`, `[N, tasks x D]`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use radit_models::model::{ModelError, Precision};
use radit_models::network::Architecture;
use radit_models::predictor::{Predictor, Task};
use radit_sharding::ShardError;
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::Serialize;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::generate::from_level;
use crate::journal::{RankError, io_error, write_atomic};

/// A predictor file loaded with its backbone.
pub struct LoadedPredictor {
    _vs: VarStore,
    pub net: Predictor,
    pub weights: PathBuf,
}

/// Loads a predictor file (`radit predictors train`'s `best` or `radit export`'s); `backbone` replaces the
/// backbone path recorded in it (the snapshot moved, or another machine).
pub fn load_predictor(
    weights: &Path,
    backbone: Option<&Path>,
    device: Device,
    precision: Precision,
) -> Result<LoadedPredictor, RankError> {
    let mut cfg = match radit_models::model::read_weights_config(weights)? {
        Some(Architecture::Predictor(c)) => c,
        Some(other) => {
            return Err(RankError::unusable(
                weights.display(),
                format!(
                    "this is {}'s weights, not a metadata predictor's",
                    other.name()
                ),
            ));
        }
        None => {
            return Err(RankError::unusable(
                weights.display(),
                "no model config in its metadata: not a predictor file radit wrote",
            ));
        }
    };
    if let Some(b) = backbone {
        cfg.backbone = Some(b.to_path_buf());
    }
    let vs = VarStore::new(device);
    let mut net = Predictor::new(&vs.root(), &cfg)?;
    let tensors = radit_models::model::read_weights(weights)?.tensors;
    radit_models::model::load_named(&vs, &tensors, weights)?;
    radit_models::staged::StagedModel::set_precision(&mut net, precision);
    Ok(LoadedPredictor {
        _vs: vs,
        net,
        weights: weights.to_path_buf(),
    })
}

/// Images to score and the profile each should show.
#[derive(Debug, Clone)]
pub enum ImageSource {
    /// A store split's images (the first `limit`) against their metadata.
    Store {
        store: String,
        split: Split,
        limit: Option<u64>,
    },
    /// The images a CSV lists (a `file` column, relative to the CSV's directory) against the profile in its
    /// variable columns.
    Listed(PathBuf),
}

impl ImageSource {
    pub fn describe(&self) -> String {
        match self {
            Self::Store {
                store,
                split,
                limit,
            } => match limit {
                Some(n) => format!("{store} {} (first {n})", split.name()),
                None => format!("{store} {}", split.name()),
            },
            Self::Listed(csv) => csv.display().to_string(),
        }
    }
}

/// A batch of images `[n, 1, S, S]` in [-1, 1] with their ids and profiles.
pub struct ImageBatch {
    pub ids: Vec<String>,
    pub images: Tensor,
    /// `[n, 18]` class ids (0 = missing).
    pub labels: Vec<u8>,
    /// Years/100, NaN = missing.
    pub age: Vec<f32>,
}

/// One listed image: its file and the profile it should show.
#[derive(Debug, Clone)]
pub struct Listed {
    pub file: PathBuf,
    pub id: String,
    pub labels: Vec<u8>,
    pub age: f32,
}

/// The rows of a CSV with a `file` column (and an `image_id` one, else the file is the id) and profile columns
/// named `prefix` + a variable.
pub fn read_listed(csv: &Path, prefix: &str) -> Result<Vec<Listed>, RankError> {
    let bad = |reason: String| RankError::unusable(csv.display(), reason);
    let profiles = radit_models::scm::io::read_csv_prefixed(csv, prefix)?;
    let labels = Vec::<i64>::try_from(profiles.labels.flatten(0, -1)).map_err(ModelError::from)?;
    let age = Vec::<f32>::try_from(&profiles.age).map_err(ModelError::from)?;
    let mut reader = csv::Reader::from_path(csv).map_err(|e| bad(e.to_string()))?;
    let header = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let column = |name: &str| header.iter().position(|c| c == name);
    let file = column("file").ok_or_else(|| bad("no `file` column".into()))?;
    let id = column("image_id");
    let dir = csv.parent().unwrap_or(Path::new("."));
    let width = radit_sharding::schema::NUM_LABELS;
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let r = record.map_err(|e| bad(format!("row {}: {e}", i + 2)))?;
        let f = r.get(file).unwrap_or_default();
        let (Some(l), Some(&a)) = (labels.get(i * width..(i + 1) * width), age.get(i)) else {
            return Err(bad(format!("row {}: no profile read for it", i + 2)));
        };
        out.push(Listed {
            file: dir.join(f),
            id: id.and_then(|c| r.get(c)).unwrap_or(f).to_string(),
            labels: l.iter().map(|&c| c as u8).collect(),
            age: a,
        });
    }
    Ok(out)
}

/// A square 16-bit grey PNG as (side, levels), of side `side` when given; another size or a broken file is an
/// error naming it.
pub fn read_png_square(path: &Path, side: Option<i64>) -> Result<(i64, Vec<u16>), RankError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let (img, _) = radit_sharding::image::decode_png(&bytes)
        .map_err(|e| RankError::unusable(path.display(), e.to_string()))?;
    let found = i64::from(img.width);
    let want = side.unwrap_or(found);
    if found != want || i64::from(img.height) != want {
        return Err(RankError::unusable(
            path.display(),
            format!("{}x{}; expected {want}x{want}", img.width, img.height),
        ));
    }
    Ok((found, img.pixels))
}

/// A 16-bit grey PNG of side `side` as levels (see [`read_png_square`]).
pub fn read_png_levels(path: &Path, side: i64) -> Result<Vec<u16>, RankError> {
    Ok(read_png_square(path, Some(side))?.1)
}

fn to_images(levels: &[u16], n: usize, side: i64) -> Tensor {
    let x: Vec<f32> = levels.iter().map(|&l| from_level(l)).collect();
    Tensor::from_slice(&x).view([n as i64, 1, side, side])
}

/// Calls `each` with the source's images in batches of `batch`, in order.
pub fn for_each_batch(
    source: &ImageSource,
    side: i64,
    batch: usize,
    mut each: impl FnMut(ImageBatch) -> Result<(), RankError>,
) -> Result<(), RankError> {
    let width = radit_sharding::schema::NUM_LABELS;
    match source {
        ImageSource::Store {
            store,
            split,
            limit,
        } => {
            let reader =
                StoreReader::open(Storage::open_existing(store).map_err(ShardError::from)?)?;
            let stored = i64::from(reader.layout().image_size);
            if stored != side {
                return Err(RankError::unusable(
                    store,
                    format!("its images are {stored}x{stored}; the predictor reads {side}x{side}"),
                ));
            }
            let mut left = reader.len(*split).min(limit.unwrap_or(u64::MAX)) as usize;
            let per = (side * side) as usize;
            for k in 0..reader.shards(*split) {
                if left == 0 {
                    break;
                }
                let shard = reader.read_shard(*split, k)?;
                let rows = shard.rows.min(left);
                left -= rows;
                for first in (0..rows).step_by(batch.max(1)) {
                    let n = batch.min(rows - first);
                    each(ImageBatch {
                        ids: shard.image_ids[first..first + n].to_vec(),
                        images: to_images(&shard.images[first * per..(first + n) * per], n, side),
                        labels: shard.labels[first * width..(first + n) * width].to_vec(),
                        age: shard.age[first..first + n].to_vec(),
                    })?;
                }
            }
        }
        ImageSource::Listed(csv) => {
            let rows = read_listed(csv, "")?;
            for chunk in rows.chunks(batch.max(1)) {
                let mut levels = Vec::new();
                for r in chunk {
                    levels.extend(read_png_levels(&r.file, side)?);
                }
                each(ImageBatch {
                    ids: chunk.iter().map(|r| r.id.clone()).collect(),
                    images: to_images(&levels, chunk.len(), side),
                    labels: chunk.iter().flat_map(|r| r.labels.clone()).collect(),
                    age: chunk.iter().map(|r| r.age).collect(),
                })?;
            }
        }
    }
    Ok(())
}

/// What `radit predictors eval` scores.
#[derive(Debug, Clone)]
pub struct PredictEval {
    pub weights: PathBuf,
    pub backbone: Option<PathBuf>,
    pub source: ImageSource,
    pub out: PathBuf,
    pub batch: usize,
    /// Write the attention pooling's embeddings.
    pub embeddings: bool,
    pub device: Device,
    pub precision: Precision,
}

/// One variable's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariableScore {
    pub variable: String,
    /// Images with the variable known.
    pub n: u64,
    /// ROC-AUC (categoricals) or MAE in years (age); `None` with `undefined` saying why (one class only).
    pub value: Option<f64>,
    pub metric: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undefined: Option<String>,
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PredictorMetrics {
    pub weights: PathBuf,
    pub variant: &'static str,
    pub source: String,
    pub images: u64,
    pub variables: Vec<VariableScore>,
    pub seconds: f64,
}

/// Per image and task: class probabilities (categoricals) or the predicted age in years.
struct Scores {
    tasks: Vec<Task>,
    ids: Vec<String>,
    /// `[n][W]`: softmax per categorical task, age x 100.
    rows: Vec<Vec<f64>>,
    labels: Vec<u8>,
    age: Vec<f32>,
}

/// Probabilities per task and the age in years, from a batch's outputs `[n, W]`.
pub fn probabilities(tasks: &[Task], outputs: &Tensor) -> Result<Vec<Vec<f64>>, ModelError> {
    let mut columns = Vec::new();
    let mut at = 0;
    for t in tasks {
        let k = t.outputs();
        let slice = outputs.narrow(1, at, k).to_kind(Kind::Double);
        at += k;
        columns.push(match t.classes {
            Some(_) => slice.softmax(1, Kind::Double),
            None => slice * 100.0,
        });
    }
    let all = Tensor::cat(&columns, 1).to_device(Device::Cpu);
    let (n, w) = (all.size()[0], all.size()[1]);
    let flat = Vec::<f64>::try_from(all.flatten(0, -1))?;
    Ok((0..n as usize)
        .map(|i| flat[i * w as usize..(i + 1) * w as usize].to_vec())
        .collect())
}

impl Scores {
    fn score(&self) -> Vec<VariableScore> {
        let width = radit_sharding::schema::NUM_LABELS;
        let mut out = Vec::new();
        let mut at = 0usize;
        for t in &self.tasks {
            let k = t.outputs() as usize;
            let column = at;
            at += k;
            let (value, n, undefined, metric) = match t.classes {
                Some((label, _)) => {
                    let known: Vec<usize> = (0..self.rows.len())
                        .filter(|&r| self.labels[r * width + label] > 0)
                        .collect();
                    let classes: Vec<usize> = known
                        .iter()
                        .map(|&r| self.labels[r * width + label] as usize - 1)
                        .collect();
                    let result = if k == 2 {
                        let positive: Vec<bool> = classes.iter().map(|&c| c == 1).collect();
                        let p: Vec<f64> = known.iter().map(|&r| self.rows[r][column + 1]).collect();
                        radit_eval::classify::roc_auc(&positive, &p)
                    } else {
                        ovr_present(&classes, &known, &self.rows, column, k)
                    };
                    let n = known.len() as u64;
                    match result {
                        Ok(v) => (Some(v), n, None, "roc_auc"),
                        Err(e) => (None, n, Some(e.to_string()), "roc_auc"),
                    }
                }
                None => {
                    let known: Vec<usize> = (0..self.rows.len())
                        .filter(|&r| self.age[r].is_finite())
                        .collect();
                    let predicted: Vec<f64> = known.iter().map(|&r| self.rows[r][column]).collect();
                    let truth: Vec<f64> = known
                        .iter()
                        .map(|&r| f64::from(self.age[r]) * 100.0)
                        .collect();
                    match radit_eval::classify::mae(&predicted, &truth) {
                        Ok(v) => (Some(v), known.len() as u64, None, "mae_years"),
                        Err(e) => (None, known.len() as u64, Some(e.to_string()), "mae_years"),
                    }
                }
            };
            out.push(VariableScore {
                variable: t.name.clone(),
                n,
                value,
                metric,
                undefined,
            });
        }
        out
    }

    fn csv(&self) -> String {
        let mut header = vec!["image_id".to_string()];
        for t in &self.tasks {
            match t.classes {
                Some(_) => header.extend(t.class_names().iter().map(|c| format!("{}={c}", t.name))),
                None => header.push("age_years".into()),
            }
        }
        let mut text = header.join(",") + "\n";
        for (id, row) in self.ids.iter().zip(&self.rows) {
            text += &crate::generate_job::csv_field(id);
            for v in row {
                text += &format!(",{v:.6}");
            }
            text += "\n";
        }
        text
    }
}

/// The one-vs-rest macro ROC-AUC over the classes present among the known rows (a class nobody has has no
/// AUC; at least two must be present).
fn ovr_present(
    classes: &[usize],
    rows: &[usize],
    scores: &[Vec<f64>],
    column: usize,
    k: usize,
) -> Result<f64, radit_eval::EvalError> {
    let present: Vec<usize> = (0..k).filter(|c| classes.contains(c)).collect();
    if present.len() < 2 {
        return Err(radit_eval::EvalError::Undefined {
            what: "one-vs-rest ROC-AUC".into(),
            reason: format!(
                "{} class(es) among the known values; two are needed",
                present.len()
            ),
        });
    }
    let mut total = 0.0;
    for &c in &present {
        let is_c: Vec<bool> = classes.iter().map(|&l| l == c).collect();
        let p: Vec<f64> = rows.iter().map(|&r| scores[r][column + c]).collect();
        total += radit_eval::classify::roc_auc(&is_c, &p)?;
    }
    Ok(total / present.len() as f64)
}

/// Scores the predictor over the source (see the module docs).
pub fn evaluate(cfg: &PredictEval) -> Result<PredictorMetrics, RankError> {
    let started = std::time::Instant::now();
    let loaded = load_predictor(
        &cfg.weights,
        cfg.backbone.as_deref(),
        cfg.device,
        cfg.precision,
    )?;
    let net = &loaded.net;
    let side = net.config().image_size;
    std::fs::create_dir_all(&cfg.out).map_err(io_error(&cfg.out))?;
    let mut scores = Scores {
        tasks: net.tasks().to_vec(),
        ids: Vec::new(),
        rows: Vec::new(),
        labels: Vec::new(),
        age: Vec::new(),
    };
    let mut embeddings: Vec<f32> = Vec::new();
    let mut dim = 0;
    if cfg.embeddings && net.config().variant != radit_models::predictor::Variant::AttentionPool {
        return Err(RankError::unusable(
            cfg.weights.display(),
            "--embeddings: only the attention-pooling predictor makes per-task embeddings",
        ));
    }
    for_each_batch(&cfg.source, side, cfg.batch, |b| {
        let p = tch::no_grad(|| net.predict(&b.images.to_device(cfg.device), None))?;
        scores
            .rows
            .extend(probabilities(&scores.tasks, &p.outputs)?);
        if let (true, Some(e)) = (cfg.embeddings, p.embeddings) {
            dim = e.size()[1] * e.size()[2];
            embeddings.extend(
                Vec::<f32>::try_from(e.to_device(Device::Cpu).flatten(0, -1))
                    .map_err(ModelError::from)?,
            );
        }
        scores.ids.extend(b.ids);
        scores.labels.extend(b.labels);
        scores.age.extend(b.age);
        Ok(())
    })?;
    let metrics = PredictorMetrics {
        weights: cfg.weights.clone(),
        variant: net.config().variant.name(),
        source: cfg.source.describe(),
        images: scores.rows.len() as u64,
        variables: scores.score(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let csv = scores.csv();
    let path = cfg.out.join("predictions.csv");
    write_atomic(&path, |tmp| std::fs::write(tmp, &csv))?;
    if cfg.embeddings {
        let path = cfg.out.join("embeddings.npy");
        write_atomic(&path, |tmp| {
            radit_eval::io::write_npy(tmp, &embeddings, scores.rows.len(), dim as usize)
        })?;
    }
    let json = serde_json::to_string_pretty(&metrics).unwrap_or_default();
    let path = cfg.out.join("metrics.json");
    write_atomic(&path, |tmp| std::fs::write(tmp, format!("{json}\n")))?;
    Ok(metrics)
}

/// The header of [`csv_row`]: the model, what was scored, the images, then each variable's value.
pub fn csv_header() -> String {
    let mut h = vec!["model".to_string(), "source".into(), "images".into()];
    h.extend(
        radit_models::predictor::tasks()
            .iter()
            .map(|t| match t.classes {
                Some(_) => format!("{}_auc", t.name),
                None => "age_mae_years".into(),
            }),
    );
    h.join(",")
}

/// One table row of `metrics` (an undefined value is empty).
pub fn csv_row(model: &str, metrics: &PredictorMetrics) -> String {
    let f = crate::generate_job::csv_field;
    let mut row = vec![f(model), f(&metrics.source), metrics.images.to_string()];
    row.extend(
        metrics
            .variables
            .iter()
            .map(|v| v.value.map_or(String::new(), |x| format!("{x:.4}"))),
    );
    row.join(",")
}

/// Appends `row` to the table at `path`, writing `header` first when the file is new or empty.
pub fn append_row(path: &Path, header: &str, row: &str) -> Result<(), RankError> {
    let new = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error(path))?;
    let text = if new {
        format!("{header}\n{row}\n")
    } else {
        format!("{row}\n")
    };
    file.write_all(text.as_bytes()).map_err(io_error(path))
}

/// Scores keyed by variable, for tests and tables.
pub fn by_variable(metrics: &PredictorMetrics) -> BTreeMap<&str, Option<f64>> {
    metrics
        .variables
        .iter()
        .map(|v| (v.variable.as_str(), v.value))
        .collect()
}

//! `radit eval identity`: how much of a patient an edit keeps (editing.md, the paper's Table 14 and Eq. 13-15).
//! Over a finished `radit edit` directory, for each edit and its original:
//! - SSIM in pixel space ([0, 1], Gaussian window 11, σ 1.5: `radit_eval::image::ssim`);
//! - the Rad-DINO perceptual distance (LPIPS-style: `radit_models::features::perceptual`, the decoder fine-tune's
//!   loss, one code path);
//! - rLPIPS: that distance over its mean on random pairs of real images of the store's split (seeded; the pairs'
//!   SSIM and distance are reported too, the paper's reference row);
//! - with a predictor (attention pooling), the attribute cosine: the mean over the tasks not intervened on of
//!   cos(h_a(x), h_a(x')) of the pooled embeddings.
//!
//! Writes `identity.csv` (one line per edit), `identity.json` (means and standard deviations per intervention
//! and the reference), and optionally one table row per (model, intervention).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use radit_models::features::{LayerReduce, PerceptualDistance};
use radit_models::model::{ModelError, Precision};
use radit_sharding::ShardError;
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::generate::from_level;
use crate::journal::{RankError, io_error, write_atomic};
use crate::predict_eval::{LoadedPredictor, load_predictor, read_png_levels, read_png_square};

/// What `radit eval identity` measures.
#[derive(Debug, Clone)]
pub struct IdentityEval {
    /// A finished `radit edit` directory.
    pub edits: PathBuf,
    /// The perceptual network (Rad-DINO's snapshot).
    pub perceptual_net: PathBuf,
    /// How the perceptual distance's layers combine.
    pub reduce: LayerReduce,
    /// An attention-pooling predictor file, for the attribute cosine.
    pub predictor: Option<PathBuf>,
    pub backbone: Option<PathBuf>,
    /// The store and split whose random pairs of real images normalise the distance.
    pub store: String,
    pub split: Split,
    pub pairs: u64,
    pub seed: u64,
    pub out: PathBuf,
    pub batch: usize,
    pub device: Device,
    pub precision: Precision,
}

/// A metric's mean and standard deviation over `n` values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: u64,
}

impl Stat {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n.max(1) as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n.max(2) - 1) as f64;
        Self {
            mean,
            std: var.sqrt(),
            n: n as u64,
        }
    }
}

/// One intervention's scores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InterventionIdentity {
    pub intervention: String,
    pub ssim: Stat,
    pub lpips: Stat,
    pub rlpips: Stat,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribute_cosine: Option<Stat>,
}

/// The random real pairs' scores: the reference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RealPairs {
    pub pairs: u64,
    pub ssim: Stat,
    pub lpips: Stat,
}

/// `identity.json`.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityReport {
    pub edits: PathBuf,
    pub perceptual_net: PathBuf,
    pub reference: RealPairs,
    pub interventions: Vec<InterventionIdentity>,
    pub seconds: f64,
}

fn unit(levels: &[u16], n: usize, side: i64) -> Tensor {
    let x: Vec<f32> = levels
        .iter()
        .map(|&l| (from_level(l) + 1.0) / 2.0)
        .collect();
    Tensor::from_slice(&x).view([n as i64, 1, side, side])
}

fn ssim_of(a: &[u16], b: &[u16], side: i64) -> Result<f64, RankError> {
    let f = |v: &[u16]| -> Vec<f64> {
        v.iter()
            .map(|&l| f64::from((from_level(l) + 1.0) / 2.0))
            .collect()
    };
    radit_eval::image::ssim(&f(a), &f(b), side as usize, side as usize, 1.0)
        .map_err(|e| RankError::unusable("SSIM", e.to_string()))
}

/// The pairs (i, j), i != j, of `rows` drawn from `seed`.
fn random_pairs(rows: u64, pairs: u64, seed: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut k = 0u64;
    while (out.len() as u64) < pairs && rows >= 2 {
        let a = crate::edit_job::draw(&[seed, k, 1]) % rows;
        let b = crate::edit_job::draw(&[seed, k, 2]) % rows;
        k += 1;
        if a != b {
            out.push((a, b));
        }
    }
    out
}

/// Rows of a split as 16-bit levels (grouped by shard).
fn read_rows(
    reader: &StoreReader,
    split: Split,
    rows: &[u64],
) -> Result<BTreeMap<u64, Vec<u16>>, RankError> {
    let per = u64::from(reader.layout().shard_images);
    let side = i64::from(reader.layout().image_size);
    let pixels = (side * side) as usize;
    let mut by_shard: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for &r in rows {
        by_shard.entry(r / per).or_default().push(r);
    }
    let mut out = BTreeMap::new();
    for (k, members) in by_shard {
        let shard = reader.read_shard(split, k)?;
        for r in members {
            let i = (r % per) as usize;
            out.insert(r, shard.images[i * pixels..(i + 1) * pixels].to_vec());
        }
    }
    Ok(out)
}

/// One intervention's per-edit values.
#[derive(Default)]
struct Collected {
    ssim: Vec<f64>,
    lpips: Vec<f64>,
    cosine: Vec<f64>,
}

/// Scores the edits (see the module docs).
pub fn evaluate(cfg: &IdentityEval) -> Result<IdentityReport, RankError> {
    let started = std::time::Instant::now();
    let edits = crate::edit_job::read_edits(&cfg.edits)?;
    if edits.is_empty() {
        return Err(RankError::unusable(cfg.edits.display(), "no edits"));
    }
    let perceptual = PerceptualDistance::load(&cfg.perceptual_net, cfg.reduce, cfg.device)?;
    let predictor: Option<LoadedPredictor> = cfg
        .predictor
        .as_deref()
        .map(|p| load_predictor(p, cfg.backbone.as_deref(), cfg.device, cfg.precision))
        .transpose()?;
    if let Some(p) = &predictor
        && p.net.config().variant != radit_models::predictor::Variant::AttentionPool
    {
        return Err(RankError::unusable(
            p.weights.display(),
            "the attribute cosine reads the attention pooling's per-task embeddings: give an attention-pool predictor",
        ));
    }
    let distance = |a: &Tensor, b: &Tensor| -> Result<Vec<f64>, RankError> {
        let d = tch::no_grad(|| perceptual.distance(a, b))?;
        Ok(
            Vec::<f64>::try_from(d.to_kind(Kind::Double).to_device(Device::Cpu))
                .map_err(ModelError::from)?,
        )
    };

    // The reference: random pairs of real images.
    let reader = StoreReader::open(Storage::open_existing(&cfg.store).map_err(ShardError::from)?)?;
    let side = i64::from(reader.layout().image_size);
    let pairs = random_pairs(reader.len(cfg.split), cfg.pairs, cfg.seed);
    if pairs.is_empty() {
        return Err(RankError::unusable(
            &cfg.store,
            format!(
                "the {} split has fewer than two images: no random pairs",
                cfg.split.name()
            ),
        ));
    }
    let wanted: Vec<u64> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    let images = read_rows(&reader, cfg.split, &wanted)?;
    let (mut pair_ssim, mut pair_d) = (Vec::new(), Vec::new());
    for chunk in pairs.chunks(cfg.batch.max(1)) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (i, j) in chunk {
            pair_ssim.push(ssim_of(&images[i], &images[j], side)?);
            a.extend_from_slice(&images[i]);
            b.extend_from_slice(&images[j]);
        }
        pair_d.extend(distance(
            &unit(&a, chunk.len(), side),
            &unit(&b, chunk.len(), side),
        )?);
    }
    let reference = RealPairs {
        pairs: pairs.len() as u64,
        ssim: Stat::of(&pair_ssim),
        lpips: Stat::of(&pair_d),
    };
    let norm = reference.lpips.mean.max(f64::MIN_POSITIVE);

    // The edits.
    let tasks = radit_models::predictor::tasks();
    let mut lines =
        String::from("file,original,image_id,intervention,ssim,lpips,rlpips,attribute_cosine\n");
    let mut per: BTreeMap<String, Collected> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for chunk in edits.chunks(cfg.batch.max(1)) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut ssims = Vec::new();
        let mut side_of = 0;
        for (listed, original, _) in chunk {
            let (s, x) = read_png_square(original, None)?;
            let y = read_png_levels(&listed.file, s)?;
            ssims.push(ssim_of(&x, &y, s)?);
            side_of = s;
            a.extend(x);
            b.extend(y);
        }
        let (xa, xb) = (
            unit(&a, chunk.len(), side_of),
            unit(&b, chunk.len(), side_of),
        );
        let d = distance(&xa, &xb)?;
        let cosines: Option<Vec<Vec<f64>>> = match &predictor {
            Some(p) => {
                let embed = |x: &Tensor| -> Result<Tensor, RankError> {
                    let e = tch::no_grad(|| {
                        p.net.predict(&(x * 2.0 - 1.0).to_device(cfg.device), None)
                    })?;
                    e.embeddings
                        .ok_or_else(|| RankError::unusable(p.weights.display(), "no embeddings"))
                };
                let (ea, eb) = (embed(&xa)?, embed(&xb)?);
                // [n, T]
                let cos = Tensor::cosine_similarity(&ea, &eb, 2, 1e-8)
                    .to_kind(Kind::Double)
                    .to_device(Device::Cpu);
                let flat = Vec::<f64>::try_from(cos.flatten(0, -1)).map_err(ModelError::from)?;
                Some(flat.chunks(tasks.len()).map(<[f64]>::to_vec).collect())
            }
            None => None,
        };
        for (k, (listed, original, intervention)) in chunk.iter().enumerate() {
            let attr = cosines.as_ref().map(|c| {
                let kept: Vec<f64> = tasks
                    .iter()
                    .zip(&c[k])
                    .filter(|(t, _)| t.name != *intervention)
                    .map(|(_, &v)| v)
                    .collect();
                kept.iter().sum::<f64>() / kept.len().max(1) as f64
            });
            let entry = per.entry(intervention.clone()).or_insert_with(|| {
                order.push(intervention.clone());
                Default::default()
            });
            entry.ssim.push(ssims[k]);
            entry.lpips.push(d[k]);
            entry.cosine.extend(attr);
            lines += &format!(
                "{},{},{},{},{:.6},{:.6},{:.6},{}\n",
                crate::generate_job::csv_field(&rel(&cfg.edits, &listed.file)),
                crate::generate_job::csv_field(&rel(&cfg.edits, original)),
                crate::generate_job::csv_field(&listed.id),
                intervention,
                ssims[k],
                d[k],
                d[k] / norm,
                attr.map_or(String::new(), |v| format!("{v:.6}")),
            );
        }
    }
    let interventions = order
        .iter()
        .map(|name| {
            let Collected {
                ssim: s,
                lpips: d,
                cosine: c,
            } = &per[name];
            let r: Vec<f64> = d.iter().map(|v| v / norm).collect();
            InterventionIdentity {
                intervention: name.clone(),
                ssim: Stat::of(s),
                lpips: Stat::of(d),
                rlpips: Stat::of(&r),
                attribute_cosine: (!c.is_empty()).then(|| Stat::of(c)),
            }
        })
        .collect();
    std::fs::create_dir_all(&cfg.out).map_err(io_error(&cfg.out))?;
    write_atomic(&cfg.out.join("identity.csv"), |tmp| {
        std::fs::write(tmp, &lines)
    })?;
    let report = IdentityReport {
        edits: cfg.edits.clone(),
        perceptual_net: cfg.perceptual_net.clone(),
        reference,
        interventions,
        seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    write_atomic(&cfg.out.join("identity.json"), |tmp| {
        std::fs::write(tmp, format!("{json}\n"))
    })?;
    Ok(report)
}

fn rel(base: &Path, p: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

/// The table's header: one row per (model, intervention), then the real pairs' row.
pub const CSV_HEADER: &str = "model,intervention,n,ssim,ssim_std,lpips,lpips_std,rlpips,rlpips_std,attribute_cosine,attribute_cosine_std";

/// The table rows of a report: one per intervention, and `real pairs` (the reference).
pub fn csv_rows(model: &str, r: &IdentityReport) -> Vec<String> {
    let f = crate::generate_job::csv_field;
    let mut rows: Vec<String> = r
        .interventions
        .iter()
        .map(|i| {
            let (c, cs) = i
                .attribute_cosine
                .map_or((String::new(), String::new()), |s| {
                    (format!("{:.4}", s.mean), format!("{:.4}", s.std))
                });
            format!(
                "{},{},{},{:.4},{:.4},{:.5},{:.5},{:.4},{:.4},{c},{cs}",
                f(model),
                f(&i.intervention),
                i.ssim.n,
                i.ssim.mean,
                i.ssim.std,
                i.lpips.mean,
                i.lpips.std,
                i.rlpips.mean,
                i.rlpips.std
            )
        })
        .collect();
    rows.push(format!(
        "{},real pairs,{},{:.4},{:.4},{:.5},{:.5},1.0000,,,",
        f(model),
        r.reference.pairs,
        r.reference.ssim.mean,
        r.reference.ssim.std,
        r.reference.lpips.mean,
        r.reference.lpips.std
    ));
    rows
}

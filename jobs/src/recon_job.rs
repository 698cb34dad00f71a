//! `radit eval recon`: how well an autoencoder reconstructs radiographs (radvae.md, the paper's Table 2). Each image
//! of a split (or its first `limit`) goes through the encoder's mean and the decoder, any autoencoder file radit
//! reads (FLUX.2 as released, a merged fine-tune, RadVAE (Scratch)); the reconstruction is written as a 16-bit PNG,
//! and PSNR and SSIM of the two images on [0, 1] (data range 1, Gaussian window 11, σ 1.5, `radit_eval::image`)
//! go to `recon.csv` with their means in `recon.json`. The output is a samples directory as `radit generate`
//! writes one (`generate.json`, `samples.csv`, `images/`), so `radit eval features --samples` takes the
//! reconstructions, and the rFD of Table 2 is `radit eval fidelity` of their features against the originals'.
//!
//! A unit is one shard of the split; units are cut over the ranks, written, then committed by a journal record
//! holding their metrics, so a killed or requeued rank resumes at its first uncommitted shard. `generate.json`
//! pins what the output is of (weights, store, split, limit, grey step); another run is refused until `overwrite`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use radit_protocol::{ConfigError, Phase};
use radit_sharding::ShardError;
use radit_sharding::reader::StoreReader;
use radit_sharding::split::Split;
use radit_sharding::store::Storage;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::generate_job::{csv_field, sample_file, sha256_file};
use crate::journal::{RankError, RankHandles, SAMPLES_CSV, SAMPLES_MANIFEST, write_atomic};
use crate::units::{
    UnitJob, UnitReader, UnitWork, rank_range, run_units, settled_by_rank0, total_steps,
};
use radit_engine::collective::Collective;
use radit_engine::out_of_memory::{AllocationFailed, OutOfMemory};
use radit_models::autoencoder::{self, Autoencoder, AutoencoderConfig, Grey};
use radit_models::model::Precision;

/// The `[recon]` section (and `radit eval recon`'s flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconConfig {
    /// The store whose images are reconstructed.
    pub store: String,
    #[serde(default = "default_split")]
    pub split: Split,
    /// Only the first this many images of the split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// The autoencoder's weights.
    pub weights: PathBuf,
    /// auto (what the file says), flux2, tiny, radvae or radvae-tiny.
    #[serde(default = "auto")]
    pub autoencoder: String,
    /// The decoder's RGB to grey, in place of the file's (FLUX.2 "luma" is Table 8's second row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grey: Option<Grey>,
    /// The output directory.
    pub out: PathBuf,
    /// Images through the autoencoder at once.
    #[serde(default = "default_batch")]
    pub batch: u64,
    /// fp32 or bf16 (default: bf16 on GPUs, fp32 on CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// Replace an output of other weights or images.
    #[serde(default)]
    pub overwrite: bool,
}

fn default_split() -> Split {
    Split::Test
}
fn auto() -> String {
    autoencoder::AUTO.into()
}
fn default_batch() -> u64 {
    8
}

impl ReconConfig {
    pub fn new(store: &str, weights: &Path, out: &Path) -> Self {
        Self {
            store: store.into(),
            split: default_split(),
            limit: None,
            weights: weights.to_path_buf(),
            autoencoder: auto(),
            grey: None,
            out: out.to_path_buf(),
            batch: default_batch(),
            precision: None,
            overwrite: false,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch == 0 {
            return Err(ConfigError::new("recon.batch", "must be positive"));
        }
        if self.limit == Some(0) {
            return Err(ConfigError::new(
                "recon.limit",
                "must be positive when given",
            ));
        }
        autoencoder::check_name(&self.autoencoder)
            .map_err(|e| ConfigError::new("recon.autoencoder", e.to_string()))
    }

    /// Reads `[recon]` from a TOML file (as `radit run` writes it for the ranks) and validates it.
    pub fn load(file: &Path) -> Result<Self, RankError> {
        crate::journal::load_section(file, "recon", Self::validate)
    }

    /// The autoencoder the weights are, with the grey step asked for.
    pub fn autoencoder_config(&self) -> Result<AutoencoderConfig, RankError> {
        let found = autoencoder::resolve(&self.autoencoder, &self.weights)?;
        Ok(match (found, self.grey) {
            (AutoencoderConfig::Flux(c), Some(grey)) => {
                AutoencoderConfig::Flux(autoencoder::AeConfig { grey, ..c })
            }
            (AutoencoderConfig::RadVae(_), Some(_)) => {
                return Err(RankError::Config(ConfigError::new(
                    "recon.grey",
                    "RadVAE decodes grey images directly: it has no RGB to make grey",
                )));
            }
            (found, None) => found,
        })
    }
}

/// One shard's rows as the job sees them: the split's shard index, its first row and its row count (after the
/// limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ShardRows {
    k: u64,
    first: u64,
    rows: u64,
}

impl std::fmt::Display for ShardRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shard {} (rows {}..{})",
            self.k,
            self.first,
            self.first + self.rows
        )
    }
}

/// The split's shards up to the limit.
fn shard_units(cfg: &ReconConfig, reader: &StoreReader) -> Vec<ShardRows> {
    let per = u64::from(reader.layout().shard_images);
    let total = reader.len(cfg.split).min(cfg.limit.unwrap_or(u64::MAX));
    (0..total.div_ceil(per.max(1)))
        .map(|k| ShardRows {
            k,
            first: k * per,
            rows: per.min(total - k * per),
        })
        .collect()
}

fn open_store(cfg: &ReconConfig) -> Result<StoreReader, RankError> {
    Ok(StoreReader::open(
        Storage::open_existing(&cfg.store).map_err(ShardError::from)?,
    )?)
}

/// The steps of the rank with the most shards, over `world` ranks.
pub fn planned_steps(cfg: &ReconConfig, world: u64) -> Result<u64, RankError> {
    let units = shard_units(cfg, &open_store(cfg)?).len() as u64;
    Ok(total_steps(units, world))
}

/// What an output directory is of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconFingerprint {
    pub weights_sha256: String,
    pub autoencoder: AutoencoderConfig,
    pub store: String,
    pub split: Split,
    pub images: u64,
    pub precision: Precision,
}

/// One image's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMetrics {
    pub row: u64,
    pub image_id: String,
    pub psnr: f64,
    pub ssim: f64,
}

/// The means over the images (PSNR over the finite ones: an exact reconstruction has an infinite PSNR, counted
/// apart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconSummary {
    pub images: u64,
    pub psnr_mean: f64,
    pub ssim_mean: f64,
    pub exact: u64,
}

fn journal_path(out: &Path, k: u64) -> PathBuf {
    out.join(".recon/journal").join(format!("{k:08}.json"))
}

/// What one rank did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReconRun {
    pub rank: usize,
    pub shards: u64,
    pub shards_resumed: u64,
    pub images_written: u64,
    pub images_per_second: f64,
    pub seconds: f64,
    pub stopped_for_requeue: bool,
    /// Rank 0 only, when every shard is in: the means.
    pub summary: Option<ReconSummary>,
}

/// Runs this rank's part of the job (see the module docs). Collective.
pub fn reconstruct(
    cfg: &ReconConfig,
    comm: &dyn Collective,
    device: Device,
    handles: &RankHandles,
) -> Result<ReconRun, RankError> {
    cfg.validate().map_err(RankError::Config)?;
    let (rank, world) = (comm.rank(), comm.world());
    let started = Instant::now();
    handles.progress.set_phase(Phase::Starting);
    let precision = cfg.precision.unwrap_or(Precision::default_on(device));
    let reader = open_store(cfg)?;
    let units = shard_units(cfg, &reader);
    let side = i64::from(reader.layout().image_size);
    let ae_cfg = cfg.autoencoder_config()?;
    if side % ae_cfg.downsampling() != 0 || ae_cfg.image_side().is_some_and(|s| s != side) {
        return Err(RankError::Unusable {
            what: format!("store {}", cfg.store),
            reason: format!(
                "holds {side}x{side} images, which the {} autoencoder does not take",
                ae_cfg.preset_name().unwrap_or("custom")
            ),
        });
    }
    let mut vs = tch::nn::VarStore::new(device);
    let ae = Autoencoder::new(&vs.root(), &ae_cfg)?;
    autoencoder::load(&vs, &ae_cfg, &cfg.weights)?;
    vs.freeze();
    vs.set_kind(precision.compute_kind());
    let fingerprint = ReconFingerprint {
        weights_sha256: sha256_file(&cfg.weights)?,
        autoencoder: ae_cfg.clone(),
        store: cfg.store.clone(),
        split: cfg.split,
        images: units.iter().map(|u| u.rows).sum(),
        precision,
    };
    let prepared = if rank == 0 {
        crate::journal::prepare_samples_dir(
            &cfg.out,
            ".recon",
            &fingerprint,
            cfg.overwrite,
            |f: &ReconFingerprint| {
                format!(
                    "the {} split of {} through weights {}",
                    f.split.name(),
                    f.store,
                    &f.weights_sha256[..12.min(f.weights_sha256.len())]
                )
            },
        )
    } else {
        Ok(())
    };
    settled_by_rank0(comm, handles, cfg.out.display(), prepared)?;
    tracing::info!(
        rank,
        shards = rank_range(units.len(), rank, world).len(),
        images = fingerprint.images,
        "reconstructing"
    );
    let flops = match &ae_cfg {
        AutoencoderConfig::Flux(c) => c.encoder_flops(side) + c.decoder_flops(side),
        AutoencoderConfig::RadVae(c) => c.flops_per_image(),
    };
    let mut job = ReconUnits {
        cfg,
        ae: &ae,
        device,
        precision,
        side,
        flops_per_image: flops,
        written: 0,
    };
    let shard_reader = ShardImages {
        reader: &reader,
        split: cfg.split,
    };
    let run = run_units((comm, device, handles), &units, &shard_reader, &mut job)?;
    let mut out = ReconRun {
        rank,
        shards: run.units,
        shards_resumed: run.resumed,
        images_written: job.written,
        images_per_second: job.written as f64 / run.loop_seconds.max(1e-9),
        seconds: started.elapsed().as_secs_f64(),
        stopped_for_requeue: run.stopped_anywhere,
        summary: None,
    };
    if !run.stopped_anywhere && rank == 0 {
        out.summary = Some(finish(cfg, &units, &fingerprint)?);
    }
    Ok(out)
}

/// A shard's images and ids (up to the unit's rows).
struct ShardImages<'a> {
    reader: &'a StoreReader,
    split: Split,
}

impl UnitReader for ShardImages<'_> {
    type Unit = ShardRows;
    type Input = (Vec<u16>, Vec<String>);
    fn read(&self, u: ShardRows) -> Result<Self::Input, RankError> {
        let shard = self.reader.read_shard(self.split, u.k)?;
        let per = shard.images.len() / shard.rows.max(1);
        let rows = u.rows as usize;
        Ok((
            shard.images[..rows * per].to_vec(),
            shard.image_ids[..rows].to_vec(),
        ))
    }
}

struct ReconUnits<'a> {
    cfg: &'a ReconConfig,
    ae: &'a Autoencoder,
    device: Device,
    precision: Precision,
    side: i64,
    flops_per_image: f64,
    written: u64,
}

impl UnitJob for ReconUnits<'_> {
    type Unit = ShardRows;
    type Input = (Vec<u16>, Vec<String>);
    type Output = Vec<ImageMetrics>;
    type Written = Vec<ImageMetrics>;

    fn is_committed(&self, u: ShardRows) -> Result<bool, RankError> {
        Ok(journal_path(&self.cfg.out, u.k).exists())
    }

    fn compute(
        &mut self,
        u: ShardRows,
        (images, ids): Self::Input,
    ) -> Result<Vec<ImageMetrics>, RankError> {
        let (side, cfg) = (self.side, self.cfg);
        let pixels = (side * side) as usize;
        let kind = self.precision.compute_kind();
        let mut metrics = Vec::with_capacity(ids.len());
        for start in (0..ids.len()).step_by(cfg.batch as usize) {
            let n = (ids.len() - start).min(cfg.batch as usize);
            let levels = &images[start * pixels..(start + n) * pixels];
            let x: Vec<f32> = levels
                .iter()
                .map(|&v| crate::generate::from_level(v))
                .collect();
            let x = Tensor::from_slice(&x)
                .view([n as i64, 1, side, side])
                .to_device(self.device)
                .to_kind(kind);
            let y =
                tch::no_grad(|| self.ae.decode(&self.ae.encode_mean(&x)?))?.to_device(Device::Cpu);
            for i in 0..n {
                let original = &levels[i * pixels..(i + 1) * pixels];
                let recon = crate::generate::to_u16(&y.get(i as i64))?;
                let row = u.first + (start + i) as u64;
                let path = cfg.out.join("images").join(sample_file(cfg.split, row, 0));
                let png = radit_sharding::image::encode_png16(side as u32, side as u32, &recon);
                write_atomic(&path, |tmp| std::fs::write(tmp, &png))?;
                let unit =
                    |v: &[u16]| -> Vec<f64> { v.iter().map(|&l| f64::from(l) / 65535.0).collect() };
                let (a, b) = (unit(original), unit(&recon));
                let (h, w) = (side as usize, side as usize);
                let bad = |e: radit_eval::EvalError| RankError::Unusable {
                    what: format!("image {} of {u}", ids[start + i]),
                    reason: e.to_string(),
                };
                metrics.push(ImageMetrics {
                    row,
                    image_id: ids[start + i].clone(),
                    psnr: radit_eval::image::psnr(&a, &b, h, w, 1.0).map_err(bad)?,
                    ssim: radit_eval::image::ssim(&a, &b, h, w, 1.0).map_err(bad)?,
                });
            }
        }
        Ok(metrics)
    }

    fn out_of_memory(&self, failed: AllocationFailed, u: ShardRows) -> OutOfMemory {
        OutOfMemory::new(
            failed,
            u.to_string(),
            self.device,
            format!(
                "the {} autoencoder, recon.batch {} of {}x{} images in {:?}",
                self.ae.config.preset_name().unwrap_or("custom"),
                self.cfg.batch,
                self.side,
                self.side,
                self.precision
            ),
            "lower recon.batch (images through the autoencoder at once)",
        )
    }

    /// The PNGs are written as each batch is reconstructed (each whole or not at all); the record commits them.
    fn write(&mut self, _: ShardRows, made: Vec<ImageMetrics>) -> Result<Self::Written, RankError> {
        Ok(made)
    }

    fn commit(&mut self, u: ShardRows, metrics: Vec<ImageMetrics>) -> Result<UnitWork, RankError> {
        let path = journal_path(&self.cfg.out, u.k);
        let bytes = serde_json::to_vec(&metrics).map_err(|e| RankError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        write_atomic(&path, |tmp| std::fs::write(tmp, &bytes))?;
        let n = metrics.len() as u64;
        self.written += n;
        Ok(UnitWork {
            images: n,
            tokens: n * (self.side * self.side) as u64,
            flops: self.flops_per_image * n as f64,
        })
    }
}

/// Rank 0, after every rank's range: reads every shard's record, writes `recon.csv`, `recon.json`,
/// `samples.csv` and marks the manifest complete.
fn finish(
    cfg: &ReconConfig,
    units: &[ShardRows],
    fingerprint: &ReconFingerprint,
) -> Result<ReconSummary, RankError> {
    let mut all: Vec<ImageMetrics> = Vec::new();
    for u in units {
        let path = journal_path(&cfg.out, u.k);
        let text = std::fs::read(&path).map_err(|_| RankError::Unusable {
            what: cfg.out.display().to_string(),
            reason: format!(
                "{u} is not committed although every rank finished: run again to resume"
            ),
        })?;
        let metrics: Vec<ImageMetrics> =
            serde_json::from_slice(&text).map_err(|e| RankError::Unusable {
                what: path.display().to_string(),
                reason: format!("an unreadable record ({e}): set overwrite to start again"),
            })?;
        all.extend(metrics);
    }
    let mut recon = String::from("file,image_id,row,psnr,ssim\n");
    let mut samples = String::from("file,image_id,row,sample\n");
    for m in &all {
        let file = format!("images/{}", sample_file(cfg.split, m.row, 0));
        let id = csv_field(&m.image_id);
        recon += &format!("{file},{id},{},{},{}\n", m.row, m.psnr, m.ssim);
        samples += &format!("{file},{id},{},0\n", m.row);
    }
    let finite: Vec<f64> = all
        .iter()
        .map(|m| m.psnr)
        .filter(|p| p.is_finite())
        .collect();
    let n = all.len().max(1) as f64;
    let summary = ReconSummary {
        images: all.len() as u64,
        psnr_mean: finite.iter().sum::<f64>() / finite.len().max(1) as f64,
        ssim_mean: all.iter().map(|m| m.ssim).sum::<f64>() / n,
        exact: (all.len() - finite.len()) as u64,
    };
    write_atomic(&cfg.out.join("recon.csv"), |tmp| {
        std::fs::write(tmp, &recon)
    })?;
    write_atomic(&cfg.out.join(SAMPLES_CSV), |tmp| {
        std::fs::write(tmp, &samples)
    })?;
    let report = serde_json::json!({ "fingerprint": fingerprint, "summary": summary });
    write_atomic(&cfg.out.join("recon.json"), |tmp| {
        std::fs::write(tmp, format!("{report:#}\n"))
    })?;
    let text =
        serde_json::json!({ "fingerprint": fingerprint, "complete": true, "samples": all.len() });
    write_atomic(&cfg.out.join(SAMPLES_MANIFEST), |tmp| {
        std::fs::write(tmp, format!("{text:#}\n"))
    })?;
    Ok(summary)
}

//! `radit sample` as a library call: samples of one condition profile (or a counterfactual profile the SCM
//! abducts), or counterfactual edits of given images, written with a contact sheet and `samples.json`; the caller
//! prints the returned [`SampleReport`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use radit_models::autoencoder::{self, DecoderConfig, LatentDecoder};
use radit_models::model::{ModelError, Precision};
use radit_models::sampler::Solver;
use tch::{Device, Tensor};

use crate::sheet::Tile;

use crate::generate::{
    Conditions, Sampler, read_latents, write_decoded, write_png16, write_samples, write_sheet,
};

/// What to sample.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    /// The model's weights and, for weights that do not carry it, its preset.
    pub weights: PathBuf,
    pub preset: Option<String>,
    pub out: PathBuf,
    /// The conditions to sample (or edit towards), unless `counterfactual` derives them.
    pub target: Conditions,
    /// The original profile, for an edit or a counterfactual.
    pub from: Conditions,
    /// The SCM's counterfactual of `from` under these interventions becomes the target.
    pub counterfactual: Option<Counterfactual>,
    /// Images to edit from `from` to the target (pixel models); empty: sample.
    pub edit: Vec<PathBuf>,
    pub n: u64,
    pub batch: u64,
    pub seed: u64,
    pub solver: Solver,
    /// For a latent model: decode the samples (and the store whose latent statistics undo the standardisation).
    pub decoder: Option<(DecoderConfig, Option<String>)>,
    pub device: Device,
    pub precision: Precision,
}

/// `do(...)` on an original profile through a Flow SCM.
#[derive(Debug, Clone)]
pub struct Counterfactual {
    pub scm: PathBuf,
    pub interventions: String,
    /// Draw a descendant whose observed value is missing (seeded), instead of keeping it missing.
    pub resample_missing: Option<u64>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SampleReport {
    /// One line: how many samples or edits, of what, at what cost.
    pub summary: String,
    pub sheet: PathBuf,
    /// `samples.json`'s content.
    pub json: serde_json::Value,
}

/// Why sampling could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The request does not suit the model (an edit of a latent model, a decoder for a pixel model, no samples).
    #[error("{0}")]
    Request(String),
    #[error("{what}")]
    Model {
        what: String,
        #[source]
        source: ModelError,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn model(what: impl Into<String>) -> impl FnOnce(ModelError) -> SampleError {
    let what = what.into();
    move |source| SampleError::Model { what, source }
}

/// Samples or edits as `req` asks.
pub fn sample(req: &SampleRequest) -> Result<SampleReport, SampleError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SampleError::Io { path, source }
    };
    let target = match &req.counterfactual {
        Some(c) => counterfactual_conditions(c, &req.from, req.device).map_err(model(format!(
            "the counterfactual through {}",
            c.scm.display()
        )))?,
        None => req.target.clone(),
    };
    let sampler = Sampler::load(
        &req.weights,
        req.preset.as_deref(),
        req.device,
        req.precision,
    )
    .map_err(model(format!("loading {}", req.weights.display())))?;
    std::fs::create_dir_all(&req.out).map_err(io(&req.out))?;
    let pixel = sampler.network.in_channels() == 1;
    let started = Instant::now();
    let side = sampler.network.input_size();
    let mut json = serde_json::json!({
        "weights": req.weights, "config": &sampler.network, "solver": req.solver, "seed": req.seed,
        "device": format!("{:?}", req.device), "precision": req.precision, "conditions": target.describe(),
    });
    let sheet = req.out.join("contact_sheet.png");
    let summary = if !req.edit.is_empty() {
        if !pixel {
            return Err(SampleError::Request(
                "--edit needs a pixel model (this one reads latents)".into(),
            ));
        }
        let images = sampler
            .read_images(&req.edit)
            .map_err(model("the images to edit"))?;
        let (edited, abduction, prediction) = sampler
            .edit(&images, &req.from, &target, req.solver)
            .map_err(model("editing"))?;
        let inputs = write_png16(&images, &req.out, "original").map_err(model("writing"))?;
        let outputs = write_png16(&edited, &req.out, "edited").map_err(model("writing"))?;
        let tiles = edit_tiles(&images, &edited, &req.from.caption(), &target.caption());
        let title = match &req.counterfactual {
            Some(c) => format!("counterfactual edits: do({})", c.interventions),
            None => "edits: original, edited, difference".to_string(),
        };
        write_sheet(&title, &tiles, 3, 256.min(side), &[&sheet])
            .map_err(model("the contact sheet"))?;
        json["from"] = req.from.describe().into();
        json["abduction"] = serde_json::to_value(abduction).unwrap_or_default();
        json["prediction"] = serde_json::to_value(prediction).unwrap_or_default();
        json["files"] = serde_json::to_value([inputs, outputs].concat()).unwrap_or_default();
        format!(
            "edited {} image(s) from [{}] to [{}]: abduction {} and prediction {} model evaluations",
            req.edit.len(),
            req.from.describe(),
            target.describe(),
            abduction.nfe,
            prediction.nfe
        )
    } else {
        if req.n == 0 {
            return Err(SampleError::Request("-n must be at least 1".into()));
        }
        if req.decoder.is_some() && pixel {
            return Err(SampleError::Request(
                "--decoder is for latent models (this one makes images)".into(),
            ));
        }
        let written = write_samples(
            &sampler, &target, req.n, req.batch, req.seed, req.solver, &req.out,
        )
        .map_err(model("sampling"))?;
        let nfe: usize = written.solves.iter().map(|s| s.nfe).sum();
        let mut files = written.files.clone();
        if let Some((decoder, store)) = &req.decoder {
            let latents = read_latents(&written.files[0]).map_err(model("the samples' latents"))?;
            let (decoded, _) =
                decode_to(&latents, decoder, store.as_deref(), req.device, &req.out)?;
            files.extend(decoded);
        }
        json["files"] = serde_json::to_value(&files).unwrap_or_default();
        json["solves"] = serde_json::to_value(&written.solves).unwrap_or_default();
        format!(
            "generated {} sample(s) for [{}] with {} model evaluations in {:.1} s",
            req.n,
            target.describe(),
            nfe,
            started.elapsed().as_secs_f64()
        )
    };
    json["seconds"] = started.elapsed().as_secs_f64().into();
    let path = req.out.join("samples.json");
    let bytes = serde_json::to_vec_pretty(&json).unwrap_or_default();
    std::fs::write(&path, bytes).map_err(io(&path))?;
    Ok(SampleReport {
        summary,
        sheet,
        json,
    })
}

/// Rows of (original, edited, difference) for images `[N, 1, S, S]` in [-1, 1]. The difference is |edited -
/// original| stretched so its largest value is white (the gain is in the caption, with the largest change as a
/// share of the range), so that an edit of half a percent is visible and said to be that small.
fn edit_tiles(images: &Tensor, edited: &Tensor, from: &str, to: &str) -> Vec<Tile> {
    (0..images.size()[0])
        .flat_map(|i| {
            let (a, b) = (images.get(i).get(0), edited.get(i).get(0));
            let diff = (&b - &a).abs().to_kind(tch::Kind::Float);
            let largest = diff.max().double_value(&[]).max(1e-12);
            let gain = 2.0 / largest;
            [
                Tile::new(a, format!("#{i} original: {from}")),
                Tile::new(b, format!("#{i} edited: {to}")),
                Tile::new(
                    &diff * gain - 1.0,
                    format!(
                        "#{i} |difference| x{gain:.0}\nlargest {:.2}% of range",
                        largest / 2.0 * 100.0
                    ),
                ),
            ]
        })
        .collect()
}

/// Decodes `latents` with `decoder` into `out`: `decoded_NNNN.png` and `contact_sheet.png`; `store`'s training
/// latent statistics undo the standardisation the model learnt.
pub fn decode_to(
    latents: &Tensor,
    decoder: &DecoderConfig,
    store: Option<&str>,
    device: Device,
    out: &Path,
) -> Result<(Vec<PathBuf>, PathBuf), SampleError> {
    decoder
        .validate("--decoder")
        .map_err(|e| SampleError::Request(format!("{}: {}", e.field, e.reason)))?;
    let stats = store
        .map(autoencoder::store_statistics)
        .transpose()
        .map_err(model("the store's latent statistics"))?;
    let decoder = LatentDecoder::load(decoder, stats, device).map_err(model("the decoder"))?;
    write_decoded(&decoder, latents, out).map_err(model("decoding"))
}

/// The counterfactual of `original` under `interventions` by the SCM at `scm` (dopri5 1e-6; missing values stay
/// missing), as conditions for RadiT.
fn counterfactual_conditions(
    c: &Counterfactual,
    original: &Conditions,
    device: Device,
) -> Result<Conditions, ModelError> {
    use radit_models::scm::{Profiles, infer};
    let loaded = radit_models::scm::load(&c.scm, device)?;
    let interventions = infer::parse_interventions(&loaded.scm, &c.interventions)?;
    let labels: Vec<i64> = original.labels.iter().map(|&c| i64::from(c)).collect();
    let observed = Profiles {
        labels: Tensor::from_slice(&labels).view([1, -1]),
        age: Tensor::from_slice(&[original.age]),
    };
    let cf = infer::counterfactual(
        &loaded.scm,
        &observed,
        &interventions,
        match c.resample_missing {
            Some(seed) => infer::Missing::Resample { seed },
            None => infer::Missing::Keep,
        },
        infer::default_solver(),
    )?;
    let labels = Vec::<i64>::try_from(cf.labels.flatten(0, -1))?;
    Ok(Conditions {
        labels: labels.iter().map(|&c| c as u8).collect(),
        age: cf.age.double_value(&[0]) as f32,
    })
}

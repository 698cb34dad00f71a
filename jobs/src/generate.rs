//! `radit sample`: generate images for given metadata, or edit given images counterfactually, and write them as
//! 16-bit PNGs plus an 8-bit contact sheet a person can look at.

use std::path::{Path, PathBuf};

use radit_sharding::image::{encode_png16, preprocess};
use radit_sharding::schema::Vocabulary;
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn::VarStore};

use radit_models::flow::fill_normal;
use radit_models::model::{ModelError, Precision, load_named, load_weights, read_weights_config};
use radit_models::network::{Architecture, VelocityNet};
use radit_models::sampler::{self, SolveStats, Solver};

/// The stream of a sample's starting noise (with the seed and the sample's index).
const NOISE_STREAM: u64 = 0x5a3b1e;

/// One sample's metadata: a class id per categorical variable (0 = missing) and age in years/100 (NaN = missing).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conditions {
    pub labels: Vec<u8>,
    pub age: f32,
}

impl Conditions {
    /// Row `i` of a shard: its class ids and age.
    pub fn of_row(shard: &radit_sharding::reader::Shard, i: usize) -> Self {
        let variables = shard.labels.len() / shard.rows.max(1);
        Self {
            labels: shard.labels[i * variables..(i + 1) * variables].to_vec(),
            age: shard.age[i],
        }
    }

    /// Everything missing.
    pub fn missing() -> Self {
        Self {
            labels: vec![0; Vocabulary::current().labels.len()],
            age: f32::NAN,
        }
    }

    /// Parses `name=value,...` (e.g. `sex=Female,view=PA,cardiomegaly=positive`) over `self`, and an age in years.
    /// Names and values are the store vocabulary's; an unknown one is an error that lists the valid choices.
    pub fn with(mut self, set: &str, age_years: Option<f32>) -> Result<Self, ModelError> {
        let vocab = Vocabulary::current();
        let bad = |reason: String| ModelError::BadInput {
            input: "metadata",
            reason,
        };
        for item in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("`{item}` is not name=value")))?;
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            let index = vocab.label_index(&name).ok_or_else(|| {
                bad(format!(
                    "unknown variable `{name}` (known: {})",
                    vocab.labels.join(", ")
                ))
            })?;
            let class = vocab.class_id(index, value).ok_or_else(|| {
                bad(format!(
                    "`{value}` is not a class of {name} (classes: {})",
                    vocab.classes[index].join(", ")
                ))
            })?;
            self.labels[index] = class;
        }
        if let Some(years) = age_years {
            if !(years.is_finite() && (0.0..=120.0).contains(&years)) {
                return Err(bad(format!("age {years} is outside 0..=120 years")));
            }
            self.age = years / 100.0;
        }
        Ok(self)
    }

    /// A readable form for captions and reports: only the variables that are set.
    pub fn describe(&self) -> String {
        let vocab = Vocabulary::current();
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != 0)
            .map(|(i, &c)| format!("{}={}", vocab.labels[i], vocab.classes[i][c as usize]))
            .collect();
        if self.age.is_finite() {
            parts.push(format!("age={:.0}", self.age * 100.0));
        }
        if parts.is_empty() {
            "unconditional (all missing)".into()
        } else {
            parts.join(",")
        }
    }

    /// A tile's caption, most telling first: sex, age, view, race and dataset, then the positive findings (`+`),
    /// then how many are negative; missing values are left out.
    pub fn caption(&self) -> String {
        use radit_sharding::schema::{DATASET_INDEX, RACE_INDEX, SEX_INDEX, VIEW_INDEX};
        let vocab = Vocabulary::current();
        let class = |i: usize| {
            let c = *self.labels.get(i)? as usize;
            (c != 0).then(|| vocab.classes[i].get(c).cloned()).flatten()
        };
        let mut first: Vec<String> = Vec::new();
        if let Some(sex) = class(SEX_INDEX) {
            first.push(sex);
        }
        if self.age.is_finite() {
            first.push(format!("{:.0}y", self.age * 100.0));
        }
        for i in [VIEW_INDEX, RACE_INDEX, DATASET_INDEX] {
            first.extend(class(i));
        }
        let findings = 0..radit_sharding::schema::FINDINGS.len();
        let positive: Vec<String> = findings
            .clone()
            .filter(|&i| self.labels.get(i) == Some(&2))
            .map(|i| format!("+{}", vocab.labels[i]))
            .collect();
        let negative = findings.filter(|&i| self.labels.get(i) == Some(&1)).count();
        let mut lines = vec![if first.is_empty() {
            "no demographics".to_string()
        } else {
            first.join(" ")
        }];
        if !positive.is_empty() {
            lines.push(positive.join(" "));
        }
        if negative > 0 {
            lines.push(format!("{negative} negative"));
        }
        if first.is_empty() && positive.is_empty() && negative == 0 {
            return "unconditional".into();
        }
        lines.join("\n")
    }

    fn tensors(&self, n: i64, device: Device) -> (Tensor, Tensor) {
        let labels: Vec<i64> = (0..n)
            .flat_map(|_| self.labels.iter().map(|&c| i64::from(c)))
            .collect();
        let labels = Tensor::from_slice(&labels)
            .view([n, self.labels.len() as i64])
            .to_device(device);
        let age = Tensor::from_slice(&vec![self.age; n as usize]).to_device(device);
        (labels, age)
    }
}

/// A model loaded for sampling: RadiT or RadUNet.
pub struct Sampler {
    _vs: VarStore,
    pub model: Box<dyn VelocityNet>,
    /// Its architecture.
    pub network: Architecture,
    pub device: Device,
}

impl Sampler {
    /// Loads `weights`; the architecture comes from the file's metadata, or from `preset` when the file has none
    /// (e.g. written by PyTorch). A preset that disagrees with the file's metadata is an error.
    pub fn load(
        weights: &Path,
        preset: Option<&str>,
        device: Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let from_file = read_weights_config(weights)?;
        let cfg = match (from_file, preset) {
            (Some(cfg), None) => cfg,
            (None, Some(p)) => Architecture::preset(p)?,
            (Some(cfg), Some(p)) => {
                if cfg != Architecture::preset(p)? {
                    return Err(ModelError::BadWeights {
                        path: weights.display().to_string(),
                        reason: format!(
                            "its config is not the `{p}` preset; drop --preset to use the file's"
                        ),
                    });
                }
                cfg
            }
            (None, None) => {
                return Err(ModelError::BadWeights {
                    path: weights.display().to_string(),
                    reason: "carries no radit.config metadata; name the architecture with --preset"
                        .into(),
                });
            }
        };
        let vs = VarStore::new(device);
        let mut model = cfg.build(&vs.root())?;
        load_weights(&vs, weights)?;
        model.set_precision(precision);
        Ok(Self {
            _vs: vs,
            model,
            network: cfg,
            device,
        })
    }

    /// A model from named weights in memory (the engine's gathered EMA), checked as strictly as a file.
    pub fn from_named(
        cfg: &Architecture,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        device: Device,
        precision: Precision,
    ) -> Result<Self, ModelError> {
        let vs = VarStore::new(device);
        let mut model = cfg.build(&vs.root())?;
        load_named(&vs, tensors, Path::new("<gathered EMA weights>"))?;
        model.set_precision(precision);
        Ok(Self {
            _vs: vs,
            model,
            network: cfg.clone(),
            device,
        })
    }

    /// Starting noise `[n, C, S, S]`: sample i from the stream (seed, `indices[i]`).
    pub fn noise(&self, seed: u64, indices: &[u64]) -> Tensor {
        let (channels, side) = (self.network.in_channels(), self.network.input_size());
        let per = (channels * side * side) as usize;
        let mut data = vec![0f32; per * indices.len()];
        for (chunk, &i) in data.chunks_mut(per).zip(indices) {
            fill_normal(&[seed, i, NOISE_STREAM], chunk);
        }
        Tensor::from_slice(&data)
            .view([indices.len() as i64, channels, side, side])
            .to_device(self.device)
    }

    /// Generates `n` samples (in batches of `batch`); sample i depends only on (seed, i), not on the batching.
    pub fn generate(
        &self,
        cond: &Conditions,
        n: u64,
        batch: u64,
        seed: u64,
        solver: Solver,
    ) -> Result<(Tensor, Vec<SolveStats>), ModelError> {
        self.generate_range(cond, 0..n, batch, seed, solver)
    }

    /// Generates samples `indices` (in batches of `batch`): the same images [`Sampler::generate`] gives them.
    pub fn generate_range(
        &self,
        cond: &Conditions,
        indices: std::ops::Range<u64>,
        batch: u64,
        seed: u64,
        solver: Solver,
    ) -> Result<(Tensor, Vec<SolveStats>), ModelError> {
        let mut out = Vec::new();
        let mut stats = Vec::new();
        let mut start = indices.start;
        let n = indices.end;
        let started = std::time::Instant::now();
        while start < n {
            let end = (start + batch.max(1)).min(n);
            let noise = self.noise(seed, &(start..end).collect::<Vec<_>>());
            let (labels, age) = cond.tensors((end - start) as i64, self.device);
            let (x, s) = sampler::generate(self.model.as_ref(), &noise, &labels, &age, solver)?;
            // A large model's samples take minutes on a CPU: say how far it is, batch by batch.
            tracing::info!(
                drawn = end - indices.start,
                of = n - indices.start,
                model_evaluations = s.nfe,
                seconds = started.elapsed().as_secs_f64(),
                "samples"
            );
            out.push(x.to_device(Device::Cpu));
            stats.push(s);
            start = end;
        }
        Ok((Tensor::cat(&out, 0), stats))
    }

    /// One batch of samples: sample i from the noise stream (seed, `indices[i]`) under `conditions[i]`, solved
    /// together (an adaptive solver's steps depend on the batch, so callers keep their batches fixed).
    pub fn generate_for(
        &self,
        conditions: &[&Conditions],
        indices: &[u64],
        seed: u64,
        solver: Solver,
    ) -> Result<(Tensor, SolveStats), ModelError> {
        let n = indices.len() as i64;
        let noise = self.noise(seed, indices);
        let labels: Vec<i64> = conditions
            .iter()
            .flat_map(|x| x.labels.iter().map(|&v| i64::from(v)))
            .collect();
        let labels = Tensor::from_slice(&labels)
            .view([n, -1])
            .to_device(self.device);
        let age: Vec<f32> = conditions.iter().map(|x| x.age).collect();
        let age = Tensor::from_slice(&age).to_device(self.device);
        let (x, stats) = sampler::generate(self.model.as_ref(), &noise, &labels, &age, solver)?;
        Ok((x.to_device(Device::Cpu), stats))
    }

    /// Reads PNGs (any size, 8- or 16-bit grey) into model inputs the way ingest stores them: full-range
    /// normalisation, letterbox to the model's size, then each level mapped to the centre of its dequantisation bin.
    pub fn read_images(&self, paths: &[PathBuf]) -> Result<Tensor, ModelError> {
        let (channels, size) = (self.network.in_channels(), self.network.input_size());
        if channels != 1 {
            return Err(ModelError::BadInput {
                input: "images",
                reason: format!(
                    "editing images needs a pixel model; this one has {channels} channels"
                ),
            });
        }
        let side = size as u32;
        let mut resizer = fast_image_resize::Resizer::new();
        let mut all = Vec::new();
        for p in paths {
            let bytes = std::fs::read(p).map_err(|e| ModelError::Io {
                path: p.display().to_string(),
                source: e,
            })?;
            let (pixels, _) =
                preprocess(&bytes, side, &mut resizer, &Default::default()).map_err(|e| {
                    ModelError::BadInput {
                        input: "images",
                        reason: format!("{}: {e}", p.display()),
                    }
                })?;
            all.extend(pixels.iter().map(|&n| from_level(n)));
        }
        Ok(Tensor::from_slice(&all).view([paths.len() as i64, 1, size, size]))
    }

    /// Counterfactual edits of `images` from `original` to `edited` metadata.
    pub fn edit(
        &self,
        images: &Tensor,
        original: &Conditions,
        edited: &Conditions,
        solver: Solver,
    ) -> Result<(Tensor, SolveStats, SolveStats), ModelError> {
        let n = images.size()[0];
        let (labels, age) = original.tensors(n, self.device);
        let (new_labels, new_age) = edited.tensors(n, self.device);
        let e = sampler::edit(
            self.model.as_ref(),
            &images.to_device(self.device),
            &labels,
            &age,
            &new_labels,
            &new_age,
            solver,
        )?;
        Ok((e.image.to_device(Device::Cpu), e.abduction, e.prediction))
    }
}

/// A 16-bit level to the centre of its bin in [-1, 1]: x = 2 (n + 0.5) / 65536 - 1 (the inverse of [`to_u16`]).
pub fn from_level(n: u16) -> f32 {
    (2.0 * (f32::from(n) + 0.5)) / 65536.0 - 1.0
}

/// A latent model's samples as `radit sample` writes them: the tensor `latents` of `latents.safetensors`.
pub fn read_latents(path: &Path) -> Result<Tensor, ModelError> {
    let latents = Tensor::read_safetensors(path)
        .map_err(|e| ModelError::BadInput {
            input: "latents",
            reason: format!("{} is not a readable safetensors file: {e}", path.display()),
        })?
        .into_iter()
        .find_map(|(name, t)| (name == "latents").then_some(t))
        .ok_or_else(|| ModelError::BadInput {
            input: "latents",
            reason: format!("{} holds no tensor `latents`", path.display()),
        })?;
    let size = latents.size();
    if !latents.is_floating_point() {
        return Err(ModelError::BadInput {
            input: "latents",
            reason: format!(
                "{}: `latents` holds {:?} values; expected floating point",
                path.display(),
                latents.kind()
            ),
        });
    }
    if size.len() != 4 || size.contains(&0) {
        return Err(ModelError::BadInput {
            input: "latents",
            reason: format!(
                "{}: `latents` has shape {size:?}; expected [N, C, H, W] with no empty side",
                path.display()
            ),
        });
    }
    Ok(latents)
}

/// Model output in [-1, 1] to 16-bit levels: n = clamp(round((x + 1) / 2 * 65536 - 0.5), 0, 65535).
pub fn to_u16(x: &Tensor) -> Result<Vec<u16>, ModelError> {
    let v = Vec::<f32>::try_from(x.to_kind(Kind::Float).clamp(-1.0, 1.0).flatten(0, -1))?;
    Ok(v.iter()
        .map(|&x| {
            ((x + 1.0) / 2.0 * 65536.0 - 0.5)
                .round()
                .clamp(0.0, 65535.0) as u16
        })
        .collect())
}

/// Writes `[N, 1, S, S]` images as `prefix_0000.png` ... (16-bit grey); returns the paths.
pub fn write_png16(images: &Tensor, dir: &Path, prefix: &str) -> Result<Vec<PathBuf>, ModelError> {
    let size = images.size();
    let (n, height, width) = (size[0], size[2], size[3]);
    let mut paths = Vec::new();
    for i in 0..n {
        let pixels = to_u16(&images.get(i))?;
        let path = dir.join(format!("{prefix}_{i:04}.png"));
        write_file(&path, &encode_png16(width as u32, height as u32, &pixels))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Writes beside the target and renames, so a viewer (or a sheet refreshed during training) is never half-written.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let io = |e| ModelError::Io {
        path: path.display().to_string(),
        source: e,
    };
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, bytes).map_err(io)?;
    std::fs::rename(&partial, path).map_err(io)
}

/// Writes a captioned sheet of `tiles` (see [`crate::sheet`]), encoded once, to every path.
pub fn write_sheet(
    title: &str,
    tiles: &[crate::sheet::Tile],
    columns: usize,
    max_tile: i64,
    paths: &[&Path],
) -> Result<(), ModelError> {
    let png = crate::sheet::render(title, tiles, columns, max_tile)?;
    paths.iter().try_for_each(|p| write_file(p, &png))
}

/// What [`write_samples`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenSamples {
    /// 16-bit PNGs for a pixel model; one safetensors file of latents for a latent model (they need the VAE's
    /// decoder to become images).
    pub files: Vec<PathBuf>,
    pub contact_sheet: PathBuf,
    pub solves: Vec<SolveStats>,
}

/// Decodes a latent model's samples with `decoder` into `out`: `decoded_NNNN.png` (16-bit) and `contact_sheet.png`
/// (replacing the sheet of latent channel 0). Returns the PNGs and the sheet.
pub fn write_decoded(
    decoder: &radit_models::autoencoder::LatentDecoder,
    latents: &Tensor,
    out: &Path,
) -> Result<(Vec<PathBuf>, PathBuf), ModelError> {
    let images = decoder.decode(latents)?;
    let files = write_png16(&images, out, "decoded")?;
    let sheet = out.join("contact_sheet.png");
    let title = format!("{} samples, decoded", images.size()[0]);
    sample_sheet(&images, 256.min(images.size()[3]), &title, &[], &[&sheet])?;
    Ok((files, sheet))
}

/// Draws `n` samples for `cond` (sample i depends only on (seed, i)) and writes them and a contact sheet into
/// `out`: what `radit sample` and the end of `radit run` do.
pub fn write_samples(
    sampler: &Sampler,
    cond: &Conditions,
    n: u64,
    batch: u64,
    seed: u64,
    solver: Solver,
    out: &Path,
) -> Result<WrittenSamples, ModelError> {
    std::fs::create_dir_all(out).map_err(|source| ModelError::Io {
        path: out.display().to_string(),
        source,
    })?;
    let (samples, solves) = sampler.generate(cond, n, batch, seed, solver)?;
    let contact_sheet = out.join("contact_sheet.png");
    let what = if sampler.network.in_channels() == 1 {
        ""
    } else {
        " (latent channel 0: decode them to see images)"
    };
    let title = format!("{n} samples for {}{what}", cond.describe());
    sample_sheet(
        &samples,
        256.min(sampler.network.input_size()),
        &title,
        &[],
        &[&contact_sheet],
    )?;
    let files = if sampler.network.in_channels() == 1 {
        write_png16(&samples, out, "sample")?
    } else {
        let path = out.join("latents.safetensors");
        Tensor::write_safetensors(&[("latents", &samples)], &path)?;
        vec![path]
    };
    Ok(WrittenSamples {
        files,
        contact_sheet,
        solves,
    })
}

/// A sheet of samples ([N, C, S, S]; each shown by [`preview`]), about square, under `title`, tile i captioned
/// `#i` and `captions[i]` when given; encoded once and written to every path (`radit sample`'s sheet; the training
/// previews' step sheet and latest.png).
pub fn sample_sheet(
    samples: &Tensor,
    tile: i64,
    title: &str,
    captions: &[String],
    paths: &[&Path],
) -> Result<(), ModelError> {
    let n = samples.size()[0];
    let tiles: Vec<crate::sheet::Tile> = (0..n)
        .map(|i| {
            let caption = match captions.get(i as usize) {
                Some(c) => format!("#{i} {c}"),
                None => format!("#{i}"),
            };
            crate::sheet::Tile::new(preview(&samples.get(i)), caption)
        })
        .collect();
    let columns = (n as f64).sqrt().ceil() as usize;
    write_sheet(title, &tiles, columns, tile, paths)
}

/// What a tile shows: the image itself for pixel models; channel 0 scaled to [-1, 1] for latent models (they need
/// the RadVAE decoder, which radit does not ship, to become images).
pub fn preview(sample: &Tensor) -> Tensor {
    if sample.size()[0] == 1 {
        return sample.get(0);
    }
    let c0 = sample.get(0).to_kind(Kind::Float);
    let (lo, hi) = (c0.min(), c0.max());
    (c0 - &lo) / (hi - &lo).clamp_min(1e-6) * 2.0 - 1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_parses_by_vocabulary_names_and_errors_list_the_choices() {
        let c = Conditions::missing()
            .with("sex=Female, view=PA,cardiomegaly=positive", Some(63.0))
            .unwrap();
        let v = Vocabulary::current();
        assert_eq!(c.labels[v.label_index("sex").unwrap()], 2);
        assert_eq!(c.labels[v.label_index("view").unwrap()], 2);
        assert_eq!(c.labels[v.label_index("cardiomegaly").unwrap()], 2);
        assert!((c.age - 0.63).abs() < 1e-6);
        assert_eq!(
            c.describe(),
            "cardiomegaly=positive,sex=Female,view=PA,age=63"
        );
        let err = Conditions::missing()
            .with("heart=big", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown variable `heart`") && err.contains("cardiomegaly"),
            "{err}"
        );
        let err = Conditions::missing()
            .with("view=sideways", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("AP, PA, Lateral"), "{err}");
        assert!(Conditions::missing().with("", Some(300.0)).is_err());
    }

    #[test]
    fn levels_round_trip_through_the_dequantisation_bin_centres() {
        let levels = [0u16, 1, 2, 32767, 65534, 65535];
        let x: Vec<f32> = levels.iter().map(|&n| from_level(n)).collect();
        assert_eq!(to_u16(&Tensor::from_slice(&x)).unwrap(), levels);
        assert_eq!(
            to_u16(&Tensor::from_slice(&[-3.0f32, 3.0])).unwrap(),
            [0, 65535]
        );
    }
}

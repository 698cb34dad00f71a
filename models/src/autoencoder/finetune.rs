//! RadVAE (LoRA) (../shared/design/radvae.md): FLUX.2's decoder fine-tuned for radiographs with its encoder frozen,
//! so the latents a model trained on stay valid. The released weights stay frozen in a store of their own; what
//! trains (and what the engine replicates, all-reduces and checkpoints) is only the LoRA updates of the target
//! layers and the layers trained in full (the RGB head by default), which start as copies of the released ones. So
//! at step 0 the fine-tuned decoder is FLUX.2's exactly. [`merged_weights`] folds the updates into a plain
//! autoencoder that every decoder setting loads.
//!
//! As a staged model it is one stage: the frozen encoder's mean (no gradient), then the updated decoder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use radit_protocol::ConfigError;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use super::{AeConfig, ConvUpdate, FluxAutoencoder, Grey, LayerUpdates};
use crate::block::ModelInputs;
use crate::error::ModelError;
use crate::lora::{Lora, LoraConfig, matches};
use crate::precision::Precision;
use crate::staged::{StageInputs, StagedModel};

/// `[model.finetune]`: which released autoencoder, and what of its decoder trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// The released autoencoder's weights (FLUX.2's `ae.safetensors`, or a `radit vae init` stand-in): frozen.
    pub base: PathBuf,
    /// The store's image side (FLUX.2's: 512).
    #[serde(default = "default_side")]
    pub image_size: i64,
    /// LoRA updates (none: only the layers of `full` train).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// Decoder layers trained in full, by name pattern: the RGB head (the last norm and convolution) by default.
    #[serde(default = "default_full")]
    pub full: Vec<String>,
    /// How the RGB becomes grey: mean (the paper's) or luma.
    #[serde(default)]
    pub grey: Grey,
}

fn default_side() -> i64 {
    512
}

fn default_full() -> Vec<String> {
    vec!["decoder.norm_out".into(), "decoder.conv_out".into()]
}

impl FinetuneConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.base.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "model.finetune.base",
                "give the released autoencoder's weights file",
            ));
        }
        if self.image_size < 1 {
            return Err(ConfigError::new(
                "model.finetune.image_size",
                format!("{}: positive", self.image_size),
            ));
        }
        if let Some(l) = &self.lora {
            l.validate("model.finetune.lora")?;
        }
        if self.lora.as_ref().is_none_or(|l| l.targets.is_empty()) && self.full.is_empty() {
            return Err(ConfigError::new(
                "model.finetune",
                "nothing trains: give lora.targets or full",
            ));
        }
        Ok(())
    }

    /// The released autoencoder's configuration (what its file says, else FLUX.2's), with this grey step.
    pub fn autoencoder(&self) -> Result<AeConfig, ModelError> {
        match super::resolve(super::AUTO, &self.base)? {
            super::AutoencoderConfig::Flux(c) => Ok(AeConfig {
                grey: self.grey,
                ..c
            }),
            super::AutoencoderConfig::RadVae(_) => Err(ModelError::BadWeights {
                path: self.base.display().to_string(),
                reason: "a RadVAE: the fine-tune adapts FLUX.2's decoder (train RadVAE itself with `radit vae \
                         train`)"
                    .into(),
            }),
        }
    }
}

impl FinetuneConfig {
    /// The paper's RadVAE (LoRA), "LoRA (Up-Blocks, 8, 8)" (radvae.md): rank 8, alpha 8 on the decoder's input
    /// convolution, the mid block's convolutions and attention projections and one residual convolution of each up
    /// block, and the RGB head in full, on the released weights in `base`.
    pub fn lora_up_8_8(base: &Path, image_size: i64) -> Self {
        Self {
            base: base.to_path_buf(),
            image_size,
            lora: Some(LoraConfig {
                rank: 8,
                alpha: 8.0,
                targets: [
                    "decoder.conv_in",
                    "decoder.mid.block_*.conv*",
                    "decoder.mid.attn_1.*",
                    "decoder.up.*.block.2.conv2",
                ]
                .map(String::from)
                .to_vec(),
            }),
            full: default_full(),
            grey: Grey::Mean,
        }
    }
}

/// Which decoder layers train, and how, for one released autoencoder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainedLayers {
    /// Convolutions with a LoRA update: (name, weight shape).
    pub lora: Vec<(String, Vec<i64>)>,
    /// Convolutions trained in full: (name, weight shape).
    pub full_convs: Vec<(String, Vec<i64>)>,
    /// GroupNorms trained in full: (name, channels).
    pub full_norms: Vec<(String, i64)>,
}

impl TrainedLayers {
    /// The layers `cfg` selects of `ae`'s decoder; a pattern that selects nothing is an error naming it (a typo
    /// would otherwise train less than asked, silently).
    pub fn of(ae: &FluxAutoencoder, cfg: &FinetuneConfig) -> Result<Self, ModelError> {
        let super::DecoderLayers { convs, norms } = ae.decoder_layers();
        let full = |name: &str| cfg.full.iter().any(|p| matches(p, name));
        let mut out = Self::default();
        for (name, shape) in &convs {
            if full(name) {
                out.full_convs.push((name.clone(), shape.clone()));
            } else if cfg.lora.as_ref().is_some_and(|l| l.targets(name)) {
                out.lora.push((name.clone(), shape.clone()));
            }
        }
        for (name, c) in &norms {
            if full(name) {
                out.full_norms.push((name.clone(), *c));
            }
        }
        let names: Vec<&str> = convs
            .iter()
            .map(|c| c.0.as_str())
            .chain(norms.iter().map(|n| n.0.as_str()))
            .collect();
        let patterns = cfg
            .lora
            .iter()
            .flat_map(|l| l.targets.iter().map(|p| ("lora.targets", p)))
            .chain(cfg.full.iter().map(|p| ("full", p)));
        for (field, p) in patterns {
            if !names.iter().any(|n| matches(p, n)) {
                return Err(ConfigError::new(
                    format!("model.finetune.{field}"),
                    format!(
                        "{p:?} names no layer of the decoder (its layers are named as `decoder.mid.attn_1.q`, \
                         `decoder.up.3.block.2.conv2`, `decoder.conv_out`, ...)"
                    ),
                )
                .into());
            }
        }
        Ok(out)
    }

    /// Trainable parameters.
    pub fn parameters(&self, rank: i64) -> u64 {
        let lora: i64 = self
            .lora
            .iter()
            .map(|(_, s)| rank * s[1..].iter().product::<i64>() + s[0] * rank)
            .sum();
        let convs: i64 = self
            .full_convs
            .iter()
            .map(|(_, s)| s.iter().product::<i64>() + s[0])
            .sum();
        let norms: i64 = self.full_norms.iter().map(|(_, c)| 2 * c).sum();
        (lora + convs + norms) as u64
    }
}

/// The trainable parameters of a fine-tune (the released autoencoder is built on the CPU to match its layers).
pub fn trainable_parameters(cfg: &FinetuneConfig) -> Result<u64, ModelError> {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let ae = tch::no_grad(|| FluxAutoencoder::new(&vs.root(), &cfg.autoencoder()?))?;
    let rank = cfg.lora.as_ref().map_or(0, |l| l.rank);
    Ok(TrainedLayers::of(&ae, cfg)?.parameters(rank))
}

/// The frozen autoencoder with its decoder's trainable updates.
pub struct DecoderFinetune {
    /// The released weights, frozen, apart from the engine's variables.
    frozen: nn::VarStore,
    ae: FluxAutoencoder,
    updates: LayerUpdates,
    side: i64,
    precision: Precision,
}

impl std::fmt::Debug for DecoderFinetune {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderFinetune")
            .field("side", &self.side)
            .finish_non_exhaustive()
    }
}

/// A layer's path under `p` from its dotted name.
fn under<'a>(p: &nn::Path<'a>, name: &str) -> nn::Path<'a> {
    name.split('.').fold(p.clone(), |path, part| &path / part)
}

impl DecoderFinetune {
    /// Loads the released autoencoder (frozen, on `p`'s device) and makes the trainable updates under `p`: for a
    /// LoRA target `L`, `L.lora_A.weight` and `L.lora_B.weight`; for a layer trained in full, its own parameters
    /// under its own name, copied from the released ones.
    pub fn new(p: &nn::Path, cfg: &FinetuneConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let ae_cfg = cfg.autoencoder()?;
        let mut frozen = nn::VarStore::new(p.device());
        let ae = FluxAutoencoder::new(&frozen.root(), &ae_cfg)?;
        super::load(
            &frozen,
            &super::AutoencoderConfig::Flux(ae_cfg.clone()),
            &cfg.base,
        )?;
        frozen.freeze();
        let layers = TrainedLayers::of(&ae, cfg)?;
        let released = frozen.variables();
        let copy = |name: &str, mut var: Tensor| -> Result<Tensor, ModelError> {
            let src = released.get(name).ok_or_else(|| ModelError::BadWeights {
                path: cfg.base.display().to_string(),
                reason: format!("no {name}"),
            })?;
            tch::no_grad(|| var.copy_(src));
            Ok(var)
        };
        let mut updates = LayerUpdates::default();
        if let Some(l) = &cfg.lora {
            for (name, shape) in &layers.lora {
                let lora = Lora::new(&under(p, name), shape[0], shape[1], Some(shape[2]), l);
                updates.convs.insert(name.clone(), ConvUpdate::Lora(lora));
            }
        }
        for (name, shape) in &layers.full_convs {
            let at = under(p, name);
            let weight = copy(&format!("{name}.weight"), at.zeros("weight", shape))?;
            let bias = copy(&format!("{name}.bias"), at.zeros("bias", &[shape[0]]))?;
            updates.convs.insert(
                name.clone(),
                ConvUpdate::Replace {
                    weight,
                    bias: Some(bias),
                },
            );
        }
        for (name, c) in &layers.full_norms {
            let at = under(p, name);
            let weight = copy(&format!("{name}.weight"), at.ones("weight", &[*c]))?;
            let bias = copy(&format!("{name}.bias"), at.zeros("bias", &[*c]))?;
            updates.norms.insert(name.clone(), (weight, bias));
        }
        Ok(Self {
            frozen,
            ae,
            updates,
            side: cfg.image_size,
            precision: Precision::Fp32,
        })
    }

    /// Greyscale reconstructions of images `x` `[B, 1, H, W]` in [-1, 1] through the frozen encoder's mean and
    /// the updated decoder.
    pub fn reconstruct(&self, x: &Tensor) -> Tensor {
        let kind = self.precision.compute_kind();
        let z = tch::no_grad(|| self.ae.encode_mean(&x.to_kind(kind)));
        self.ae.decode_with(&z, &self.updates).to_kind(Kind::Float)
    }
}

impl StagedModel for DecoderFinetune {
    fn groups(&self) -> Vec<String> {
        vec!["rest".into()]
    }

    fn group_of(&self, _name: &str) -> usize {
        0
    }

    fn stages(&self) -> usize {
        1
    }

    fn stage_of(&self, _name: &str) -> usize {
        0
    }

    fn check_inputs(&self, inputs: &ModelInputs) -> Result<(), ModelError> {
        let size = inputs.x.size();
        let f = self.ae.config.downsampling();
        if size.len() != 4 || size[1] != 1 || size[2] % f != 0 || size[3] % f != 0 || size[0] == 0 {
            return Err(ModelError::BadInput {
                input: "images",
                reason: format!(
                    "{size:?}; expected [batch, 1, H, W] with H and W multiples of {f}"
                ),
            });
        }
        Ok(())
    }

    fn stage(
        &self,
        _i: usize,
        _values: &[Tensor],
        at: &StageInputs,
    ) -> Result<Vec<Tensor>, ModelError> {
        Ok(vec![self.reconstruct(at.inputs.x)])
    }

    fn set_precision(&mut self, precision: Precision) {
        // The frozen weights in the compute kind (the trainable ones stay fp32 masters, cast per use).
        self.frozen.set_kind(precision.compute_kind());
        self.precision = precision;
    }
}

/// The plain autoencoder of a fine-tune: the released weights with every LoRA update folded in and the layers
/// trained in full replaced, under the original names, for a file any decoder setting loads.
pub fn merged_weights(
    cfg: &FinetuneConfig,
    trained: &BTreeMap<String, Tensor>,
) -> Result<(AeConfig, BTreeMap<String, Tensor>), ModelError> {
    let ae_cfg = cfg.autoencoder()?;
    let released = crate::model::read_weights(&cfg.base)?;
    let mut merged = super::names::to_original(released.tensors, &ae_cfg, &cfg.base)?;
    let scale = cfg.lora.as_ref().map_or(1.0, LoraConfig::scale);
    let mut loras: HashMap<&str, (Option<&Tensor>, Option<&Tensor>)> = HashMap::new();
    for (name, t) in trained {
        if let Some(layer) = name.strip_suffix(".lora_A.weight") {
            loras.entry(layer).or_default().0 = Some(t);
        } else if let Some(layer) = name.strip_suffix(".lora_B.weight") {
            loras.entry(layer).or_default().1 = Some(t);
        } else {
            let slot = merged.get_mut(name).ok_or_else(|| ModelError::BadWeights {
                path: cfg.base.display().to_string(),
                reason: format!(
                    "the fine-tune trained {name}, which the released autoencoder lacks"
                ),
            })?;
            *slot = t.to_kind(Kind::Float);
        }
    }
    for (layer, (a, b)) in loras {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(ModelError::BadWeights {
                path: cfg.base.display().to_string(),
                reason: format!("{layer} has half a LoRA update"),
            });
        };
        let key = format!("{layer}.weight");
        let weight = merged.get(&key).ok_or_else(|| ModelError::BadWeights {
            path: cfg.base.display().to_string(),
            reason: format!("a LoRA update of {layer}, which the released autoencoder lacks"),
        })?;
        let lora = Lora {
            a: a.shallow_clone(),
            b: b.shallow_clone(),
            scale,
        };
        let folded = lora.merged(weight);
        merged.insert(key, folded);
    }
    Ok((ae_cfg, merged))
}

/// Writes the merged autoencoder of `trained` to `path` (see [`merged_weights`]), with `extra` metadata.
pub fn save_merged(
    cfg: &FinetuneConfig,
    trained: &BTreeMap<String, Tensor>,
    extra: &[(&str, &str)],
    path: &Path,
) -> Result<(), ModelError> {
    let (ae_cfg, merged) = merged_weights(cfg, trained)?;
    super::save_named(
        &merged,
        &super::AutoencoderConfig::Flux(ae_cfg),
        extra,
        path,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny(dir: &Path) -> FinetuneConfig {
        let base = dir.join("tiny-ae.safetensors");
        super::super::write_random(&super::super::AeConfig::tiny().into(), 3, &base).unwrap();
        FinetuneConfig {
            base,
            image_size: 16,
            lora: Some(LoraConfig {
                rank: 2,
                alpha: 4.0,
                targets: vec![
                    "decoder.conv_in".into(),
                    "decoder.mid.attn_1.*".into(),
                    "decoder.up.*.block.1.conv2".into(),
                ],
            }),
            full: default_full(),
            grey: Grey::Mean,
        }
    }

    #[test]
    fn it_starts_as_the_released_decoder_and_merges_into_a_plain_one() {
        tch::manual_seed(0);
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny(dir.path());
        let vs = nn::VarStore::new(Device::Cpu);
        let ft = DecoderFinetune::new(&vs.root(), &cfg).unwrap();
        let x = Tensor::rand([2, 1, 16, 16], tch::kind::FLOAT_CPU) * 2.0 - 1.0;
        let plain_vs = nn::VarStore::new(Device::Cpu);
        let plain_cfg = super::super::AutoencoderConfig::Flux(cfg.autoencoder().unwrap());
        let plain = super::super::Autoencoder::new(&plain_vs.root(), &plain_cfg).unwrap();
        super::super::load(&plain_vs, &plain_cfg, &cfg.base).unwrap();
        let released = plain.decode(&plain.encode_mean(&x).unwrap()).unwrap();
        // Step 0 is FLUX.2's decoder exactly (B is zero, the head a copy).
        let start = ft.reconstruct(&x);
        assert_eq!((&start - &released).abs().max().double_value(&[]), 0.0);
        // Only the updates train: 2 x (A, B) per LoRA layer (conv_in, q, k, v, proj_out, one per up level) and
        // the head's four tensors.
        let names: Vec<String> = vs.variables().keys().cloned().collect();
        assert_eq!(names.len(), 2 * (1 + 4 + 2) + 4, "{names:?}");
        assert!(names.contains(&"decoder.mid.attn_1.q.lora_A.weight".to_string()));
        // Moved updates: the branches and the merged plain decoder agree to fp32 rounding.
        tch::no_grad(|| {
            for (_, mut t) in vs.variables() {
                let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.05));
            }
        });
        let tuned = ft.reconstruct(&x);
        assert!((&tuned - &start).abs().max().double_value(&[]) > 1e-4);
        let trained: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
        let out = dir.path().join("merged.safetensors");
        save_merged(&cfg, &trained, &[], &out).unwrap();
        let merged_vs = nn::VarStore::new(Device::Cpu);
        let found = super::super::resolve(super::super::AUTO, &out).unwrap();
        let merged = super::super::Autoencoder::new(&merged_vs.root(), &found).unwrap();
        super::super::load(&merged_vs, &found, &out).unwrap();
        let again = merged.decode(&merged.encode_mean(&x).unwrap()).unwrap();
        let err = (&again - &tuned).abs().max().double_value(&[]);
        assert!(err < 1e-5, "merged vs unmerged: {err}");
    }

    /// The paper's best decoder fine-tune, LoRA (Up-Blocks, 8, 8) with the RGB head, trains the design note's
    /// "about 0.32M" parameters of FLUX.2's decoder.
    #[test]
    fn the_papers_lora_up_8_8_trains_about_a_third_of_a_million_parameters() {
        let vs = nn::VarStore::new(Device::Cpu);
        let ae = tch::no_grad(|| FluxAutoencoder::new(&vs.root(), &AeConfig::flux2())).unwrap();
        let cfg = FinetuneConfig::lora_up_8_8(Path::new("unused"), 512);
        let layers = TrainedLayers::of(&ae, &cfg).unwrap();
        // conv_in, the mid block's four convolutions and four attention projections, one per up level.
        assert_eq!(layers.lora.len(), 1 + 4 + 4 + 4);
        assert_eq!(layers.parameters(8), 319_363);
    }

    #[test]
    fn a_pattern_naming_no_layer_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny(dir.path());
        cfg.full = vec!["decoder.norm_outt".into()];
        let vs = nn::VarStore::new(Device::Cpu);
        let err = DecoderFinetune::new(&vs.root(), &cfg)
            .unwrap_err()
            .to_string();
        assert!(err.contains("decoder.norm_outt"), "{err}");
    }
}

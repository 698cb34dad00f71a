//! The networks radit trains, behind one config: the velocity networks RadiT (a chain of transformer blocks, which
//! the sharded engine can train) and RadUNet (EDM2's U-Net, trained data-parallel), both behind [`VelocityNet`],
//! and the autoencoder RadVAE (Scratch), trained data-parallel on a reconstruction objective.

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use crate::autoencoder::finetune::{DecoderFinetune, FinetuneConfig};
use crate::error::ModelError;
use crate::model::{RadiT, RadiTConfig};
use crate::precision::Precision;
use crate::predictor::{Predictor, PredictorConfig};
use crate::staged::{Chain, StagedModel};
use crate::unet::vae::{RADVAE_PRESETS, RadVae, RadVaeConfig};
use crate::unet::{RadUNet, UNetConfig};

/// A network's velocity v(x, t, metadata) without dropout: what samplers and evaluation call.
pub trait VelocityNet: Send {
    /// [B, C, S, S] fp32 from x [B, C, S, S], t [B], labels [B, V] and age [B].
    fn velocity(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
    ) -> Result<Tensor, ModelError>;
    fn set_precision(&mut self, precision: Precision);
}

impl VelocityNet for RadiT {
    fn velocity(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.forward(x, t, labels, age)
    }

    fn set_precision(&mut self, precision: Precision) {
        RadiT::set_precision(self, precision);
    }
}

impl VelocityNet for RadUNet {
    fn velocity(
        &self,
        x: &Tensor,
        t: &Tensor,
        labels: &Tensor,
        age: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.forward(x, t, labels, age)
    }

    fn set_precision(&mut self, precision: Precision) {
        RadUNet::set_precision(self, precision);
    }
}

/// Which network, with its whole architecture. Serialised as the inner config alone (RadiT's fields, the U-Net's
/// or the autoencoder's: each set of fields is its own), so a checkpoint written before the U-Net existed keeps
/// its model hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Architecture {
    RadiT(RadiTConfig),
    UNet(UNetConfig),
    RadVae(RadVaeConfig),
    /// RadVAE (LoRA): a released FLUX.2 autoencoder's decoder, fine-tuned.
    VaeFinetune(FinetuneConfig),
    /// A metadata predictor (a probe on a frozen Rad-DINO, or a ResNet-50).
    Predictor(PredictorConfig),
}

/// What a network is trained to do, which decides the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A velocity v(x_t, t, metadata): the rectified-flow objective.
    Velocity,
    /// An autoencoder: reconstruction of its input.
    Autoencoder,
    /// A metadata predictor: cross-entropy per variable and the squared error of age.
    Predictor,
}

impl Architecture {
    /// A RadiT preset (`b-pixel`, `tiny`, ...), a U-Net preset (`unet-pixel`, `unet-latent`, `unet-tiny`) or an
    /// autoencoder's (`radvae`, `radvae-tiny`).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        if crate::unet::UNET_PRESETS.contains(&name) {
            return Ok(Self::UNet(UNetConfig::preset(name)?));
        }
        if RADVAE_PRESETS.contains(&name) {
            return Ok(Self::RadVae(RadVaeConfig::preset(name)?));
        }
        match RadiTConfig::preset(name) {
            Ok(c) => Ok(Self::RadiT(c)),
            Err(ModelError::UnknownPreset { name, known }) => Err(ModelError::UnknownPreset {
                name,
                known: format!(
                    "{known}, {}, {}",
                    crate::unet::UNET_PRESETS.join(", "),
                    RADVAE_PRESETS.join(", ")
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// The same architecture at another input side (a store's image side, or its latents').
    pub fn with_input_size(self, side: i64) -> Self {
        match self {
            Self::RadiT(c) => Self::RadiT(RadiTConfig {
                input_size: side,
                ..c
            }),
            Self::UNet(c) => Self::UNet(UNetConfig {
                img_resolution: side,
                ..c
            }),
            Self::RadVae(c) => Self::RadVae(RadVaeConfig {
                img_resolution: side,
                ..c
            }),
            Self::VaeFinetune(c) => Self::VaeFinetune(FinetuneConfig {
                image_size: side,
                ..c
            }),
            Self::Predictor(c) => Self::Predictor(PredictorConfig {
                image_size: side,
                ..c
            }),
        }
    }

    pub fn validate(&self) -> Result<(), radit_protocol::ConfigError> {
        match self {
            Self::RadiT(c) => c.validate(),
            Self::UNet(c) => c.validate().map_err(config_error),
            Self::RadVae(c) => c.validate().map_err(config_error),
            Self::VaeFinetune(c) => c.validate(),
            Self::Predictor(c) => c.validate(),
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Self::RadiT(_) | Self::UNet(_) => Role::Velocity,
            Self::RadVae(_) | Self::VaeFinetune(_) => Role::Autoencoder,
            Self::Predictor(_) => Role::Predictor,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::RadiT(_) => "RadiT",
            Self::UNet(_) => "RadUNet",
            Self::RadVae(_) => "RadVAE",
            Self::VaeFinetune(_) => "RadVAE (LoRA)",
            Self::Predictor(_) => "a metadata predictor",
        }
    }

    pub fn in_channels(&self) -> i64 {
        match self {
            Self::RadiT(c) => c.in_channels,
            Self::UNet(c) => c.img_channels,
            Self::RadVae(c) => c.img_channels,
            Self::VaeFinetune(_) | Self::Predictor(_) => 1,
        }
    }

    pub fn input_size(&self) -> i64 {
        match self {
            Self::RadiT(c) => c.input_size,
            Self::UNet(c) => c.img_resolution,
            Self::RadVae(c) => c.img_resolution,
            Self::VaeFinetune(c) => c.image_size,
            Self::Predictor(c) => c.image_size,
        }
    }

    pub fn classes(&self) -> &[i64] {
        match self {
            Self::RadiT(c) => &c.classes,
            Self::UNet(c) => &c.classes,
            // An autoencoder reads no metadata; a predictor makes it.
            Self::RadVae(_) | Self::VaeFinetune(_) | Self::Predictor(_) => &[],
        }
    }

    /// Whether it is a chain of blocks the sharded engine can train (RadiT); a U-Net or RadVAE trains
    /// data-parallel.
    pub fn is_chain(&self) -> bool {
        matches!(self, Self::RadiT(_))
    }

    /// Trainable parameters.
    pub fn parameters(&self) -> u64 {
        match self {
            Self::RadiT(c) => c.parameter_count().total() as u64,
            Self::UNet(c) => c.parameter_count().total(),
            Self::RadVae(c) => c.parameter_count(),
            // The trainable ones (the updates), counted on the released autoencoder's layers.
            Self::VaeFinetune(c) => {
                crate::autoencoder::finetune::trainable_parameters(c).unwrap_or(0)
            }
            Self::Predictor(c) => c.parameters().unwrap_or(0),
        }
    }

    /// What the throughput counts per image: RadiT's tokens, a U-Net's or an autoencoder's input cells.
    pub fn tokens_per_image(&self) -> u64 {
        match self {
            Self::RadiT(c) => c.tokens() as u64,
            Self::UNet(c) => (c.img_resolution * c.img_resolution) as u64,
            Self::RadVae(c) => (c.img_resolution * c.img_resolution) as u64,
            Self::VaeFinetune(c) => (c.image_size * c.image_size) as u64,
            Self::Predictor(c) => (c.image_size * c.image_size) as u64,
        }
    }

    /// One forward's FLOPs for one image (one model evaluation of a sampler).
    pub fn forward_flops_per_image(&self) -> f64 {
        match self {
            Self::RadiT(c) => c.forward_flops_per_token() * c.tokens() as f64,
            Self::UNet(c) => c.flops_per_image(),
            Self::RadVae(c) => c.flops_per_image(),
            Self::VaeFinetune(c) => c.autoencoder().map_or(0.0, |a| {
                a.encoder_flops(c.image_size) + a.decoder_flops(c.image_size)
            }),
            Self::Predictor(c) => c.forward_flops().unwrap_or(0.0),
        }
    }

    /// Training FLOPs (forward and backward, 3x the forward) per counted token.
    pub fn training_flops_per_token(&self) -> f64 {
        match self {
            Self::RadiT(c) => c.training_flops_per_token(),
            Self::UNet(_) | Self::RadVae(_) | Self::VaeFinetune(_) | Self::Predictor(_) => {
                3.0 * self.forward_flops_per_image() / self.tokens_per_image() as f64
            }
        }
    }

    /// The velocity network, for sampling and evaluation; an autoencoder is refused (it has no velocity).
    pub fn build(&self, p: &nn::Path) -> Result<Box<dyn VelocityNet>, ModelError> {
        Ok(match self {
            Self::RadiT(c) => Box::new(RadiT::new(p, c)?),
            Self::UNet(c) => Box::new(RadUNet::new(p, c)?),
            Self::RadVae(_) | Self::VaeFinetune(_) => {
                return Err(ModelError::BadInput {
                    input: "model",
                    reason: format!(
                        "{} is an autoencoder, not a velocity network: it encodes and decodes (`radit \
                         encode`, `radit decode`, [samples.decoder]) and samples nothing",
                        self.name()
                    ),
                });
            }
            Self::Predictor(_) => {
                return Err(ModelError::BadInput {
                    input: "model",
                    reason: "a metadata predictor, not a velocity network: `radit predictors eval` runs it"
                        .into(),
                });
            }
        })
    }

    /// Writes trained weights (by name, as the engine gathers them) as the file their users load: a velocity
    /// network's model file (`radit generate`, `radit sample`), an autoencoder's file (`radit encode`, `radit
    /// decode`, `[samples.decoder]`). `extra` goes into the metadata.
    pub fn save_trained(
        &self,
        named: &std::collections::BTreeMap<String, Tensor>,
        extra: &[(&str, &str)],
        path: &std::path::Path,
    ) -> Result<(), ModelError> {
        match self {
            Self::RadVae(c) => crate::autoencoder::save_named(
                named,
                &crate::autoencoder::AutoencoderConfig::RadVae(c.clone()),
                extra,
                path,
            ),
            // The plain autoencoder, the updates folded in.
            Self::VaeFinetune(c) => {
                crate::autoencoder::finetune::save_merged(c, named, extra, path)
            }
            velocity => crate::model::save_named_weights_with(named, velocity, extra, path),
        }
    }

    /// The network as stages, for the data-parallel engine.
    pub fn build_staged(&self, p: &nn::Path) -> Result<Box<dyn StagedModel>, ModelError> {
        Ok(match self {
            Self::RadiT(c) => Box::new(Chain::new(Box::new(RadiT::new(p, c)?))),
            Self::UNet(c) => Box::new(RadUNet::new(p, c)?),
            Self::RadVae(c) => Box::new(RadVae::new(p, c)?),
            Self::VaeFinetune(c) => Box::new(DecoderFinetune::new(p, c)?),
            Self::Predictor(c) => Box::new(Predictor::new(p, c)?),
        })
    }
}

fn config_error(e: ModelError) -> radit_protocol::ConfigError {
    match e {
        ModelError::InvalidConfig(c) => c,
        other => radit_protocol::ConfigError::new("model", other.to_string()),
    }
}

impl From<RadiTConfig> for Architecture {
    fn from(c: RadiTConfig) -> Self {
        Self::RadiT(c)
    }
}

impl From<UNetConfig> for Architecture {
    fn from(c: UNetConfig) -> Self {
        Self::UNet(c)
    }
}

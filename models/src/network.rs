//! The velocity networks radit trains, behind one config and one trait: RadiT (a chain of transformer blocks,
//! which the sharded engine can train) and RadUNet (EDM2's U-Net, trained data-parallel).

use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

use crate::error::ModelError;
use crate::model::{RadiT, RadiTConfig};
use crate::precision::Precision;
use crate::staged::{Chain, StagedModel};
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

/// Which network, with its whole architecture. Serialised as the inner config alone (RadiT's fields or the
/// U-Net's), so a checkpoint written before the U-Net existed keeps its model hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Architecture {
    RadiT(RadiTConfig),
    UNet(UNetConfig),
}

impl Architecture {
    /// A RadiT preset (`b-pixel`, `tiny`, ...) or a U-Net preset (`unet-pixel`, `unet-latent`, `unet-tiny`).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        if crate::unet::UNET_PRESETS.contains(&name) {
            return Ok(Self::UNet(UNetConfig::preset(name)?));
        }
        match RadiTConfig::preset(name) {
            Ok(c) => Ok(Self::RadiT(c)),
            Err(ModelError::UnknownPreset { name, known }) => Err(ModelError::UnknownPreset {
                name,
                known: format!("{known}, {}", crate::unet::UNET_PRESETS.join(", ")),
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
        }
    }

    pub fn validate(&self) -> Result<(), radit_protocol::ConfigError> {
        match self {
            Self::RadiT(c) => c.validate(),
            Self::UNet(c) => c.validate().map_err(|e| match e {
                ModelError::InvalidConfig(c) => c,
                other => radit_protocol::ConfigError::new("model", other.to_string()),
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::RadiT(_) => "RadiT",
            Self::UNet(_) => "RadUNet",
        }
    }

    pub fn in_channels(&self) -> i64 {
        match self {
            Self::RadiT(c) => c.in_channels,
            Self::UNet(c) => c.img_channels,
        }
    }

    pub fn input_size(&self) -> i64 {
        match self {
            Self::RadiT(c) => c.input_size,
            Self::UNet(c) => c.img_resolution,
        }
    }

    pub fn classes(&self) -> &[i64] {
        match self {
            Self::RadiT(c) => &c.classes,
            Self::UNet(c) => &c.classes,
        }
    }

    /// Whether it is a chain of blocks the sharded engine can train (RadiT); a U-Net trains data-parallel.
    pub fn is_chain(&self) -> bool {
        matches!(self, Self::RadiT(_))
    }

    /// Trainable parameters.
    pub fn parameters(&self) -> u64 {
        match self {
            Self::RadiT(c) => c.parameter_count().total() as u64,
            Self::UNet(c) => c.parameter_count().total(),
        }
    }

    /// What the throughput counts per image: RadiT's tokens, a U-Net's input cells.
    pub fn tokens_per_image(&self) -> u64 {
        match self {
            Self::RadiT(c) => c.tokens() as u64,
            Self::UNet(c) => (c.img_resolution * c.img_resolution) as u64,
        }
    }

    /// One forward's FLOPs for one image (one model evaluation of a sampler).
    pub fn forward_flops_per_image(&self) -> f64 {
        match self {
            Self::RadiT(c) => c.forward_flops_per_token() * c.tokens() as f64,
            Self::UNet(c) => c.flops_per_image(),
        }
    }

    /// Training FLOPs (forward and backward, 3x the forward) per counted token.
    pub fn training_flops_per_token(&self) -> f64 {
        match self {
            Self::RadiT(c) => c.training_flops_per_token(),
            Self::UNet(c) => 3.0 * c.flops_per_image() / self.tokens_per_image() as f64,
        }
    }

    /// The network for sampling and evaluation.
    pub fn build(&self, p: &nn::Path) -> Result<Box<dyn VelocityNet>, ModelError> {
        Ok(match self {
            Self::RadiT(c) => Box::new(RadiT::new(p, c)?),
            Self::UNet(c) => Box::new(RadUNet::new(p, c)?),
        })
    }

    /// The network as stages, for the data-parallel engine.
    pub fn build_staged(&self, p: &nn::Path) -> Result<Box<dyn StagedModel>, ModelError> {
        Ok(match self {
            Self::RadiT(c) => Box::new(Chain::new(Box::new(RadiT::new(p, c)?))),
            Self::UNet(c) => Box::new(RadUNet::new(p, c)?),
        })
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

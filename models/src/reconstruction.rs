//! The reconstruction objective an autoencoder trains on (../shared/design/latents.md, RadVAE (Scratch), and
//! radvae.md): w_L1 ‖x − D(E(x))‖₁ + β KL + λ d_RadDINO(x, D(E(x))), with the paper's β = 0 and λ = 250. Each term
//! is a per-sample mean (L1 over pixels, KL over latent elements [CHOICE: the paper gives no normalisation, and its
//! β is 0]), the perceptual distance as `features::perceptual` defines it, on images mapped from [-1, 1] to
//! [0, 1]. The same loss is the validation loss, so the best checkpoint is chosen by what is trained.

use std::path::PathBuf;

use radit_protocol::ConfigError;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::ModelError;
use crate::features::{LayerReduce, PerceptualDistance};

/// The `[reconstruction]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconstructionConfig {
    /// Weight of the L1 term.
    #[serde(default = "one")]
    pub l1: f64,
    /// β, the KL term's weight (0 in Table 7: the latent is left unregularised).
    #[serde(default)]
    pub kl: f64,
    /// λ, the Rad-DINO perceptual distance's weight (250 in Table 7; 0 turns it off).
    #[serde(default = "default_lambda")]
    pub perceptual: f64,
    /// The Rad-DINO snapshot (a Hugging Face DINOv2 directory with its processor); needed when λ > 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perceptual_net: Option<PathBuf>,
    /// How the layers' distances combine: sum (the paper's, as reconstructed) or mean.
    #[serde(default)]
    pub layers: LayerReduce,
}

fn one() -> f64 {
    1.0
}

fn default_lambda() -> f64 {
    250.0
}

impl Default for ReconstructionConfig {
    fn default() -> Self {
        Self {
            l1: 1.0,
            kl: 0.0,
            perceptual: default_lambda(),
            perceptual_net: None,
            layers: LayerReduce::Sum,
        }
    }
}

impl ReconstructionConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("l1", self.l1),
            ("kl", self.kl),
            ("perceptual", self.perceptual),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::new(
                    format!("reconstruction.{field}"),
                    format!("a weight must be finite and not negative, got {v}"),
                ));
            }
        }
        if self.l1 + self.kl + self.perceptual == 0.0 {
            return Err(ConfigError::new(
                "reconstruction",
                "every weight is 0: nothing would be trained",
            ));
        }
        match (&self.perceptual_net, self.perceptual > 0.0) {
            (None, true) => Err(ConfigError::new(
                "reconstruction.perceptual_net",
                format!(
                    "the perceptual term (weight {}) needs the Rad-DINO snapshot directory; or set \
                     reconstruction.perceptual = 0",
                    self.perceptual
                ),
            )),
            (Some(p), true) if p.as_os_str().is_empty() => Err(ConfigError::new(
                "reconstruction.perceptual_net",
                "an empty path",
            )),
            _ => Ok(()),
        }
    }
}

/// The loss, with its perceptual network loaded once.
pub struct ReconstructionLoss {
    cfg: ReconstructionConfig,
    perceptual: Option<PerceptualDistance>,
}

impl ReconstructionLoss {
    /// Loads the perceptual network (frozen) onto `device` when its weight is not 0.
    pub fn open(cfg: &ReconstructionConfig, device: Device) -> Result<Self, ModelError> {
        let perceptual = match (&cfg.perceptual_net, cfg.perceptual > 0.0) {
            (Some(dir), true) => Some(PerceptualDistance::load(dir, cfg.layers, device)?),
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            perceptual,
        })
    }

    pub fn config(&self) -> &ReconstructionConfig {
        &self.cfg
    }

    /// Per-sample losses `[B]` of the network's outputs (the reconstruction, then the latent's mean and
    /// log-variance, which the KL term reads) against the images `x` `[B, C, H, W]` in [-1, 1].
    pub fn per_sample(&self, x: &Tensor, outputs: &[Tensor]) -> Result<Tensor, ModelError> {
        let bad = |reason: String| ModelError::BadInput {
            input: "reconstruction",
            reason,
        };
        let y = outputs
            .first()
            .ok_or_else(|| bad("the network made no output".into()))?;
        if y.size() != x.size() {
            return Err(bad(format!(
                "{:?} for images {:?}: an autoencoder reconstructs its input's shape",
                y.size(),
                x.size()
            )));
        }
        let dims = [1i64, 2, 3];
        let y = y.to_kind(Kind::Float);
        let x = x.to_kind(Kind::Float);
        let mut loss = (&y - &x)
            .abs()
            .mean_dim(dims.as_slice(), false, Kind::Float)
            * self.cfg.l1;
        if self.cfg.kl > 0.0 {
            let (Some(mean), Some(logvar)) = (outputs.get(1), outputs.get(2)) else {
                return Err(bad(
                    "the KL term needs the latent's mean and log-variance, which this network does not hand \
                     over: set reconstruction.kl = 0"
                        .into(),
                ));
            };
            let (mean, logvar) = (mean.to_kind(Kind::Float), logvar.to_kind(Kind::Float));
            let kl = (mean.square() + logvar.exp() - 1.0 - &logvar) * 0.5;
            loss += kl.mean_dim(dims.as_slice(), false, Kind::Float) * self.cfg.kl;
        }
        if let Some(p) = &self.perceptual {
            let unit = |v: &Tensor| (v + 1.0) / 2.0;
            loss += p.distance(&unit(&x), &unit(&y))? * self.cfg.perceptual;
        }
        Ok(loss)
    }

    /// The batch's mean loss.
    pub fn loss(&self, x: &Tensor, outputs: &[Tensor]) -> Result<Tensor, ModelError> {
        Ok(self.per_sample(x, outputs)?.mean(Kind::Float))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_term_is_its_per_sample_mean_and_weights_are_checked() {
        let x = Tensor::from_slice(&[0.0f32, 0.5, -0.5, 1.0]).view([2, 1, 1, 2]);
        let y = Tensor::from_slice(&[0.5f32, 0.5, 0.5, 1.0]).view([2, 1, 1, 2]);
        let mean = Tensor::from_slice(&[1.0f32, 0.0]).view([2, 1, 1, 1]);
        let logvar = Tensor::from_slice(&[0.0f32, 2.0]).view([2, 1, 1, 1]);
        let cfg = ReconstructionConfig {
            l1: 2.0,
            kl: 0.5,
            perceptual: 0.0,
            ..Default::default()
        };
        cfg.validate().unwrap();
        let loss = ReconstructionLoss::open(&cfg, Device::Cpu).unwrap();
        let got = Vec::<f32>::try_from(loss.per_sample(&x, &[y, mean, logvar]).unwrap()).unwrap();
        // Sample 0: L1 mean 0.25, KL 0.5 (1 + 1 - 1 - 0) = 0.5. Sample 1: L1 0.5, KL 0.5 (e^2 - 1 - 2).
        let kl1 = 0.5 * (2f32.exp() - 3.0);
        let want = [2.0 * 0.25 + 0.5 * 0.5, 2.0 * 0.5 + 0.5 * kl1];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        let missing = ReconstructionConfig::default().validate().unwrap_err();
        assert_eq!(missing.field, "reconstruction.perceptual_net");
        let negative = ReconstructionConfig {
            kl: -1.0,
            ..cfg.clone()
        };
        assert_eq!(negative.validate().unwrap_err().field, "reconstruction.kl");
        // The KL term without the moments is named, not a panic.
        let x2 = x.copy();
        let err = loss.per_sample(&x, &[x2]).unwrap_err().to_string();
        assert!(err.contains("reconstruction.kl = 0"), "{err}");
    }
}

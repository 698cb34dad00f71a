//! The Rad-DINO perceptual distance (../shared/design/radvae.md, the paper's Eq. 13): grey images in [0, 1]
//! repeated to RGB, a differentiable bicubic resize to the network's side, the processor's mean and std; every
//! layer's tokens, each L2-normalised (eps 1e-6); the squared difference averaged over tokens and channels; summed
//! (or averaged) over layers. Differentiable in both images, so it is a training loss (the decoder fine-tuning's and
//! RadVAE's) and, without gradients, the identity metric of the editing evaluation: one code path.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::Dinov2Net;
use crate::error::ModelError;

/// How the layers' distances combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerReduce {
    #[default]
    Sum,
    Mean,
}

/// A frozen DINOv2 (Rad-DINO) as a perceptual distance.
pub struct PerceptualDistance {
    net: Dinov2Net,
    reduce: LayerReduce,
}

impl PerceptualDistance {
    /// Loads a Hugging Face DINOv2 snapshot (Rad-DINO's, or a random stand-in for tests) with its processor.
    pub fn load(dir: &Path, reduce: LayerReduce, device: Device) -> Result<Self, ModelError> {
        let net = Dinov2Net::load(dir, "processor", device)?;
        // The input size is known now, not at the first distance.
        net.preprocessing()
            .input_size()
            .ok_or_else(|| ModelError::BadWeights {
                path: dir.join("preprocessor_config.json").display().to_string(),
                reason: "neither a crop nor a resize: the network's input size is unknown".into(),
            })?;
        Ok(Self { net, reduce })
    }

    /// d(x, y) per sample `[B]` of grey images `[B, 1, H, W]` in [0, 1] (any H, W; both the same shape).
    pub fn distance(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, ModelError> {
        let (sx, sy) = (x.size(), y.size());
        if sx.len() != 4 || sx[1] != 1 || sx != sy {
            return Err(ModelError::BadInput {
                input: "images",
                reason: format!("{sx:?} and {sy:?}; expected two [batch, 1, H, W] of one shape"),
            });
        }
        let features = |images: &Tensor| -> Result<Vec<Tensor>, ModelError> {
            let pixels = self.net.unit_input(images)?;
            Ok(self.net.network().layer_outputs(&pixels))
        };
        let unit = |t: &Tensor| {
            let norm = t
                .norm_scalaropt_dim(2.0, [-1].as_slice(), true)
                .clamp_min(1e-6);
            t / norm
        };
        let (fx, fy) = (features(x)?, features(y)?);
        let per_layer: Vec<Tensor> = fx
            .iter()
            .zip(&fy)
            .map(|(a, b)| {
                (unit(a) - unit(b))
                    .square()
                    .mean_dim([1, 2].as_slice(), false, Kind::Float)
            })
            .collect();
        let layers = per_layer.len() as f64;
        let total =
            Tensor::stack(&per_layer, 0).sum_dim_intlist([0].as_slice(), false, Kind::Float);
        Ok(match self.reduce {
            LayerReduce::Sum => total,
            LayerReduce::Mean => total / layers,
        })
    }
}

//! Feature networks for evaluation: greyscale images in, one vector per image out, behind one trait. The
//! backends: a native DINOv2-family ViT loading a Hugging Face snapshot (Rad-DINO) with its processor's exact
//! preprocessing ([`Dinov2Net`]), a native DINOv3 ViT the same way ([`Dinov3Net`], Table 9), the FID Inception ([`InceptionNet`], Table 10), and a TorchScript module a user exported with its own preprocessing
//! (evaluation.md C.5: traced at its fixed input size, e.g. Inception at 299), which radit hands the images as
//! [`TorchScriptNet`] documents. The native DINOv2 also gives [`PerceptualDistance`], the Rad-DINO distance that
//! trains the decoders and measures identity preservation.

mod dinov2;
mod dinov3;
mod inception;
mod perceptual;
mod preprocess;

pub(crate) use dinov2::read_json;
pub use dinov2::{Dinov2, Dinov2Config, Dinov2Net, write_random_snapshot};
pub use dinov3::{Dinov3, Dinov3Config, Dinov3Net};
pub use inception::{FidInception, InceptionNet};
pub use perceptual::{LayerReduce, PerceptualDistance};
pub use preprocess::{Preprocessing, ProcessorConfig};

use std::path::Path;

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::error::ModelError;

/// A feature network by path: a directory is a DINOv2 or DINOv3 snapshot (with `preprocessing`, `processor` or
/// `chexgenbench`), a `.safetensors` file the FID Inception, any other file a TorchScript module of input side
/// `input_size`.
pub fn load_net(
    path: &Path,
    input_size: Option<i64>,
    preprocessing: &str,
    device: Device,
) -> Result<Box<dyn FeatureNet>, ModelError> {
    if path.is_dir() {
        // The snapshot's config says which family it is (DINOv3's model_type is `dinov3_vit`).
        let config: serde_json::Value = read_json(&path.join("config.json"))?;
        return Ok(match config["model_type"].as_str() {
            Some("dinov3_vit") => Box::new(Dinov3Net::load(path, preprocessing, device)?),
            _ => Box::new(Dinov2Net::load(path, preprocessing, device)?),
        });
    }
    // The FID Inception, converted by scripts/export-fid-inception.py (its safetensors file says so).
    if path.extension().is_some_and(|e| e == "safetensors") {
        return Ok(Box::new(InceptionNet::load(path, device)?));
    }
    let size = input_size.ok_or_else(|| ModelError::BadInput {
        input: "input size",
        reason: format!(
            "{} is a TorchScript module: give its input side",
            path.display()
        ),
    })?;
    Ok(Box::new(TorchScriptNet::load(path, size, device)?))
}

/// The shape of a batch of grey images `[B, 1, H, W]`, or an error saying what was given.
pub(crate) fn grey_batch(images: &Tensor) -> Result<Vec<i64>, ModelError> {
    let shape = images.size();
    if shape.len() != 4 || shape[1] != 1 {
        return Err(ModelError::BadInput {
            input: "images",
            reason: format!("shape {shape:?}; expected [batch, 1, H, W]"),
        });
    }
    Ok(shape)
}

/// A snapshot's `model.safetensors` (names mapped by `rename`) loaded strictly into a frozen network that `build`
/// makes on a fresh `VarStore`; with the first 16 hex digits of the file's sha256, for the network's id.
pub(crate) fn load_snapshot_weights<N>(
    weights: &Path,
    device: Device,
    rename: impl FnOnce(
        std::collections::BTreeMap<String, Tensor>,
    ) -> std::collections::BTreeMap<String, Tensor>,
    build: impl FnOnce(&tch::nn::Path) -> N,
) -> Result<(tch::nn::VarStore, N, String), ModelError> {
    let bytes = std::fs::read(weights).map_err(|source| ModelError::Io {
        path: weights.display().to_string(),
        source,
    })?;
    let tensors = rename(crate::model::read_weights(weights)?.tensors);
    let mut vs = tch::nn::VarStore::new(device);
    let net = build(&vs.root());
    crate::model::load_named(&vs, &tensors, weights)?;
    vs.freeze();
    let hash = hex::encode(Sha256::digest(&bytes));
    Ok((vs, net, hash[..16].to_string()))
}

/// Images to feature vectors.
pub trait FeatureNet {
    /// Features `[B, D]` (f32, on the CPU) of images `[B, 1, H, W]` in [0, 1].
    fn features(&self, images: &Tensor) -> Result<Tensor, ModelError>;
    /// What the features are of (the network file's hash and its input), for reports and cache keys.
    fn id(&self) -> &str;
}

/// A TorchScript module taking `[B, 3, S, S]` in [0, 1] and returning `[B, D]`. radit resizes the images to S
/// (bilinear, align_corners = false, no antialiasing) when they are not S already and repeats the grey channel;
/// everything else (normalisation, the network's own resizing) is the module's.
pub struct TorchScriptNet {
    module: tch::CModule,
    size: i64,
    device: Device,
    id: String,
}

impl TorchScriptNet {
    pub fn load(path: &Path, size: i64, device: Device) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if size <= 0 {
            return Err(ModelError::BadInput {
                input: "input size",
                reason: format!("{size}: the module's input side must be positive"),
            });
        }
        let mut module =
            tch::CModule::load_on_device(path, device).map_err(|e| ModelError::BadWeights {
                path: path.display().to_string(),
                reason: format!("not a TorchScript module: {e}"),
            })?;
        module.set_eval();
        let hash = hex::encode(Sha256::digest(&bytes));
        Ok(Self {
            module,
            size,
            device,
            id: format!("torchscript:{}@{size}", &hash[..16]),
        })
    }
}

impl FeatureNet for TorchScriptNet {
    fn features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let shape = grey_batch(images)?;
        let out = tch::no_grad(|| -> Result<Tensor, ModelError> {
            let mut x = images.to_device(self.device).to_kind(Kind::Float);
            if shape[2] != self.size || shape[3] != self.size {
                x = x.upsample_bilinear2d([self.size, self.size], false, None, None);
            }
            Ok(self.module.forward_ts(&[x.repeat([1, 3, 1, 1])])?)
        })?;
        let got = out.size();
        if got.len() != 2 || got[0] != shape[0] {
            return Err(ModelError::BadInput {
                input: "feature network",
                reason: format!(
                    "returned shape {got:?} for {} images; a feature network returns [batch, D]",
                    shape[0]
                ),
            });
        }
        Ok(out.to_kind(Kind::Float).to_device(Device::Cpu))
    }

    fn id(&self) -> &str {
        &self.id
    }
}

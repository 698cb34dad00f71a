//! DINOv3's vision transformer (Table 9's feature network: ViT-B/16 [RECON size]) in tch, loading a Hugging Face
//! snapshot (`config.json` with `model_type = "dinov3_vit"`, `model.safetensors`, `preprocessor_config.json`) by
//! parameter name, strictly. What sets it apart from DINOv2: no learned positions but rotary embeddings (RoPE) of
//! each patch's centre in [-1, 1] (angles 2π c f with f = θ^(-4k/d), k < d/4, for y then x, the whole repeated
//! twice), applied to the queries and keys of the patch tokens only; register tokens after the CLS token; a key
//! projection without bias; an MLP of `intermediate_size` (or a gated one). The feature is the CLS token after the
//! final LayerNorm (transformers' `pooler_output`). Its processor rescales to [0, 1] before resizing (bilinear,
//! antialiased, in fp32) and normalises with ImageNet's mean and std ([`Preprocessing`]'s `rescale_first`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor, nn};

use super::FeatureNet;
use super::preprocess::{Preprocessing, ProcessorConfig};
use crate::error::ModelError;

/// The fields of a transformers `DINOv3ViTConfig` the forward pass needs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Dinov3Config {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub patch_size: i64,
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "yes")]
    pub query_bias: bool,
    #[serde(default)]
    pub key_bias: bool,
    #[serde(default = "yes")]
    pub value_bias: bool,
    #[serde(default = "yes")]
    pub proj_bias: bool,
    #[serde(default = "yes")]
    pub mlp_bias: bool,
    #[serde(default)]
    pub use_gated_mlp: bool,
    #[serde(default)]
    pub num_register_tokens: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_channels() -> i64 {
    3
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    100.0
}
fn yes() -> bool {
    true
}
fn default_act() -> String {
    "gelu".into()
}

impl Dinov3Config {
    fn check(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |reason: String| ModelError::BadWeights {
            path: path.display().to_string(),
            reason,
        };
        if !matches!(self.hidden_act.as_str(), "gelu" | "silu") {
            return Err(bad(format!(
                "hidden_act `{}`: only gelu (exact) and silu are supported",
                self.hidden_act
            )));
        }
        if self.num_channels != 3 {
            return Err(bad(format!(
                "num_channels {}: radit feeds 3 channels (grey repeated)",
                self.num_channels
            )));
        }
        let sizes = [
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.patch_size,
        ];
        if sizes.iter().any(|&v| v <= 0)
            || self.num_register_tokens < 0
            || self.hidden_size % self.num_attention_heads != 0
            || (self.hidden_size / self.num_attention_heads) % 4 != 0
        {
            return Err(bad(format!(
                "sizes {sizes:?}: positive, with a head width (hidden_size / num_attention_heads) divisible by 4 \
                 for the 2-D rotary embedding"
            )));
        }
        Ok(())
    }

    fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
}

struct Layer {
    norm1: nn::LayerNorm,
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    scale1: Tensor,
    norm2: nn::LayerNorm,
    gate: Option<nn::Linear>,
    up: nn::Linear,
    down: nn::Linear,
    scale2: Tensor,
}

/// The network on a `VarStore` path, with the hub's parameter names.
pub struct Dinov3 {
    config: Dinov3Config,
    cls_token: Tensor,
    register_tokens: Tensor,
    patch: nn::Conv2D,
    layers: Vec<Layer>,
    norm: nn::LayerNorm,
}

impl Dinov3 {
    pub fn new(p: &nn::Path, config: &Dinov3Config) -> Self {
        let d = config.hidden_size;
        let ln = nn::LayerNormConfig {
            eps: config.layer_norm_eps,
            ..Default::default()
        };
        let linear = |q: nn::Path, i: i64, o: i64, bias: bool| {
            nn::linear(
                q,
                i,
                o,
                nn::LinearConfig {
                    bias,
                    ..Default::default()
                },
            )
        };
        let m = config.intermediate_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = p / "layer" / i;
                let a = &l / "attention";
                let mlp = &l / "mlp";
                Layer {
                    norm1: nn::layer_norm(&l / "norm1", vec![d], ln),
                    q: linear(&a / "q_proj", d, d, config.query_bias),
                    k: linear(&a / "k_proj", d, d, config.key_bias),
                    v: linear(&a / "v_proj", d, d, config.value_bias),
                    o: linear(&a / "o_proj", d, d, config.proj_bias),
                    scale1: (&l / "layer_scale1").ones("lambda1", &[d]),
                    norm2: nn::layer_norm(&l / "norm2", vec![d], ln),
                    gate: config
                        .use_gated_mlp
                        .then(|| linear(&mlp / "gate_proj", d, m, config.mlp_bias)),
                    up: linear(&mlp / "up_proj", d, m, config.mlp_bias),
                    down: linear(&mlp / "down_proj", m, d, config.mlp_bias),
                    scale2: (&l / "layer_scale2").ones("lambda1", &[d]),
                }
            })
            .collect();
        let e = p / "embeddings";
        Self {
            config: config.clone(),
            cls_token: e.zeros("cls_token", &[1, 1, d]),
            register_tokens: e.zeros("register_tokens", &[1, config.num_register_tokens, d]),
            patch: nn::conv2d(
                &e / "patch_embeddings",
                config.num_channels,
                d,
                config.patch_size,
                nn::ConvConfig {
                    stride: config.patch_size,
                    ..Default::default()
                },
            ),
            layers,
            norm: nn::layer_norm(p / "norm", vec![d], ln),
        }
    }

    /// The rotary embedding's (cos, sin), `[h w, head_dim]`, of an `h` x `w` patch grid: each patch centre
    /// ((i + 1/2) / n) mapped to [-1, 1], row-major, (y, x).
    fn rope(&self, h: i64, w: i64, device: Device) -> (Tensor, Tensor) {
        let head = self.config.head_dim();
        let quarter = head / 4;
        let inv_freq: Vec<f32> = (0..quarter)
            .map(|k| {
                let exponent = (4 * k) as f32 / head as f32;
                1.0 / (self.config.rope_theta as f32).powf(exponent)
            })
            .collect();
        let inv_freq = Tensor::from_slice(&inv_freq).to_device(device);
        let centres = |n: i64| {
            let c = Tensor::arange(n, (Kind::Float, device)) + 0.5;
            (c / n as f64) * 2.0 - 1.0
        };
        let ys = centres(h)
            .view([h, 1])
            .expand([h, w], false)
            .reshape([h * w, 1]);
        let xs = centres(w)
            .view([1, w])
            .expand([h, w], false)
            .reshape([h * w, 1]);
        let coords = Tensor::cat(&[ys, xs], 1); // [hw, 2]
        let angles =
            (coords.unsqueeze(2) * inv_freq.view([1, 1, quarter])) * (2.0 * std::f64::consts::PI);
        let angles = angles.flatten(1, 2).repeat([1, 2]);
        (angles.cos(), angles.sin())
    }

    /// Every token after the final LayerNorm, `[B, 1 + R + (H/p)(W/p), D]`, of normalised pixels `[B, 3, H, W]`.
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let (b, h, w) = (pixels.size()[0], pixels.size()[2], pixels.size()[3]);
        let p = self.config.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = pixels.apply(&self.patch).flatten(2, 3).transpose(1, 2);
        let mut x = Tensor::cat(
            &[
                self.cls_token.expand([b, 1, -1], false),
                self.register_tokens.expand([b, -1, -1], false),
                patches,
            ],
            1,
        );
        let (cos, sin) = self.rope(gh, gw, pixels.device());
        let prefix = 1 + self.config.num_register_tokens;
        let heads = self.config.num_attention_heads;
        let rotate = |t: &Tensor| {
            // Only the patch tokens turn; the CLS and register tokens carry no position.
            let n = t.size()[2];
            let head = t.narrow(2, 0, prefix);
            let tail = t.narrow(2, prefix, n - prefix);
            let half = tail.size()[3] / 2;
            let rotated = Tensor::cat(&[-tail.narrow(3, half, half), tail.narrow(3, 0, half)], 3);
            Tensor::cat(&[head, &tail * &cos + rotated * &sin], 2)
        };
        for layer in &self.layers {
            let y = x.apply(&layer.norm1);
            let n = y.size()[1];
            let split = |t: Tensor| t.view([b, n, heads, -1]).transpose(1, 2);
            let attended = Tensor::scaled_dot_product_attention::<Tensor>(
                &rotate(&split(y.apply(&layer.q))),
                &rotate(&split(y.apply(&layer.k))),
                &split(y.apply(&layer.v)),
                None,
                0.0,
                false,
                None,
                false,
            )
            .transpose(1, 2)
            .reshape([b, n, -1]);
            x = &x + attended.apply(&layer.o) * &layer.scale1;
            let y = x.apply(&layer.norm2);
            let act = |t: Tensor| {
                if self.config.hidden_act == "silu" {
                    t.silu()
                } else {
                    t.gelu("none")
                }
            };
            let hidden = match &layer.gate {
                Some(gate) => act(y.apply(gate)) * y.apply(&layer.up),
                None => act(y.apply(&layer.up)),
            };
            x = &x + hidden.apply(&layer.down) * &layer.scale2;
        }
        x.apply(&self.norm)
    }
}

/// A DINOv3 snapshot as a feature network: its processor's preprocessing, then the CLS token.
pub struct Dinov3Net {
    _vs: nn::VarStore,
    net: Dinov3,
    preprocessing: Preprocessing,
    device: Device,
    id: String,
}

/// The hub's names (`layer.N.`, what transformers saves); its in-memory `model.layer.N.` is accepted too, and
/// `mask_token` (pretraining only) is dropped.
fn model_names(tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    tensors
        .into_iter()
        .filter(|(name, _)| name != "embeddings.mask_token")
        .map(|(name, t)| match name.strip_prefix("model.") {
            Some(rest) => (rest.to_string(), t),
            None => (name, t),
        })
        .collect()
}

impl Dinov3Net {
    /// Loads `dir`, strictly: every parameter present with its shape and none left over.
    pub fn load(dir: &Path, chain: &str, device: Device) -> Result<Self, ModelError> {
        let file = |name: &str| -> PathBuf { dir.join(name) };
        let config: Dinov3Config = super::read_json(&file("config.json"))?;
        config.check(&file("config.json"))?;
        let processor: ProcessorConfig = super::read_json(&file("preprocessor_config.json"))?;
        let preprocessing =
            Preprocessing::rescaled_first(chain, processor, &file("preprocessor_config.json"))?;
        let (vs, net, hash) =
            super::load_snapshot_weights(&file("model.safetensors"), device, model_names, |p| {
                Dinov3::new(p, &config)
            })?;
        let id = format!("dinov3:{hash}@{}", preprocessing.id());
        Ok(Self {
            _vs: vs,
            net,
            preprocessing,
            device,
            id,
        })
    }
}

impl FeatureNet for Dinov3Net {
    fn features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let pixels = self.preprocessing.apply(images)?;
        let out = tch::no_grad(|| self.net.forward(&pixels.to_device(self.device)));
        Ok(out.select(1, 0).to_kind(Kind::Float).to_device(Device::Cpu))
    }

    fn id(&self) -> &str {
        &self.id
    }
}

//! A DINOv2-family vision transformer (Rad-DINO is one: ViT-B/14 at 518) in tch, loading a Hugging Face snapshot
//! directory (`config.json`, `model.safetensors`, `preprocessor_config.json`) by parameter name. Pre-LN blocks
//! (eps from the config), q/k/v with bias, LayerScale, exact-erf GELU MLP, final LayerNorm; the feature is the CLS
//! token after it (transformers' `pooler_output`). It is differentiable, so later work can use it as a perceptual
//! network. Both namings of the weights load: the released one (`attention.attention.query`,
//! `attention.output.dense`) and transformers 5's (`attention.q_proj`, `attention.o_proj`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor, nn};

use super::FeatureNet;
use super::preprocess::{Preprocessing, ProcessorConfig};
use crate::error::ModelError;

/// The fields of a transformers `Dinov2Config` the forward pass needs; the rest of `config.json` is ignored.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Dinov2Config {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub patch_size: i64,
    pub image_size: i64,
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_channels() -> i64 {
    3
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}

impl Dinov2Config {
    fn check(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |reason: String| ModelError::BadWeights {
            path: path.display().to_string(),
            reason,
        };
        if self.use_swiglu_ffn {
            return Err(bad("use_swiglu_ffn = true (the giant DINOv2): only the GELU MLP of the ViT-S/B/L family is supported".into()));
        }
        if self.hidden_act != "gelu" {
            return Err(bad(format!(
                "hidden_act `{}`: only `gelu` (exact) is supported",
                self.hidden_act
            )));
        }
        if self.num_channels != 3 {
            return Err(bad(format!(
                "num_channels {}: radit feeds 3 channels (grey repeated)",
                self.num_channels
            )));
        }
        let positive = [
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.patch_size,
            self.image_size,
        ];
        if positive.iter().any(|&v| v <= 0) || self.hidden_size % self.num_attention_heads != 0 {
            return Err(bad(format!(
                "sizes {positive:?} must be positive with hidden_size divisible by num_attention_heads"
            )));
        }
        Ok(())
    }

    fn mlp_width(&self) -> i64 {
        (self.hidden_size as f64 * self.mlp_ratio) as i64
    }

    fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

struct Layer {
    norm1: nn::LayerNorm,
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    output: nn::Linear,
    scale1: Tensor,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    scale2: Tensor,
}

/// The network on a `VarStore` path, with the released parameter names.
pub struct Dinov2 {
    config: Dinov2Config,
    cls_token: Tensor,
    position_embeddings: Tensor,
    patch: nn::Conv2D,
    layers: Vec<Layer>,
    layernorm: nn::LayerNorm,
}

impl Dinov2 {
    pub fn new(p: &nn::Path, config: &Dinov2Config) -> Self {
        let d = config.hidden_size;
        let ln = nn::LayerNormConfig {
            eps: config.layer_norm_eps,
            ..Default::default()
        };
        let e = p / "embeddings";
        let positions = config.grid() * config.grid() + 1;
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
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = p / "encoder" / "layer" / i;
                let a = &l / "attention";
                Layer {
                    norm1: nn::layer_norm(&l / "norm1", vec![d], ln),
                    query: linear(&a / "attention" / "query", d, d, config.qkv_bias),
                    key: linear(&a / "attention" / "key", d, d, config.qkv_bias),
                    value: linear(&a / "attention" / "value", d, d, config.qkv_bias),
                    output: linear(&a / "output" / "dense", d, d, true),
                    scale1: (&l / "layer_scale1").ones("lambda1", &[d]),
                    norm2: nn::layer_norm(&l / "norm2", vec![d], ln),
                    fc1: linear(&l / "mlp" / "fc1", d, config.mlp_width(), true),
                    fc2: linear(&l / "mlp" / "fc2", config.mlp_width(), d, true),
                    scale2: (&l / "layer_scale2").ones("lambda1", &[d]),
                }
            })
            .collect();
        Self {
            config: config.clone(),
            cls_token: e.zeros("cls_token", &[1, 1, d]),
            position_embeddings: e.randn_standard("position_embeddings", &[1, positions, d]),
            patch: nn::conv2d(
                &e / "patch_embeddings" / "projection",
                config.num_channels,
                d,
                config.patch_size,
                nn::ConvConfig {
                    stride: config.patch_size,
                    ..Default::default()
                },
            ),
            layers,
            layernorm: nn::layer_norm(p / "layernorm", vec![d], ln),
        }
    }

    /// The position table for an `h` x `w` patch grid: the learned one at its own square grid, otherwise its patch
    /// part resized bicubically (align_corners = false, in fp32) as transformers does.
    fn positions(&self, h: i64, w: i64) -> Tensor {
        let table = &self.position_embeddings;
        let own = table.size()[1] - 1;
        if h * w == own && h == w {
            return table.shallow_clone();
        }
        let g = self.config.grid();
        let d = self.config.hidden_size;
        let patches = table
            .narrow(1, 1, own)
            .reshape([1, g, g, d])
            .permute([0, 3, 1, 2])
            .upsample_bicubic2d([h, w], false, None, None)
            .permute([0, 2, 3, 1])
            .reshape([1, h * w, d]);
        Tensor::cat(&[table.narrow(1, 0, 1), patches], 1)
    }

    /// Every token after the final LayerNorm, `[B, 1 + (H/p)(W/p), D]`, of normalised pixels `[B, 3, H, W]`.
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let layers = self.layer_outputs(pixels);
        match layers.last() {
            Some(x) => x.apply(&self.layernorm),
            None => self.embed(pixels).apply(&self.layernorm),
        }
    }

    /// Each layer's tokens `[B, 1 + (H/p)(W/p), D]` (transformers' `hidden_states[1..]`, before the final LayerNorm),
    /// differentiable in the pixels: what the perceptual distance compares.
    pub fn layer_outputs(&self, pixels: &Tensor) -> Vec<Tensor> {
        let b = pixels.size()[0];
        let mut x = self.embed(pixels);
        let heads = self.config.num_attention_heads;
        let split = |t: Tensor| {
            let n = t.size()[1];
            t.view([b, n, heads, -1]).transpose(1, 2)
        };
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let y = x.apply(&layer.norm1);
            let n = y.size()[1];
            let attended = Tensor::scaled_dot_product_attention::<Tensor>(
                &split(y.apply(&layer.query)),
                &split(y.apply(&layer.key)),
                &split(y.apply(&layer.value)),
                None,
                0.0,
                false,
                None,
                false,
            )
            .transpose(1, 2)
            .reshape([b, n, -1]);
            // Out of place: the differentiable use keeps `x` for LayerNorm's backward.
            x = &x + attended.apply(&layer.output) * &layer.scale1;
            let y = x
                .apply(&layer.norm2)
                .apply(&layer.fc1)
                .gelu("none")
                .apply(&layer.fc2);
            x = &x + y * &layer.scale2;
            out.push(x.shallow_clone());
        }
        out
    }

    /// The patch embedding with the CLS token and positions.
    fn embed(&self, pixels: &Tensor) -> Tensor {
        let (b, h, w) = (pixels.size()[0], pixels.size()[2], pixels.size()[3]);
        let p = self.config.patch_size;
        let x = pixels.apply(&self.patch).flatten(2, 3).transpose(1, 2);
        let x = Tensor::cat(&[self.cls_token.expand([b, 1, -1], false), x], 1);
        x + self.positions(h / p, w / p)
    }
}

/// A released or transformers-5 name in the released naming; `mask_token` (a pretraining-only parameter) is
/// dropped.
fn released_names(tensors: BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    tensors
        .into_iter()
        .filter(|(name, _)| name != "embeddings.mask_token")
        .map(|(name, t)| {
            // Files saved from `Dinov2Model` carry no prefix; a `Dinov2ForImageClassification` file would.
            let name = name.strip_prefix("dinov2.").unwrap_or(&name).to_string();
            let name = name
                .replace(".attention.q_proj.", ".attention.attention.query.")
                .replace(".attention.k_proj.", ".attention.attention.key.")
                .replace(".attention.v_proj.", ".attention.attention.value.")
                .replace(".attention.o_proj.", ".attention.output.dense.");
            (name, t)
        })
        .collect()
}

/// A DINOv2 snapshot as a feature network: its processor's preprocessing (or CheXGenBench's chain before it), then
/// the CLS token.
pub struct Dinov2Net {
    _vs: nn::VarStore,
    net: Dinov2,
    preprocessing: Preprocessing,
    device: Device,
    id: String,
}

/// A JSON file of a snapshot, its errors naming the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::BadWeights {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

impl Dinov2Net {
    /// Loads `dir` (a Hugging Face snapshot of a `Dinov2Model`: config.json, model.safetensors,
    /// preprocessor_config.json), strictly: every parameter present with its shape and none left over.
    pub fn load(dir: &Path, chain: &str, device: Device) -> Result<Self, ModelError> {
        let file = |name: &str| -> PathBuf { dir.join(name) };
        let config: Dinov2Config = read_json(&file("config.json"))?;
        config.check(&file("config.json"))?;
        let processor: ProcessorConfig = read_json(&file("preprocessor_config.json"))?;
        let preprocessing =
            Preprocessing::new(chain, processor, &file("preprocessor_config.json"))?;
        let (vs, net, hash) = super::load_snapshot_weights(
            &file("model.safetensors"),
            device,
            released_names,
            |p| Dinov2::new(p, &config),
        )?;
        let id = format!("dinov2:{hash}@{}", preprocessing.id());
        Ok(Self {
            _vs: vs,
            net,
            preprocessing,
            device,
            id,
        })
    }

    pub fn network(&self) -> &Dinov2 {
        &self.net
    }

    pub fn preprocessing(&self) -> &Preprocessing {
        &self.preprocessing
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn config(&self) -> &Dinov2Config {
        &self.net.config
    }

    /// The frozen weights in `kind` (bf16 for a frozen backbone on GPUs).
    pub fn set_kind(&mut self, kind: tch::Kind) {
        self._vs.set_kind(kind);
    }

    /// Grey images `[B, 1, H, W]` in [0, 1] as the network's input, differentiably: repeated to RGB, a bicubic
    /// resize to the processor's side, its mean and std (no rounding to 8-bit levels). What the perceptual distance
    /// and the metadata predictors feed the network.
    pub fn unit_input(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let (h, w) = self
            .preprocessing
            .input_size()
            .ok_or_else(|| ModelError::BadInput {
                input: "feature network",
                reason: "its processor has neither a crop nor a resize: the input size is unknown"
                    .into(),
            })?;
        let rgb = images
            .to_device(self.device)
            .to_kind(tch::Kind::Float)
            .repeat([1, 3, 1, 1]);
        let sized = rgb.upsample_bicubic2d([h, w], false, None, None);
        Ok(self.preprocessing.normalise_unit(&sized))
    }
}

/// Writes a small DINOv2 snapshot with random weights (seeded) into `dir`, in the layout of a Hugging Face
/// snapshot (`config.json`, `model.safetensors`, `preprocessor_config.json`, Rad-DINO's processor at 1/8 of its
/// size): a stand-in for Rad-DINO, to try the evaluation path offline. Its features measure nothing.
pub fn write_random_snapshot(dir: &Path, seed: i64) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = serde_json::json!({
        "model_type": "dinov2",
        "architectures": ["Dinov2Model"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 56,
        "num_channels": 3,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "qkv_bias": true,
        "use_swiglu_ffn": false,
        "layerscale_value": 1.0,
        "radit_note": "random weights written by `radit eval random-dinov2`: for trying the evaluation path only"
    });
    let processor = serde_json::json!({
        "do_resize": true,
        "size": {"shortest_edge": 64},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": 56, "width": 56},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.5307, 0.5307, 0.5307],
        "image_std": [0.2583, 0.2583, 0.2583]
    });
    let parsed: Dinov2Config =
        serde_json::from_value(config.clone()).map_err(|e| ModelError::BadWeights {
            path: dir.join("config.json").display().to_string(),
            reason: e.to_string(),
        })?;
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = Dinov2::new(&vs.root(), &parsed);
    // The class token starts at zero in a fresh model; random here, so that its features differ by image.
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("cls_token") {
                let _ = t.normal_(0.0, 0.02);
            }
        }
    });
    for (name, value) in [
        ("config.json", &config),
        ("preprocessor_config.json", &processor),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).unwrap_or_default();
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    let named = vs.variables().into_iter().collect();
    crate::model::write_safetensors(&named, &[], &dir.join("model.safetensors"))
}

impl FeatureNet for Dinov2Net {
    fn features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let pixels = self.preprocessing.apply(images)?;
        let out = tch::no_grad(|| self.net.forward(&pixels.to_device(self.device)));
        Ok(out.select(1, 0).to_kind(Kind::Float).to_device(Device::Cpu))
    }

    fn id(&self) -> &str {
        &self.id
    }
}

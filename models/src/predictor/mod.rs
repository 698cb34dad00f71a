//! Metadata predictors (editing.md, the paper's Table 15): from a radiograph, the 14 findings, race, sex, view and
//! dataset (one classification head each) and age (a regression on years/100). They score whether a generator
//! obeys its conditioning and whether an edit changed what it was asked to, and their attention-pooled embeddings
//! are the attribute cosine of the identity metrics.
//!
//! Variants: a frozen Rad-DINO (any Hugging Face DINOv2 snapshot) under a linear probe on the CLS token, an MLP
//! adapter on it, or attention pooling over the patch tokens of chosen layers (per task a learned query over
//! LN(tokens), then a linear head); or a ResNet-50 trained in full (`resnet`). The trained values are the engine's
//! parameters; a frozen backbone lives in its own store and is loaded from its snapshot when the predictor is
//! built, so a checkpoint holds only what trains.

pub mod resnet;

use std::path::{Path, PathBuf};

use radit_protocol::ConfigError;
use radit_sharding::schema;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use crate::block::ModelInputs;
use crate::error::ModelError;
use crate::features::Dinov2Net;
use crate::precision::Precision;
use crate::staged::{StageInputs, StagedModel};
use resnet::ResNet;

/// Which predictor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// A linear head per task on the frozen backbone's CLS token.
    Linear,
    /// A hidden layer (GELU, dropout) on the CLS token, then the heads.
    Mlp,
    /// Per task a learned query pools the normalised patch tokens of `layers`, then a linear head.
    AttentionPool,
    /// A ResNet-50 trained in full, its pooled features under the heads.
    Resnet,
}

impl Variant {
    pub fn is_dino(self) -> bool {
        !matches!(self, Self::Resnet)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Mlp => "mlp",
            Self::AttentionPool => "attention-pool",
            Self::Resnet => "resnet",
        }
    }
}

/// A predictor: `[model.predictor]` in a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictorConfig {
    pub variant: Variant,
    /// A DINO variant's Hugging Face snapshot (Rad-DINO's directory); for `resnet`, torchvision's ImageNet
    /// ResNet-50 as safetensors, or nothing (random initialisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<PathBuf>,
    /// The store's image side (what the predictor reads).
    pub image_size: i64,
    /// Attention pooling's layers, counted from 1 (transformers' `hidden_states[k]`).
    #[serde(default = "default_layers")]
    pub layers: Vec<i64>,
    /// The MLP adapter's width and dropout.
    #[serde(default = "default_hidden")]
    pub hidden: i64,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// `resnet`: the input side the images are resized to (bicubic), the blocks per stage and the base width.
    #[serde(default = "default_resnet_input")]
    pub resnet_input: i64,
    #[serde(default = "default_blocks")]
    pub resnet_blocks: [i64; 4],
    #[serde(default = "default_width")]
    pub resnet_width: i64,
}

fn default_layers() -> Vec<i64> {
    vec![3, 6, 9, 12]
}
fn default_hidden() -> i64 {
    1024
}
fn default_dropout() -> f64 {
    0.1
}
fn default_resnet_input() -> i64 {
    518
}
fn default_blocks() -> [i64; 4] {
    [3, 4, 6, 3]
}
fn default_width() -> i64 {
    64
}

impl PredictorConfig {
    pub fn new(variant: Variant, backbone: Option<PathBuf>, image_size: i64) -> Self {
        Self {
            variant,
            backbone,
            image_size,
            layers: default_layers(),
            hidden: default_hidden(),
            dropout: default_dropout(),
            resnet_input: default_resnet_input(),
            resnet_blocks: default_blocks(),
            resnet_width: default_width(),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let field = |f: &str| format!("model.predictor.{f}");
        if self.image_size <= 0 {
            return Err(ConfigError::new(field("image_size"), "must be positive"));
        }
        if self.variant.is_dino() && self.backbone.is_none() {
            return Err(ConfigError::new(
                field("backbone"),
                format!(
                    "the {} predictor reads a frozen DINOv2: give its Hugging Face snapshot directory \
                     (Rad-DINO's)",
                    self.variant.name()
                ),
            ));
        }
        if self.variant == Variant::AttentionPool {
            let mut seen = self.layers.clone();
            seen.sort_unstable();
            seen.dedup();
            if self.layers.is_empty()
                || self.layers.iter().any(|&l| l < 1)
                || seen.len() != self.layers.len()
            {
                return Err(ConfigError::new(
                    field("layers"),
                    format!("{:?}: give distinct layers counted from 1", self.layers),
                ));
            }
        }
        if self.hidden <= 0 {
            return Err(ConfigError::new(field("hidden"), "must be positive"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::new(field("dropout"), "must be in [0, 1)"));
        }
        if self.resnet_input <= 0
            || self.resnet_width <= 0
            || self.resnet_blocks.iter().any(|&b| b < 1)
        {
            return Err(ConfigError::new(
                field("resnet_*"),
                "the input side, width and blocks per stage must be positive",
            ));
        }
        Ok(())
    }

    /// The width of what the heads read, and the backbone's depth (DINO variants read the snapshot's config).
    fn widths(&self) -> Result<(i64, i64), ModelError> {
        if !self.variant.is_dino() {
            return Ok((self.resnet_width * 32, 0));
        }
        let c = self.dino_config()?;
        let width = match self.variant {
            Variant::AttentionPool => c.hidden_size * self.layers.len() as i64,
            _ => c.hidden_size,
        };
        Ok((width, c.num_hidden_layers))
    }

    /// One image's forward FLOPs: the backbone's matrix products (a DINO's 24 d² per token per layer and its
    /// attention; ResNet-50's 8.2 GFLOPs at 224, scaled by area and width²) and the heads'.
    pub fn forward_flops(&self) -> Result<f64, ModelError> {
        let heads = 2.0 * self.parameters()? as f64;
        if !self.variant.is_dino() {
            let area = (self.resnet_input as f64 / 224.0).powi(2);
            let width = (self.resnet_width as f64 / 64.0).powi(2);
            let depth = self.resnet_blocks.iter().sum::<i64>() as f64 / 16.0;
            return Ok(8.2e9 * area * width * depth + heads);
        }
        let (_, layers) = self.widths()?;
        let c = self.dino_config()?;
        let dir = self.backbone.as_deref().unwrap_or(Path::new(""));
        let processor: crate::features::ProcessorConfig =
            crate::features::read_json(&dir.join("preprocessor_config.json"))?;
        let (h, w) = crate::features::Preprocessing::new("processor", processor, dir)?
            .input_size()
            .unwrap_or((self.image_size, self.image_size));
        let tokens = 1.0 + (h / c.patch_size) as f64 * (w / c.patch_size) as f64;
        let d = c.hidden_size as f64;
        Ok(layers as f64 * tokens * (24.0 * d * d + 4.0 * tokens * d) + heads)
    }

    fn dino_config(&self) -> Result<crate::features::Dinov2Config, ModelError> {
        let dir = self.backbone.as_deref().unwrap_or(Path::new(""));
        crate::features::read_json(&dir.join("config.json"))
    }

    /// Trainable parameters.
    pub fn parameters(&self) -> Result<u64, ModelError> {
        let (d, _) = self.widths()?;
        let tasks = tasks();
        let outputs: i64 = tasks.iter().map(Task::outputs).sum();
        let head_input = match self.variant {
            Variant::Mlp => self.hidden,
            _ => d,
        };
        let heads = (head_input * outputs + outputs) as u64;
        Ok(heads
            + match self.variant {
                Variant::Linear => 0,
                Variant::Mlp => (d * self.hidden + self.hidden) as u64,
                Variant::AttentionPool => (2 * d + tasks.len() as i64 * d) as u64,
                Variant::Resnet => ResNet::parameters(self.resnet_blocks, self.resnet_width),
            })
    }
}

/// One predicted variable: a categorical (its index in the store's labels and its classes, missing excluded)
/// or age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub name: String,
    /// `Some((label index, classes))`; `None` for age.
    pub classes: Option<(usize, i64)>,
}

impl Task {
    /// Its columns in the predictor's output.
    pub fn outputs(&self) -> i64 {
        self.classes.map_or(1, |(_, k)| k)
    }

    /// Class names (missing excluded), empty for age.
    pub fn class_names(&self) -> Vec<&'static str> {
        let Some((i, _)) = self.classes else {
            return Vec::new();
        };
        let all: &[&'static str] = match i {
            schema::RACE_INDEX => &schema::RACE_CLASSES,
            schema::SEX_INDEX => &schema::SEX_CLASSES,
            schema::VIEW_INDEX => &schema::VIEW_CLASSES,
            schema::DATASET_INDEX => &schema::DATASET_CLASSES,
            _ => &schema::FINDING_CLASSES,
        };
        all[1..].to_vec()
    }
}

/// The tasks in output order: the 14 findings, race, sex, view, dataset (the store's label order), then age.
pub fn tasks() -> Vec<Task> {
    let mut out: Vec<Task> = schema::FINDINGS
        .iter()
        .enumerate()
        .map(|(i, f)| Task {
            name: (*f).to_string(),
            classes: Some((i, schema::FINDING_CLASSES.len() as i64 - 1)),
        })
        .collect();
    for (name, i, k) in [
        ("race", schema::RACE_INDEX, schema::RACE_CLASSES.len()),
        ("sex", schema::SEX_INDEX, schema::SEX_CLASSES.len()),
        ("view", schema::VIEW_INDEX, schema::VIEW_CLASSES.len()),
        (
            "dataset",
            schema::DATASET_INDEX,
            schema::DATASET_CLASSES.len(),
        ),
    ] {
        out.push(Task {
            name: name.into(),
            classes: Some((i, k as i64 - 1)),
        });
    }
    out.push(Task {
        name: "age".into(),
        classes: None,
    });
    out
}

enum Backbone {
    Dino(Box<Dinov2Net>),
    Resnet(ResNet),
}

struct Pool {
    norm: nn::LayerNorm,
    /// One query per task `[T, D]`.
    query: Tensor,
}

/// What the predictor makes of a batch.
pub struct Prediction {
    /// `[B, W]` fp32: each task's logits (or age in years/100) in [`tasks`] order.
    pub outputs: Tensor,
    /// Attention pooling's per-task embeddings `[B, T, D]` (fp32).
    pub embeddings: Option<Tensor>,
}

/// A metadata predictor on a `VarStore` path (its trainable values) with its frozen backbone.
pub struct Predictor {
    config: PredictorConfig,
    backbone: Backbone,
    adapter: Option<nn::Linear>,
    pool: Option<Pool>,
    heads: Vec<nn::Linear>,
    tasks: Vec<Task>,
    kind: Kind,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Predictor {
    /// Builds the predictor under `p`, loading its backbone (a DINO snapshot; torchvision's ResNet weights when
    /// given).
    pub fn new(p: &nn::Path, config: &PredictorConfig) -> Result<Self, ModelError> {
        config.validate()?;
        let (d, depth) = config.widths()?;
        let backbone = if config.variant.is_dino() {
            let dir = config.backbone.as_deref().unwrap_or(Path::new(""));
            if let Some(&l) = config.layers.iter().find(|&&l| l > depth)
                && config.variant == Variant::AttentionPool
            {
                return Err(ModelError::InvalidConfig(ConfigError::new(
                    "model.predictor.layers",
                    format!("layer {l}, but {} has {depth} layers", dir.display()),
                )));
            }
            Backbone::Dino(Box::new(Dinov2Net::load(dir, "processor", p.device())?))
        } else {
            let mut net = ResNet::new(&(p / "backbone"), config.resnet_blocks, config.resnet_width);
            if let Some(file) = &config.backbone {
                net.load(file)?;
            }
            Backbone::Resnet(net)
        };
        let adapter = (config.variant == Variant::Mlp)
            .then(|| nn::linear(p / "adapter", d, config.hidden, Default::default()));
        let tasks = tasks();
        let pool = (config.variant == Variant::AttentionPool).then(|| Pool {
            norm: nn::layer_norm(p / "pool" / "norm", vec![d], Default::default()),
            query: (p / "pool").var(
                "query",
                &[tasks.len() as i64, d],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
        });
        let head_in = adapter.as_ref().map_or(d, |_| config.hidden);
        let heads = tasks
            .iter()
            .map(|t| {
                nn::linear(
                    p / "heads" / t.name.as_str(),
                    head_in,
                    t.outputs(),
                    Default::default(),
                )
            })
            .collect();
        Ok(Self {
            config: config.clone(),
            backbone,
            adapter,
            pool,
            heads,
            tasks,
            kind: Kind::Float,
        })
    }

    pub fn config(&self) -> &PredictorConfig {
        &self.config
    }

    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    fn check(&self, x: &Tensor) -> Result<(), ModelError> {
        let s = x.size();
        let side = self.config.image_size;
        if s.len() != 4 || s[0] == 0 || s[1] != 1 || s[2] != side || s[3] != side {
            return Err(ModelError::BadInput {
                input: "images",
                reason: format!("{s:?}; the predictor reads [batch, 1, {side}, {side}]"),
            });
        }
        Ok(())
    }

    /// The backbone's representation of grey images in [-1, 1]: the CLS token `[B, D]`, the chosen layers'
    /// patch tokens `[B, N, D]` or ResNet's pooled features; fp32.
    fn represent(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let unit = (x.to_kind(Kind::Float) + 1.0) / 2.0;
        Ok(match &self.backbone {
            Backbone::Dino(net) => {
                let pixels = net.unit_input(&unit)?.to_kind(self.kind);
                // Frozen: no graph through the backbone.
                tch::no_grad(|| -> Result<Tensor, ModelError> {
                    Ok(match self.config.variant {
                        Variant::AttentionPool => {
                            let layers = net.network().layer_outputs(&pixels);
                            let picked: Vec<Tensor> = self
                                .config
                                .layers
                                .iter()
                                .map(|&l| {
                                    let t = &layers[(l - 1) as usize];
                                    t.narrow(1, 1, t.size()[1] - 1)
                                })
                                .collect();
                            Tensor::cat(&picked, 2)
                        }
                        _ => net.network().forward(&pixels).select(1, 0),
                    })
                })?
                .to_kind(Kind::Float)
            }
            Backbone::Resnet(net) => {
                let side = self.config.resnet_input;
                let rgb = unit.repeat([1, 3, 1, 1]);
                let rgb = if side == self.config.image_size {
                    rgb
                } else {
                    rgb.upsample_bicubic2d([side, side], false, None, None)
                };
                let device = x.device();
                let mean = Tensor::from_slice(&IMAGENET_MEAN)
                    .view([1, 3, 1, 1])
                    .to_device(device);
                let std = Tensor::from_slice(&IMAGENET_STD)
                    .view([1, 3, 1, 1])
                    .to_device(device);
                net.forward(&((rgb - mean) / std).to_kind(self.kind))
                    .to_kind(Kind::Float)
            }
        })
    }

    /// Predictions of grey images `[B, 1, S, S]` in [-1, 1]; `keys` (one per sample) turn the MLP's dropout on.
    pub fn predict(&self, x: &Tensor, keys: Option<&Tensor>) -> Result<Prediction, ModelError> {
        self.check(x)?;
        let rep = self.represent(x)?;
        let mut embeddings = None;
        let outputs: Vec<Tensor> = match (&self.adapter, &self.pool) {
            (Some(fc), _) => {
                let mut h = rep.apply(fc).gelu("none");
                if let Some(keys) = keys.filter(|_| self.config.dropout > 0.0) {
                    h = crate::unet::dropout::apply(&h, self.config.dropout, keys, 0);
                }
                self.heads.iter().map(|head| h.apply(head)).collect()
            }
            (None, Some(pool)) => {
                let h = rep.apply(&pool.norm);
                let d = h.size()[2] as f64;
                // [B, N, T]: each task's weights over the tokens.
                let weights = h
                    .matmul(&pool.query.tr())
                    .g_div_scalar(d.sqrt())
                    .softmax(1, Kind::Float);
                let pooled = weights.transpose(1, 2).matmul(&h);
                let out = self
                    .heads
                    .iter()
                    .enumerate()
                    .map(|(t, head)| pooled.select(1, t as i64).apply(head))
                    .collect();
                embeddings = Some(pooled);
                out
            }
            (None, None) => self.heads.iter().map(|head| rep.apply(head)).collect(),
        };
        Ok(Prediction {
            outputs: Tensor::cat(&outputs, 1),
            embeddings,
        })
    }
}

impl StagedModel for Predictor {
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
        self.check(inputs.x)
    }

    fn stage(
        &self,
        _i: usize,
        _values: &[Tensor],
        at: &StageInputs,
    ) -> Result<Vec<Tensor>, ModelError> {
        Ok(vec![self.predict(at.inputs.x, at.keys)?.outputs])
    }

    fn set_precision(&mut self, precision: Precision) {
        self.kind = precision.compute_kind();
        if let Backbone::Dino(net) = &mut self.backbone {
            net.set_kind(self.kind);
        }
    }
}

/// Per-sample loss `[B]` of predictions `[B, W]` against the store's labels `[B, 18]` (0 = missing) and age `[B]`
/// (years/100, NaN = missing): the sum over tasks of the cross-entropy of each present label and the squared
/// error of a present age. Missing values add nothing. [CHOICE: the batch loss is the mean of these over the
/// batch, not a per-task mean over present labels, so a data-parallel step equals the single-process one.]
pub fn per_sample_loss(
    outputs: &Tensor,
    labels: &Tensor,
    age: &Tensor,
) -> Result<Tensor, ModelError> {
    let tasks = tasks();
    let width: i64 = tasks.iter().map(Task::outputs).sum();
    let (b, w) = (outputs.size()[0], *outputs.size().last().unwrap_or(&0));
    if w != width || labels.size() != [b, schema::NUM_LABELS as i64] || age.size() != [b] {
        return Err(ModelError::BadInput {
            input: "predictions",
            reason: format!(
                "outputs {:?}, labels {:?}, age {:?}; expected [B, {width}], [B, {}], [B]",
                outputs.size(),
                labels.size(),
                age.size(),
                schema::NUM_LABELS
            ),
        });
    }
    let outputs = outputs.to_kind(Kind::Float);
    let mut total = Tensor::zeros([b], (Kind::Float, outputs.device()));
    let mut at = 0;
    for t in &tasks {
        let k = t.outputs();
        let slice = outputs.narrow(1, at, k);
        at += k;
        match t.classes {
            Some((i, _)) => {
                let label = labels.select(1, i as i64).to_kind(Kind::Int64);
                let present = label.gt(0);
                let target = (&label - 1).clamp_min(0).unsqueeze(1);
                let nll = -slice
                    .log_softmax(1, Kind::Float)
                    .gather(1, &target, false)
                    .squeeze_dim(1);
                total += nll * present.to_kind(Kind::Float);
            }
            None => {
                let age = age.to_kind(Kind::Float);
                let present = age.isnan().logical_not();
                let target = age.nan_to_num(0.0, None, None);
                let err = (slice.squeeze_dim(1) - target).square();
                total += err.where_self(&present, &err.zeros_like());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests;

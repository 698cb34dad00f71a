//! The autoencoders that make latents and decode them (shared/design/latents.md): FLUX.2's, whose encoder mean is
//! RadiT XL's 32x64x64 latents and whose decoder RadVAE (LoRA) fine-tunes, and RadVAE (Scratch) (`unet::vae`),
//! which radit trains. [`AutoencoderConfig`] says which; [`Autoencoder`] encodes and decodes either.
//!
//! FLUX.2's autoencoder: GroupNorm(32, eps 1e-6) and SiLU throughout; ResNet blocks
//! with a 1x1 shortcut where the width changes; a mid block ResNet-attention-ResNet (one head over all positions);
//! downsampling by a stride-2 3x3 convolution after padding the right and bottom by one; nearest x2 upsampling and a
//! 3x3 convolution; 1x1 quant convolutions on both sides of the latent. Greyscale radiographs go in repeated to three
//! channels and come out as the mean of the decoder's RGB.
//!
//! Variables are named as the original (BFL) release names them (`encoder.down.1.block.0.conv1.weight`); weights in
//! the diffusers layout load through [`names`]. Loading is strict: every tensor present with its shape, nothing left
//! over, or nothing is changed and the error names the tensors.

pub mod finetune;
pub mod names;

use std::collections::HashMap;
use std::path::Path;

use radit_protocol::ConfigError;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::error::ModelError;
use crate::lora::Lora;
use crate::unet::vae::{RADVAE_PRESETS, RadVae, RadVaeConfig};

/// The FLUX-family presets by name.
pub const PRESETS: [&str; 2] = ["flux2", "tiny"];

/// Which autoencoder, with its whole configuration. Serialised as the inner config alone (each has fields of its
/// own), so the files radit wrote before RadVAE existed still say what they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AutoencoderConfig {
    /// FLUX.2's topology (GroupNorm ResNets; greyscale through RGB).
    Flux(AeConfig),
    /// RadVAE (Scratch): EDM2's magnitude-preserving blocks, greyscale in and out.
    RadVae(RadVaeConfig),
}

impl AutoencoderConfig {
    pub fn flux2() -> Self {
        Self::Flux(AeConfig::flux2())
    }

    /// `flux2`, `tiny` (FLUX.2's topology, small), `radvae` or `radvae-tiny`.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        if RADVAE_PRESETS.contains(&name) {
            return Ok(Self::RadVae(RadVaeConfig::preset(name)?));
        }
        AeConfig::preset(name)
            .map(Self::Flux)
            .map_err(|_| ModelError::UnknownPreset {
                name: name.into(),
                known: all_presets(),
            })
    }

    /// The preset this configuration is, by name (`None`: a configuration of its own).
    pub fn preset_name(&self) -> Option<&'static str> {
        PRESETS
            .into_iter()
            .chain(RADVAE_PRESETS)
            .find(|&p| Self::preset(p).is_ok_and(|c| c == *self))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Flux(c) => c.validate(),
            Self::RadVae(c) => c.validate().map_err(|e| match e {
                ModelError::InvalidConfig(c) => c,
                other => ConfigError::new("vae", other.to_string()),
            }),
        }
    }

    /// How much smaller the latent is than the image on each side.
    pub fn downsampling(&self) -> i64 {
        match self {
            Self::Flux(c) => c.downsampling(),
            Self::RadVae(c) => c.downsampling(),
        }
    }

    /// Latent channels.
    pub fn z_channels(&self) -> i64 {
        match self {
            Self::Flux(c) => c.z_channels,
            Self::RadVae(c) => c.latent_channels,
        }
    }

    /// The one image side it encodes, when it has one (RadVAE's blocks are built for their resolution; FLUX.2's
    /// convolutions take any multiple of the downsampling).
    pub fn image_side(&self) -> Option<i64> {
        match self {
            Self::Flux(_) => None,
            Self::RadVae(c) => Some(c.img_resolution),
        }
    }

    /// FLOPs of one encoder mean for a `size` x `size` image.
    pub fn encoder_flops(&self, size: i64) -> f64 {
        match self {
            Self::Flux(c) => c.encoder_flops(size),
            Self::RadVae(c) => c.encoder_flops(),
        }
    }

    /// Its trainable parameters.
    pub fn parameters(&self) -> u64 {
        match self {
            Self::Flux(c) => {
                let (e, d, q) = c.parameter_counts();
                (e + d + q) as u64
            }
            Self::RadVae(c) => c.parameter_count(),
        }
    }
}

impl From<AeConfig> for AutoencoderConfig {
    fn from(c: AeConfig) -> Self {
        Self::Flux(c)
    }
}

fn all_presets() -> String {
    PRESETS
        .into_iter()
        .chain(RADVAE_PRESETS)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `--autoencoder auto` (the default): the weights file says which autoencoder it is.
pub const AUTO: &str = "auto";

/// The autoencoder a weights file holds: the configuration radit wrote into its metadata, else the preset whose
/// first and last convolutions have the file's shapes (FLUX.2's release carries no metadata). `None`: neither.
pub fn found_in(weights: &Path) -> Result<Option<AutoencoderConfig>, ModelError> {
    let bad = |reason: String| ModelError::BadWeights {
        path: weights.display().to_string(),
        reason,
    };
    if let Some(json) = crate::model::read_metadata(weights)?.get(CONFIG_KEY) {
        let cfg: AutoencoderConfig =
            serde_json::from_str(json).map_err(|e| bad(format!("{CONFIG_KEY}: {e}")))?;
        return Ok(Some(cfg));
    }
    let shapes = crate::model::read_shapes(weights)?;
    let (Some(first), Some(last)) = (
        shapes.get("encoder.conv_in.weight"),
        shapes.get("decoder.conv_in.weight"),
    ) else {
        return Ok(None);
    };
    Ok(PRESETS
        .into_iter()
        .filter_map(|p| AeConfig::preset(p).ok())
        .find(|c| {
            let top = c.ch * c.ch_mult.last().copied().unwrap_or(1);
            first.first() == Some(&c.ch)
                && last.first() == Some(&top)
                && last.get(1) == Some(&c.z_channels)
        })
        .map(AutoencoderConfig::Flux))
}

/// The metadata key of the configuration radit writes into an autoencoder's weights.
const CONFIG_KEY: &str = "radit.autoencoder";

/// What `--autoencoder` (or a config's `autoencoder`) asks for, against what `weights` holds: `auto` takes the
/// file's; a preset that the file is not is refused, naming what the file looks like. A file that says nothing is
/// taken as the preset asked for (`auto`: FLUX.2's), and a strict load names any mismatch.
pub fn resolve(requested: &str, weights: &Path) -> Result<AutoencoderConfig, ModelError> {
    let found = found_in(weights)?;
    let name_of = |c: &AutoencoderConfig| {
        c.preset_name()
            .unwrap_or("a configuration of its own")
            .to_string()
    };
    match (requested, found) {
        (AUTO, Some(c)) => Ok(c),
        (AUTO, None) => Ok(AutoencoderConfig::flux2()),
        (name, found) => {
            let asked = AutoencoderConfig::preset(name)?;
            match found {
                Some(c) if c != asked => Err(ModelError::BadWeights {
                    path: weights.display().to_string(),
                    reason: format!(
                        "these weights look like the `{}` autoencoder, not `{name}`: pass --autoencoder {} (or \
                         autoencoder = \"auto\" in a config) to use them as what they are",
                        name_of(&c),
                        c.preset_name().unwrap_or(AUTO)
                    ),
                }),
                _ => Ok(asked),
            }
        }
    }
}

/// A requested autoencoder name that can work: `auto` or a preset.
pub fn check_name(name: &str) -> Result<(), ModelError> {
    if name == AUTO {
        return Ok(());
    }
    AutoencoderConfig::preset(name)
        .map(|_| ())
        .map_err(|_| ModelError::UnknownPreset {
            name: name.into(),
            known: format!("auto (the weights file says), {}", all_presets()),
        })
}

/// The autoencoder's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Channels of the first level; level i has `ch * ch_mult[i]`.
    pub ch: i64,
    pub ch_mult: Vec<i64>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub num_res_blocks: i64,
    /// Latent channels.
    pub z_channels: i64,
    pub norm_groups: i64,
    pub eps: f64,
    /// How the decoder's RGB becomes grey (the mean unless said otherwise; files without it are the mean).
    #[serde(default, skip_serializing_if = "Grey::is_mean")]
    pub grey: Grey,
}

/// How a decoder's RGB becomes a greyscale radiograph: the channels' mean (the paper's choice) or luma weights
/// (0.29894, 0.58704, 0.11402; tried and rejected, Table 8's second row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grey {
    #[default]
    Mean,
    Luma,
}

impl Grey {
    pub const LUMA: [f32; 3] = [0.29894, 0.58704, 0.11402];

    fn is_mean(&self) -> bool {
        *self == Grey::Mean
    }

    /// `[B, 1, H, W]` from RGB `[B, 3, H, W]`, in the input's kind.
    pub fn apply(self, rgb: &Tensor) -> Tensor {
        match self {
            Grey::Mean => rgb.mean_dim(1, true, Kind::Float).to_kind(rgb.kind()),
            Grey::Luma => {
                let w = Tensor::from_slice(&Self::LUMA)
                    .view([1, 3, 1, 1])
                    .to_device(rgb.device());
                (rgb.to_kind(Kind::Float) * w)
                    .sum_dim_intlist(1, true, Kind::Float)
                    .to_kind(rgb.kind())
            }
        }
    }
}

impl AeConfig {
    /// FLUX.2's autoencoder: 84,046,115 parameters, 512x512 -> 32x64x64.
    pub fn flux2() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 32,
            norm_groups: 32,
            eps: 1e-6,
            grey: Grey::Mean,
        }
    }

    /// The same topology, small: for tests and the CPU quickstart.
    pub fn tiny() -> Self {
        Self {
            ch: 16,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            z_channels: 4,
            norm_groups: 8,
            ..Self::flux2()
        }
    }

    /// The preset this configuration is, by name (`None`: a configuration of its own).
    pub fn preset_name(&self) -> Option<&'static str> {
        PRESETS
            .into_iter()
            .find(|&p| Self::preset(p).is_ok_and(|c| c == *self))
    }

    /// `flux2` or `tiny`.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        match name {
            "flux2" => Ok(Self::flux2()),
            "tiny" => Ok(Self::tiny()),
            other => Err(ModelError::UnknownPreset {
                name: other.into(),
                known: "flux2, tiny".into(),
            }),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: String| Err(ConfigError::new(field, reason));
        if self.ch_mult.is_empty() || self.ch_mult.iter().any(|&m| m < 1) {
            return bad(
                "ch_mult",
                format!("{:?}: one or more positive multipliers", self.ch_mult),
            );
        }
        for (field, v) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("ch", self.ch),
            ("num_res_blocks", self.num_res_blocks),
            ("z_channels", self.z_channels),
            ("norm_groups", self.norm_groups),
        ] {
            if v < 1 {
                return bad(field, format!("{v}: at least 1"));
            }
        }
        if let Some(m) = self
            .ch_mult
            .iter()
            .find(|&&m| (self.ch * m) % self.norm_groups != 0)
        {
            return bad(
                "norm_groups",
                format!(
                    "{} does not divide {} channels",
                    self.norm_groups,
                    self.ch * m
                ),
            );
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", format!("{}: positive", self.eps));
        }
        Ok(())
    }

    /// How much smaller the latent is than the image on each side.
    pub fn downsampling(&self) -> i64 {
        1 << (self.ch_mult.len() - 1)
    }

    fn width(&self, level: usize) -> i64 {
        self.ch * self.ch_mult[level]
    }

    /// Parameters of (encoder, decoder, the two quant convolutions), in closed form.
    pub fn parameter_counts(&self) -> (i64, i64, i64) {
        let conv = |cin: i64, cout: i64, k: i64| cin * cout * k * k + cout;
        let norm = |c: i64| 2 * c;
        let resnet = |cin: i64, cout: i64| {
            norm(cin)
                + conv(cin, cout, 3)
                + norm(cout)
                + conv(cout, cout, 3)
                + if cin == cout { 0 } else { conv(cin, cout, 1) }
        };
        let mid = |c: i64| 2 * resnet(c, c) + norm(c) + 4 * conv(c, c, 1);
        let levels = self.ch_mult.len();
        let top = self.width(levels - 1);
        let mut encoder = conv(self.in_channels, self.ch, 3);
        let mut c = self.ch;
        for level in 0..levels {
            for _ in 0..self.num_res_blocks {
                encoder += resnet(c, self.width(level));
                c = self.width(level);
            }
            if level + 1 < levels {
                encoder += conv(c, c, 3);
            }
        }
        encoder += mid(c) + norm(c) + conv(c, 2 * self.z_channels, 3);
        let mut decoder = conv(self.z_channels, top, 3) + mid(top);
        let mut c = top;
        for level in (0..levels).rev() {
            for _ in 0..=self.num_res_blocks {
                decoder += resnet(c, self.width(level));
                c = self.width(level);
            }
            if level > 0 {
                decoder += conv(c, c, 3);
            }
        }
        decoder += norm(c) + conv(c, self.out_channels, 3);
        let quant = conv(2 * self.z_channels, 2 * self.z_channels, 1)
            + conv(self.z_channels, self.z_channels, 1);
        (encoder, decoder, quant)
    }
}

/// FLOPs (2 per multiply-add) of a `k` x `k` convolution over a `side` x `side` map.
fn conv_flops(cin: i64, cout: i64, k: i64, side: i64) -> f64 {
    2.0 * (cin * cout * k * k) as f64 * (side * side) as f64
}

/// FLOPs of a ResNet block: two 3x3 convolutions and the 1x1 shortcut where the width changes.
fn resnet_flops(cin: i64, cout: i64, side: i64) -> f64 {
    conv_flops(cin, cout, 3, side)
        + conv_flops(cout, cout, 3, side)
        + if cin == cout {
            0.0
        } else {
            conv_flops(cin, cout, 1, side)
        }
}

impl AeConfig {
    /// Floating-point operations (2 per multiply-add) of one encoder mean for a `size` x `size` image: every
    /// convolution and the mid block's attention products; norms and activations are left out (under 1 %).
    pub fn encoder_flops(&self, size: i64) -> f64 {
        let (conv, resnet) = (conv_flops, resnet_flops);
        let levels = self.ch_mult.len();
        let mut side = size;
        let mut c = self.ch;
        let mut flops = conv(self.in_channels, self.ch, 3, side);
        for level in 0..levels {
            for _ in 0..self.num_res_blocks {
                flops += resnet(c, self.width(level), side);
                c = self.width(level);
            }
            if level + 1 < levels {
                side /= 2;
                flops += conv(c, c, 3, side);
            }
        }
        let tokens = (side * side) as f64;
        // q, k, v and the output projection, then QK^T and the weighted sum of V over every pair of positions.
        let attention = 4.0 * conv(c, c, 1, side) + 2.0 * (2.0 * tokens * tokens * c as f64);
        flops += 2.0 * resnet(c, c, side) + attention;
        flops += conv(c, 2 * self.z_channels, 3, side)
            + conv(2 * self.z_channels, 2 * self.z_channels, 1, side);
        flops
    }

    /// The same count for one decoding back to a `size` x `size` image.
    pub fn decoder_flops(&self, size: i64) -> f64 {
        let (conv, resnet) = (conv_flops, resnet_flops);
        let levels = self.ch_mult.len();
        let mut side = size / self.downsampling();
        let mut c = self.width(levels - 1);
        let tokens = (side * side) as f64;
        let attention = 4.0 * conv(c, c, 1, side) + 2.0 * (2.0 * tokens * tokens * c as f64);
        let mut flops = conv(self.z_channels, self.z_channels, 1, side)
            + conv(self.z_channels, c, 3, side)
            + 2.0 * resnet(c, c, side)
            + attention;
        for level in (0..levels).rev() {
            for _ in 0..=self.num_res_blocks {
                flops += resnet(c, self.width(level), side);
                c = self.width(level);
            }
            if level > 0 {
                side *= 2;
                flops += conv(c, c, 3, side);
            }
        }
        flops + conv(c, self.out_channels, 3, side)
    }
}

/// What replaces or adds to the decoder's frozen layers in a fine-tune ([`finetune`]), by layer name: empty for
/// the plain network.
#[derive(Debug, Default)]
pub struct LayerUpdates {
    pub convs: HashMap<String, ConvUpdate>,
    /// GroupNorms trained in full: (weight, bias).
    pub norms: HashMap<String, (Tensor, Tensor)>,
}

/// A decoder's layers by name: convolutions with their weight shapes `[out, in, k, k]`, GroupNorms with their
/// channels.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderLayers {
    pub convs: Vec<(String, Vec<i64>)>,
    pub norms: Vec<(String, i64)>,
}

/// A convolution's fine-tuning: a LoRA update beside the frozen weight, or new weights in place of it.
#[derive(Debug)]
pub enum ConvUpdate {
    Lora(Lora),
    Replace {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

/// A convolution with its name, so a fine-tune can update it.
#[derive(Debug)]
struct Conv {
    inner: nn::Conv2D,
    name: String,
    stride: i64,
    padding: i64,
}

/// A layer's name: its path's components joined by dots.
fn name_of(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> Conv {
    let padding = if k == 3 && stride == 1 { 1 } else { 0 };
    let config = nn::ConvConfig {
        stride,
        padding,
        ..Default::default()
    };
    Conv {
        name: name_of(&p),
        inner: nn::conv2d(p, cin, cout, k, config),
        stride,
        padding,
    }
}

impl Conv {
    fn forward(&self, x: &Tensor, u: &LayerUpdates) -> Tensor {
        match u.convs.get(&self.name) {
            None => self.inner.forward(x),
            Some(ConvUpdate::Lora(l)) => {
                self.inner.forward(x) + l.conv_branch(x, self.stride, self.padding)
            }
            Some(ConvUpdate::Replace { weight, bias }) => x.conv2d(
                &weight.to_kind(x.kind()),
                bias.as_ref().map(|b| b.to_kind(x.kind())),
                [self.stride, self.stride],
                [self.padding, self.padding],
                [1, 1],
                1,
            ),
        }
    }

    /// Weight shape `[out, in, k, k]`.
    fn shape(&self) -> Vec<i64> {
        self.inner.ws.size()
    }
}

/// A GroupNorm with its name, so a fine-tune can train it in full.
#[derive(Debug)]
struct Norm {
    inner: nn::GroupNorm,
    name: String,
    eps: f64,
}

fn group_norm(p: nn::Path, c: i64, cfg: &AeConfig) -> Norm {
    let config = nn::GroupNormConfig {
        eps: cfg.eps,
        ..Default::default()
    };
    Norm {
        name: name_of(&p),
        inner: nn::group_norm(p, cfg.norm_groups, c, config),
        eps: cfg.eps,
    }
}

impl Norm {
    fn forward(&self, x: &Tensor, u: &LayerUpdates) -> Tensor {
        match u.norms.get(&self.name) {
            None => self.inner.forward(x),
            Some((w, b)) => x.group_norm(
                self.inner.num_groups,
                Some(w.to_kind(x.kind())),
                Some(b.to_kind(x.kind())),
                self.eps,
                false,
            ),
        }
    }
}

#[derive(Debug)]
struct ResnetBlock {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(p: nn::Path, cin: i64, cout: i64, cfg: &AeConfig) -> Self {
        Self {
            norm1: group_norm(&p / "norm1", cin, cfg),
            conv1: conv(&p / "conv1", cin, cout, 3, 1),
            norm2: group_norm(&p / "norm2", cout, cfg),
            conv2: conv(&p / "conv2", cout, cout, 3, 1),
            nin_shortcut: (cin != cout).then(|| conv(&p / "nin_shortcut", cin, cout, 1, 1)),
        }
    }

    fn forward(&self, x: &Tensor, u: &LayerUpdates) -> Tensor {
        let h = self.conv1.forward(&self.norm1.forward(x, u).silu(), u);
        let h = self.conv2.forward(&self.norm2.forward(&h, u).silu(), u);
        match &self.nin_shortcut {
            Some(s) => s.forward(x, u) + h,
            None => x + h,
        }
    }

    fn convs(&self) -> impl Iterator<Item = &Conv> {
        [&self.conv1, &self.conv2]
            .into_iter()
            .chain(self.nin_shortcut.as_ref())
    }

    fn norms(&self) -> [&Norm; 2] {
        [&self.norm1, &self.norm2]
    }
}

/// Self-attention over all positions, one head, 1x1 convolutions for q, k, v and the output.
#[derive(Debug)]
struct AttnBlock {
    norm: Norm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    fn new(p: nn::Path, c: i64, cfg: &AeConfig) -> Self {
        Self {
            norm: group_norm(&p / "norm", c, cfg),
            q: conv(&p / "q", c, c, 1, 1),
            k: conv(&p / "k", c, c, 1, 1),
            v: conv(&p / "v", c, c, 1, 1),
            proj_out: conv(&p / "proj_out", c, c, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor, u: &LayerUpdates) -> Tensor {
        let (b, c, h, w) = x.size4().expect("a 4-D activation");
        let n = self.norm.forward(x, u);
        // [B, C, H, W] -> [B, 1, HW, C]: one head over every position.
        let tokens = |t: Tensor| t.reshape([b, c, h * w]).transpose(1, 2).unsqueeze(1);
        let out = Tensor::scaled_dot_product_attention(
            &tokens(self.q.forward(&n, u)),
            &tokens(self.k.forward(&n, u)),
            &tokens(self.v.forward(&n, u)),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let out = out.squeeze_dim(1).transpose(1, 2).reshape([b, c, h, w]);
        x + self.proj_out.forward(&out, u)
    }
}

/// ResNet, attention, ResNet at the lowest resolution.
#[derive(Debug)]
struct MidBlock {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl MidBlock {
    fn new(p: nn::Path, c: i64, cfg: &AeConfig) -> Self {
        Self {
            block_1: ResnetBlock::new(&p / "block_1", c, c, cfg),
            attn_1: AttnBlock::new(&p / "attn_1", c, cfg),
            block_2: ResnetBlock::new(&p / "block_2", c, c, cfg),
        }
    }

    fn forward(&self, x: &Tensor, u: &LayerUpdates) -> Tensor {
        let h = self.block_1.forward(x, u);
        self.block_2.forward(&self.attn_1.forward(&h, u), u)
    }

    fn convs(&self) -> impl Iterator<Item = &Conv> {
        let a = &self.attn_1;
        self.block_1
            .convs()
            .chain([&a.q, &a.k, &a.v, &a.proj_out])
            .chain(self.block_2.convs())
    }

    fn norms(&self) -> impl Iterator<Item = &Norm> {
        self.block_1
            .norms()
            .into_iter()
            .chain([&self.attn_1.norm])
            .chain(self.block_2.norms())
    }
}

/// One resolution: its ResNet blocks, then a down- or upsampling convolution (not at the last level down, nor
/// the first up).
#[derive(Debug)]
struct Level {
    blocks: Vec<ResnetBlock>,
    resample: Option<Conv>,
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv,
    down: Vec<Level>,
    mid: MidBlock,
    norm_out: Norm,
    conv_out: Conv,
}

impl Encoder {
    fn new(p: nn::Path, cfg: &AeConfig) -> Self {
        let levels = cfg.ch_mult.len();
        let mut c = cfg.ch;
        let mut down = Vec::new();
        for level in 0..levels {
            let lp = &p / "down" / level;
            let blocks = (0..cfg.num_res_blocks)
                .map(|j| {
                    let b = ResnetBlock::new(&lp / "block" / j, c, cfg.width(level), cfg);
                    c = cfg.width(level);
                    b
                })
                .collect();
            let resample =
                (level + 1 < levels).then(|| conv(&lp / "downsample" / "conv", c, c, 3, 2));
            down.push(Level { blocks, resample });
        }
        Self {
            conv_in: conv(&p / "conv_in", cfg.in_channels, cfg.ch, 3, 1),
            down,
            mid: MidBlock::new(&p / "mid", c, cfg),
            norm_out: group_norm(&p / "norm_out", c, cfg),
            conv_out: conv(&p / "conv_out", c, 2 * cfg.z_channels, 3, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let u = &LayerUpdates::default();
        let mut h = self.conv_in.forward(x, u);
        for level in &self.down {
            for b in &level.blocks {
                h = b.forward(&h, u);
            }
            if let Some(d) = &level.resample {
                // Pad right and bottom by one, then stride 2 with no padding: the original's asymmetric padding.
                h = d.forward(&h.constant_pad_nd([0, 1, 0, 1]), u);
            }
        }
        let h = self.mid.forward(&h, u);
        self.conv_out
            .forward(&self.norm_out.forward(&h, u).silu(), u)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv,
    mid: MidBlock,
    /// By level, 0 the highest resolution; run from the last.
    up: Vec<Level>,
    norm_out: Norm,
    conv_out: Conv,
}

impl Decoder {
    fn new(p: nn::Path, cfg: &AeConfig) -> Self {
        let levels = cfg.ch_mult.len();
        let top = cfg.width(levels - 1);
        let mut c = top;
        let mut up: Vec<Level> = Vec::new();
        for level in (0..levels).rev() {
            let lp = &p / "up" / level;
            let blocks = (0..=cfg.num_res_blocks)
                .map(|j| {
                    let b = ResnetBlock::new(&lp / "block" / j, c, cfg.width(level), cfg);
                    c = cfg.width(level);
                    b
                })
                .collect();
            let resample = (level > 0).then(|| conv(&lp / "upsample" / "conv", c, c, 3, 1));
            up.insert(0, Level { blocks, resample });
        }
        Self {
            conv_in: conv(&p / "conv_in", cfg.z_channels, top, 3, 1),
            mid: MidBlock::new(&p / "mid", top, cfg),
            up,
            norm_out: group_norm(&p / "norm_out", c, cfg),
            conv_out: conv(&p / "conv_out", c, cfg.out_channels, 3, 1),
        }
    }

    fn forward(&self, z: &Tensor, u: &LayerUpdates) -> Tensor {
        let mut h = self.mid.forward(&self.conv_in.forward(z, u), u);
        for level in self.up.iter().rev() {
            for b in &level.blocks {
                h = b.forward(&h, u);
            }
            if let Some(s) = &level.resample {
                let (_, _, height, width) = h.size4().expect("a 4-D activation");
                h = s.forward(
                    &h.upsample_nearest2d([2 * height, 2 * width], None, None),
                    u,
                );
            }
        }
        self.conv_out
            .forward(&self.norm_out.forward(&h, u).silu(), u)
    }

    fn convs(&self) -> impl Iterator<Item = &Conv> {
        std::iter::once(&self.conv_in)
            .chain(self.mid.convs())
            .chain(self.up.iter().flat_map(|l| {
                l.blocks
                    .iter()
                    .flat_map(ResnetBlock::convs)
                    .chain(l.resample.as_ref())
            }))
            .chain([&self.conv_out])
    }

    fn norms(&self) -> impl Iterator<Item = &Norm> {
        self.mid
            .norms()
            .chain(
                self.up
                    .iter()
                    .flat_map(|l| l.blocks.iter().flat_map(ResnetBlock::norms)),
            )
            .chain([&self.norm_out])
    }
}

/// FLUX.2's autoencoder on a `VarStore` path, with greyscale in and out.
#[derive(Debug)]
pub struct FluxAutoencoder {
    pub config: AeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv,
    post_quant_conv: Conv,
}

impl FluxAutoencoder {
    /// Builds it under `p` (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`, and FLUX.2's latent
    /// BatchNorm statistics `bn.running_mean`/`bn.running_var`, kept so that its files load strictly; unused here).
    pub fn new(p: &nn::Path, config: &AeConfig) -> Result<Self, ModelError> {
        config.validate()?;
        let bn = p / "bn";
        let stats = 4 * config.z_channels;
        let _ = bn.zeros_no_train("running_mean", &[stats]);
        let _ = bn.ones_no_train("running_var", &[stats]);
        let z = config.z_channels;
        Ok(Self {
            encoder: Encoder::new(p / "encoder", config),
            decoder: Decoder::new(p / "decoder", config),
            quant_conv: conv(p / "quant_conv", 2 * z, 2 * z, 1, 1),
            post_quant_conv: conv(p / "post_quant_conv", z, z, 1, 1),
            config: config.clone(),
        })
    }

    /// The encoder's mean of greyscale images `[B, 1, H, W]` in [-1, 1] (repeated to RGB).
    pub fn encode_mean(&self, x: &Tensor) -> Tensor {
        let rgb = x.repeat([1, self.config.in_channels, 1, 1]);
        let none = &LayerUpdates::default();
        let moments = self.quant_conv.forward(&self.encoder.forward(&rgb), none);
        moments.narrow(1, 0, self.config.z_channels)
    }

    /// Greyscale images for latents `z`, the decoder's layers updated by `u` (none: the plain decoder), its RGB
    /// made grey as the configuration says.
    pub fn decode_with(&self, z: &Tensor, u: &LayerUpdates) -> Tensor {
        let rgb = self.decoder.forward(&self.post_quant_conv.forward(z, u), u);
        self.config.grey.apply(&rgb)
    }

    /// The decoder's layers by name with their shapes: what a fine-tune's targets are matched against.
    pub fn decoder_layers(&self) -> DecoderLayers {
        DecoderLayers {
            convs: std::iter::once(&self.post_quant_conv)
                .chain(self.decoder.convs())
                .map(|c| (c.name.clone(), c.shape()))
                .collect(),
            norms: self
                .decoder
                .norms()
                .map(|n| (n.name.clone(), n.inner.num_channels))
                .collect(),
        }
    }
}

/// An autoencoder (FLUX.2's or RadVAE) on a `VarStore` path, with greyscale in and out.
#[derive(Debug)]
pub struct Autoencoder {
    pub config: AutoencoderConfig,
    device: tch::Device,
    net: Net,
}

#[derive(Debug)]
enum Net {
    Flux(Box<FluxAutoencoder>),
    RadVae(RadVae),
}

impl Autoencoder {
    /// Builds it under `p`: FLUX.2's variables as [`FluxAutoencoder::new`] names them, RadVAE's as the trainer's
    /// (`enc.*`, `dec.*`), so a RadVAE checkpoint exports to a file this loads.
    pub fn new(p: &nn::Path, config: &AutoencoderConfig) -> Result<Self, ModelError> {
        let net = match config {
            AutoencoderConfig::Flux(c) => Net::Flux(Box::new(FluxAutoencoder::new(p, c)?)),
            AutoencoderConfig::RadVae(c) => Net::RadVae(RadVae::new(p, c)?),
        };
        Ok(Self {
            config: config.clone(),
            device: p.device(),
            net,
        })
    }

    fn check(
        &self,
        input: &'static str,
        x: &Tensor,
        channels: i64,
        multiple: i64,
    ) -> Result<(), ModelError> {
        let size = x.size();
        let ok = size.len() == 4
            && size[1] == channels
            && size[2] % multiple == 0
            && size[3] % multiple == 0
            && size[2] > 0
            && size[3] > 0;
        if ok {
            Ok(())
        } else {
            Err(ModelError::BadInput {
                input,
                reason: format!(
                    "shape {size:?}; expected [batch, {channels}, H, W] with H and W multiples of {multiple}"
                ),
            })
        }
    }

    /// The encoder's mean for greyscale images `x` [B, 1, H, W] in [-1, 1]: [B, z_channels, H/f, W/f].
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        self.check("images", x, 1, self.config.downsampling())?;
        match &self.net {
            Net::Flux(ae) => Ok(ae.encode_mean(x)),
            Net::RadVae(vae) => Ok(vae.encode(x)?.0.to_kind(x.kind())),
        }
    }

    /// Greyscale images [B, 1, H*f, W*f] for latents `z` [B, z_channels, H, W] (FLUX.2: the mean of the decoder's
    /// RGB).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor, ModelError> {
        self.check("latents", z, self.config.z_channels(), 1)?;
        match &self.net {
            Net::Flux(ae) => Ok(ae.decode_with(z, &LayerUpdates::default())),
            Net::RadVae(vae) => Ok(vae.decode(z)?.to_kind(z.kind())),
        }
    }

    /// Images [N, 1, H*f, W*f] in [-1, 1] for the latents a latent RadiT generated, `batch` at a time on the
    /// autoencoder's device. The model learnt standardised latents: `stats` (each channel's mean and std over the
    /// training split, as the store holds them) undo that first.
    pub fn decode_latents(
        &self,
        latents: &Tensor,
        stats: Option<(&[f32], &[f32])>,
        batch: i64,
    ) -> Result<Tensor, ModelError> {
        self.check("latents", latents, self.config.z_channels(), 1)?;
        let latents = match stats {
            None => latents.to_kind(Kind::Float),
            Some((mean, std)) => {
                let c = self.config.z_channels() as usize;
                if mean.len() != c || std.len() != c {
                    return Err(ModelError::BadInput {
                        input: "latent statistics",
                        reason: format!(
                            "{} means and {} stds for {c} channels",
                            mean.len(),
                            std.len()
                        ),
                    });
                }
                let shape = [1, c as i64, 1, 1];
                latents.to_kind(Kind::Float) * Tensor::from_slice(std).view(shape)
                    + Tensor::from_slice(mean).view(shape)
            }
        };
        let n = latents.size()[0];
        let parts = tch::no_grad(|| {
            (0..n)
                .step_by(batch.max(1) as usize)
                .map(|start| {
                    let z = latents
                        .narrow(0, start, batch.max(1).min(n - start))
                        .to_device(self.device);
                    self.decode(&z).map(|x| x.to_device(tch::Device::Cpu))
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(Tensor::cat(&parts, 0))
    }
}

/// The autoencoder that turns a latent model's samples into images (`[samples.decoder]`, `[preview.decoder]`,
/// `radit decode --decoder`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderConfig {
    /// Its weights (safetensors, the original release's naming or diffusers').
    pub weights: std::path::PathBuf,
    /// auto (what the weights file is), flux2, tiny, radvae or radvae-tiny.
    #[serde(default = "default_decoder_preset")]
    pub autoencoder: String,
    /// Latents decoded at once.
    #[serde(default = "default_decode_batch")]
    pub batch: i64,
}

fn default_decoder_preset() -> String {
    AUTO.into()
}

fn default_decode_batch() -> i64 {
    4
}

impl DecoderConfig {
    /// `field` names the section in errors (e.g. `samples.decoder`).
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        check_name(&self.autoencoder)
            .map_err(|e| ConfigError::new(format!("{field}.autoencoder"), e.to_string()))?;
        if !(1..=1024).contains(&self.batch) {
            return Err(ConfigError::new(
                format!("{field}.batch"),
                format!("must be in 1..=1024, got {}", self.batch),
            ));
        }
        if self.weights.as_os_str().is_empty() {
            return Err(ConfigError::new(
                format!("{field}.weights"),
                "give the autoencoder's safetensors file",
            ));
        }
        Ok(())
    }
}

/// A loaded decoder with the channel statistics that undo the standardisation a latent model learnt.
pub struct LatentDecoder {
    _vs: nn::VarStore,
    ae: Autoencoder,
    stats: Option<(Vec<f32>, Vec<f32>)>,
    batch: i64,
}

impl LatentDecoder {
    /// Loads `cfg`'s weights strictly onto `device`; `stats` are the training latents' channel mean and std.
    pub fn load(
        cfg: &DecoderConfig,
        stats: Option<(Vec<f32>, Vec<f32>)>,
        device: tch::Device,
    ) -> Result<Self, ModelError> {
        let ae_cfg = resolve(&cfg.autoencoder, &cfg.weights)?;
        let mut vs = nn::VarStore::new(device);
        let ae = Autoencoder::new(&vs.root(), &ae_cfg)?;
        load(&vs, &ae_cfg, &cfg.weights)?;
        vs.freeze();
        Ok(Self {
            _vs: vs,
            ae,
            stats,
            batch: cfg.batch.max(1),
        })
    }

    /// Images `[N, 1, H*f, W*f]` in [-1, 1] on the CPU for latents `[N, C, H, W]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        let stats = self
            .stats
            .as_ref()
            .map(|(m, s)| (m.as_slice(), s.as_slice()));
        self.ae.decode_latents(latents, stats, self.batch)
    }
}

/// The channel mean and std of a store's training latents (what a latent model trained on it learnt to undo).
pub fn store_statistics(url: &str) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
    let bad = |reason: String| ModelError::BadInput {
        input: "store",
        reason: format!("{url}: {reason}"),
    };
    let storage =
        radit_sharding::store::Storage::open_existing(url).map_err(|e| bad(e.to_string()))?;
    let reader =
        radit_sharding::reader::StoreReader::open(storage).map_err(|e| bad(e.to_string()))?;
    let train = reader
        .latents(radit_sharding::split::Split::Train)
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("has no train/latents array (run `radit encode`)".into()))?;
    Ok((train.channel_mean, train.channel_std))
}

/// Writes the autoencoder's weights in `vs` (original naming, fp32) with its config in the metadata: random
/// weights of a preset for trying the latent path without the released file, or weights trained here.
pub fn save(vs: &nn::VarStore, config: &AutoencoderConfig, path: &Path) -> Result<(), ModelError> {
    save_named(&vs.variables().into_iter().collect(), config, &[], path)
}

/// Writes named weights (gathered from a training engine, say) as an autoencoder file: fp32, the config and
/// `extra` in the metadata, through a temporary file.
pub fn save_named(
    named: &std::collections::BTreeMap<String, Tensor>,
    config: &AutoencoderConfig,
    extra: &[(&str, &str)],
    path: &Path,
) -> Result<(), ModelError> {
    let json = serde_json::to_string(config).map_err(|e| ModelError::BadWeights {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut metadata = vec![(CONFIG_KEY, json.as_str())];
    metadata.extend_from_slice(extra);
    crate::model::write_safetensors(named, &metadata, path)
}

/// The metadata key that marks weights as freshly initialised, never trained.
pub const RANDOM_KEY: &str = "radit.autoencoder.random";

/// Writes freshly initialised weights of `config` (seeded) to `path`, marked as random in their metadata: a
/// stand-in for a released file, to try the encode and decode paths end to end.
pub fn write_random(config: &AutoencoderConfig, seed: i64, path: &Path) -> Result<(), ModelError> {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let _ae = Autoencoder::new(&vs.root(), config)?;
    save_named(
        &vs.variables().into_iter().collect(),
        config,
        &[(RANDOM_KEY, "written by `radit vae init`: never trained")],
        path,
    )
}

/// Whether `weights` are marked as random (see [`write_random`]): what they decode is noise, and a sheet of it
/// must say so.
pub fn is_random(weights: &Path) -> bool {
    crate::model::read_metadata(weights).is_ok_and(|m| m.contains_key(RANDOM_KEY))
}

/// Loads an autoencoder's weights from `path` into `vs`, strictly: FLUX.2's in the original or the diffusers
/// naming, RadVAE's as radit writes them.
pub fn load(vs: &nn::VarStore, config: &AutoencoderConfig, path: &Path) -> Result<(), ModelError> {
    let file = crate::model::read_weights(path)?;
    let tensors = match config {
        AutoencoderConfig::Flux(c) => names::to_original(file.tensors, c, path)?,
        AutoencoderConfig::RadVae(_) => file.tensors,
    };
    crate::model::load_named(vs, &tensors, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closed_form_counts_what_is_built() {
        let flux2 = AeConfig::flux2();
        let (e, d, q) = flux2.parameter_counts();
        assert_eq!((e, d, q), (34_421_696, 49_619_203, 5_216));
        assert_eq!(e + d + q, 84_046_115);
        for cfg in [AeConfig::tiny(), flux2] {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let _ae = FluxAutoencoder::new(&vs.root(), &cfg).unwrap();
            let built: i64 = vs
                .trainable_variables()
                .iter()
                .map(Tensor::numel)
                .sum::<usize>() as i64;
            let (e, d, q) = cfg.parameter_counts();
            assert_eq!(built, e + d + q, "{cfg:?}");
        }
    }

    #[test]
    fn encoder_flops_by_hand() {
        // A 1-level encoder on 4x4: conv_in 3->2 (3x3), one resnet 2->2, mid (two resnets, attention over 16
        // positions), conv_out 2->2z, quant 1x1.
        let cfg = AeConfig {
            in_channels: 3,
            out_channels: 3,
            ch: 2,
            ch_mult: vec![1],
            num_res_blocks: 1,
            z_channels: 1,
            norm_groups: 1,
            eps: 1e-6,
            grey: Grey::Mean,
        };
        let c3 = |cin: f64, cout: f64| 2.0 * cin * cout * 9.0 * 16.0;
        let resnet = 2.0 * c3(2.0, 2.0);
        let attention = 4.0 * (2.0 * 4.0 * 16.0) + 2.0 * (2.0 * 256.0 * 2.0);
        let want = c3(3.0, 2.0)
            + resnet
            + 2.0 * resnet
            + attention
            + c3(2.0, 2.0)
            + 2.0 * 2.0 * 2.0 * 16.0;
        assert_eq!(cfg.encoder_flops(4), want);
        // Its decoder: post-quant 1x1 z->z, conv_in z->2 (3x3), the mid block, two resnets (one more than the
        // encoder's), conv_out 2->3.
        let decoder = 2.0 * 16.0
            + 2.0 * 2.0 * 9.0 * 16.0
            + 2.0 * resnet
            + attention
            + 2.0 * resnet
            + c3(2.0, 3.0);
        assert_eq!(cfg.decoder_flops(4), decoder);
        // FLUX.2 at 512x512: about 1.1 TFLOP (latents.md's estimate).
        let t = AeConfig::flux2().encoder_flops(512) / 1e12;
        assert!((1.0..1.3).contains(&t), "{t}");
    }

    #[test]
    fn shapes_and_bad_inputs() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let ae = Autoencoder::new(&vs.root(), &AeConfig::tiny().into()).unwrap();
        let x = Tensor::rand([2, 1, 16, 12], (Kind::Float, tch::Device::Cpu)) * 2 - 1;
        let z = ae.encode_mean(&x).unwrap();
        assert_eq!(z.size(), [2, 4, 8, 6]);
        assert_eq!(ae.decode(&z).unwrap().size(), [2, 1, 16, 12]);
        let e = ae.encode_mean(&Tensor::zeros(
            [1, 1, 15, 16],
            (Kind::Float, tch::Device::Cpu),
        ));
        assert!(e.unwrap_err().to_string().contains("multiples of 2"));
        let e = ae.decode(&Tensor::zeros(
            [1, 3, 8, 8],
            (Kind::Float, tch::Device::Cpu),
        ));
        assert!(e.unwrap_err().to_string().contains("[batch, 4, H, W]"));
        let mut bad = AeConfig::tiny();
        bad.norm_groups = 5;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("norm_groups")
        );
    }
}

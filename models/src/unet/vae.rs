//! RadVAE (Scratch): the paper's autoencoder trained from scratch out of EDM2's magnitude-preserving blocks
//! (../shared/design/latents.md): 512x512x1 images to 16x64x64 latents. The encoder is EDM2's (a 3x3 input
//! convolution on the image and a ones channel, per level a down block after the first and three blocks, then an
//! attention block and a plain block at the bottleneck, a 1x1 convolution to the latent's mean and log-variance);
//! the decoder mirrors it (a 1x1 convolution from the latent, the bottleneck's attention and plain block, per level
//! an up block before all but the lowest and three blocks, a 3x3 output convolution). No embedding, no skip
//! connections between encoder and decoder, no dropout. The design note's closed form gives 88,305,024 parameters.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use super::config::{BlockPlan, Flavor};
use super::mp::{MpConv, Resample};
use super::net::UNetBlock;
use crate::block::ModelInputs;
use crate::error::ModelError;
use crate::precision::Precision;
use crate::staged::{StageInputs, StagedModel};

/// The reparameterisation noise's keyed stream (apart from every block's dropout stream).
const LATENT_NOISE: u64 = 0x5eed_1a7e;

/// Preset names accepted by [`RadVaeConfig::preset`].
pub const RADVAE_PRESETS: [&str; 2] = ["radvae", "radvae-tiny"];

/// The architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RadVaeConfig {
    pub img_resolution: i64,
    pub img_channels: i64,
    pub latent_channels: i64,
    pub model_channels: i64,
    pub channel_mult: Vec<i64>,
    /// Blocks per level, in the encoder and in the decoder alike.
    pub num_blocks: usize,
    pub channels_per_head: i64,
}

/// The blocks of both halves in the order they run.
#[derive(Debug, Clone, PartialEq)]
pub struct VaePlan {
    pub encoder: Vec<BlockPlan>,
    pub decoder: Vec<BlockPlan>,
    /// Channels at the bottleneck.
    pub bottleneck: i64,
    /// Channels of the first level (the input and output convolutions').
    pub top: i64,
}

impl RadVaeConfig {
    /// `radvae` (the paper's, Table 4 and B.1) and `radvae-tiny` (tests).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let c = |img_resolution,
                 latent_channels,
                 model_channels,
                 mult: &[i64],
                 num_blocks,
                 channels_per_head| Self {
            img_resolution,
            img_channels: 1,
            latent_channels,
            model_channels,
            channel_mult: mult.to_vec(),
            num_blocks,
            channels_per_head,
        };
        Ok(match name {
            "radvae" => c(512, 16, 128, &[1, 2, 3, 4], 3, 64),
            "radvae-tiny" => c(16, 4, 16, &[1, 2], 1, 16),
            other => {
                return Err(ModelError::UnknownPreset {
                    name: other.to_string(),
                    known: RADVAE_PRESETS.join(", "),
                });
            }
        })
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, reason: String| {
            Err(radit_protocol::ConfigError::new(format!("vae.{field}"), reason).into())
        };
        super::config::check_levels(
            "vae",
            self.model_channels,
            &self.channel_mult,
            self.img_resolution,
        )?;
        if self.img_channels <= 0 || self.latent_channels <= 0 {
            return bad(
                "latent_channels",
                "img_channels and latent_channels must be positive".into(),
            );
        }
        let bottleneck = self.plan().bottleneck;
        if self.channels_per_head <= 0 || bottleneck % self.channels_per_head != 0 {
            return bad(
                "channels_per_head",
                format!(
                    "the bottleneck's {bottleneck} channels are not whole {}-channel heads",
                    self.channels_per_head
                ),
            );
        }
        Ok(())
    }

    /// Downsampling factor from image to latent.
    pub fn downsampling(&self) -> i64 {
        1 << (self.channel_mult.len() - 1)
    }

    /// Forward FLOPs (encode then decode) for one image, 2 per multiply-add.
    pub fn flops_per_image(&self) -> f64 {
        self.encoder_flops() + self.decoder_flops()
    }

    /// FLOPs of one image's latent mean and log-variance.
    pub fn encoder_flops(&self) -> f64 {
        use super::config::{blocks_flops, conv_flops};
        let plan = self.plan();
        conv_flops(
            self.img_channels + 1,
            plan.top,
            3.0,
            self.img_resolution as f64,
        ) + blocks_flops(plan.encoder.iter(), 0)
            + conv_flops(
                plan.bottleneck,
                2 * self.latent_channels,
                1.0,
                self.latent_side(),
            )
    }

    /// FLOPs of one latent's decoding.
    pub fn decoder_flops(&self) -> f64 {
        use super::config::{blocks_flops, conv_flops};
        let plan = self.plan();
        conv_flops(
            self.latent_channels,
            plan.bottleneck,
            1.0,
            self.latent_side(),
        ) + blocks_flops(plan.decoder.iter(), 0)
            + conv_flops(plan.top, self.img_channels, 3.0, self.img_resolution as f64)
    }

    fn latent_side(&self) -> f64 {
        (self.img_resolution / self.downsampling()) as f64
    }

    pub fn plan(&self) -> VaePlan {
        let widths: Vec<i64> = self
            .channel_mult
            .iter()
            .map(|m| self.model_channels * m)
            .collect();
        let block = |name: String, cin, cout, flavor, resample, attention, resolution| BlockPlan {
            name,
            cin,
            cout,
            flavor,
            resample,
            attention,
            resolution,
            takes_skip: false,
        };
        let lowest = self.img_resolution >> (widths.len() - 1);
        let mut encoder = Vec::new();
        let mut cout = widths[0];
        for (level, &channels) in widths.iter().enumerate() {
            let res = self.img_resolution >> level;
            if level > 0 {
                encoder.push(block(
                    format!("enc.{res}x{res}_down"),
                    cout,
                    cout,
                    Flavor::Enc,
                    Resample::Down,
                    false,
                    res,
                ));
            }
            for i in 0..self.num_blocks {
                encoder.push(block(
                    format!("enc.{res}x{res}_block{i}"),
                    cout,
                    channels,
                    Flavor::Enc,
                    Resample::Keep,
                    false,
                    res,
                ));
                cout = channels;
            }
        }
        let bottleneck = cout;
        for (i, attention) in [true, false].into_iter().enumerate() {
            encoder.push(block(
                format!("enc.{lowest}x{lowest}_mid{i}"),
                cout,
                cout,
                Flavor::Enc,
                Resample::Keep,
                attention,
                lowest,
            ));
        }
        let mut decoder = Vec::new();
        for (i, attention) in [true, false].into_iter().enumerate() {
            decoder.push(block(
                format!("dec.{lowest}x{lowest}_mid{i}"),
                cout,
                cout,
                Flavor::Dec,
                Resample::Keep,
                attention,
                lowest,
            ));
        }
        for (level, &channels) in widths.iter().enumerate().rev() {
            let res = self.img_resolution >> level;
            if level < widths.len() - 1 {
                decoder.push(block(
                    format!("dec.{res}x{res}_up"),
                    cout,
                    cout,
                    Flavor::Dec,
                    Resample::Up,
                    false,
                    res,
                ));
            }
            for i in 0..self.num_blocks {
                decoder.push(block(
                    format!("dec.{res}x{res}_block{i}"),
                    cout,
                    channels,
                    Flavor::Dec,
                    Resample::Keep,
                    false,
                    res,
                ));
                cout = channels;
            }
        }
        VaePlan {
            encoder,
            decoder,
            bottleneck,
            top: widths[0],
        }
    }

    /// The closed form: the input convolution (image and a ones channel), every block, the 1x1 convolutions into
    /// (mean and log-variance) and out of the latent, the output convolution.
    pub fn parameter_count(&self) -> u64 {
        let (encoder, decoder) = self.parameter_split();
        encoder + decoder
    }

    /// Parameters of the encoder (to the latent's moments) and of the decoder, in closed form.
    pub fn parameter_split(&self) -> (u64, u64) {
        let p = self.plan();
        let (top, bottleneck, latent) = (
            p.top as u64,
            p.bottleneck as u64,
            self.latent_channels as u64,
        );
        let image = self.img_channels as u64;
        let blocks = |list: &[BlockPlan]| -> u64 {
            list.iter()
                .map(|b| super::config::block_parameters(b, None))
                .sum()
        };
        (
            (image + 1) * top * 9 + blocks(&p.encoder) + bottleneck * 2 * latent,
            latent * bottleneck + blocks(&p.decoder) + top * image * 9,
        )
    }
}

/// The autoencoder. Parameter paths: `enc.512x512_conv`, `enc.{res}x{res}_block{i}`, `enc.out`, `dec.in`, ...,
/// `dec.out_conv`.
#[derive(Debug)]
pub struct RadVae {
    cfg: RadVaeConfig,
    input_conv: MpConv,
    encoder: Vec<UNetBlock>,
    to_latent: MpConv,
    from_latent: MpConv,
    decoder: Vec<UNetBlock>,
    out_conv: MpConv,
    precision: Precision,
}

impl RadVae {
    pub fn new(p: &nn::Path, cfg: &RadVaeConfig) -> Result<Self, ModelError> {
        cfg.validate()?;
        let plan = cfg.plan();
        let at = |name: &str| name.split('.').fold(p.clone(), |path, part| &path / part);
        let top = cfg.img_resolution;
        let blocks = |list: &[BlockPlan], first: usize| -> Vec<UNetBlock> {
            list.iter()
                .enumerate()
                .map(|(i, b)| {
                    UNetBlock::new(
                        &at(&b.name),
                        b,
                        (first + i) as u64,
                        cfg.channels_per_head,
                        0.0,
                        None,
                    )
                })
                .collect()
        };
        Ok(Self {
            input_conv: MpConv::new(
                &at(&format!("enc.{top}x{top}_conv")),
                cfg.img_channels + 1,
                plan.top,
                3,
            ),
            encoder: blocks(&plan.encoder, 0),
            to_latent: MpConv::new(&at("enc.out"), plan.bottleneck, 2 * cfg.latent_channels, 1),
            from_latent: MpConv::new(&at("dec.in"), cfg.latent_channels, plan.bottleneck, 1),
            decoder: blocks(&plan.decoder, plan.encoder.len()),
            out_conv: MpConv::new(&at("dec.out_conv"), plan.top, cfg.img_channels, 3),
            cfg: cfg.clone(),
            precision: Precision::Fp32,
        })
    }

    pub fn config(&self) -> &RadVaeConfig {
        &self.cfg
    }

    /// The latent's mean and log-variance, each [B, latent, S/f, S/f], from images [B, C, S, S] in [-1, 1].
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        self.check_images(x)?;
        let ones = x.narrow(1, 0, 1).ones_like();
        let mut h = self.input_conv.forward(&Tensor::cat(&[x, &ones], 1));
        for block in &self.encoder {
            h = block.forward(&h, None, None);
        }
        Ok(self.latent_moments(&h))
    }

    fn latent_moments(&self, h: &Tensor) -> (Tensor, Tensor) {
        let out = self.to_latent.forward(h).to_kind(Kind::Float);
        let parts = out.chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].shallow_clone())
    }

    fn check_images(&self, x: &Tensor) -> Result<(), ModelError> {
        let c = &self.cfg;
        let want = [c.img_channels, c.img_resolution, c.img_resolution];
        let size = x.size();
        if size.len() != 4 || size[1..] != want || size[0] == 0 || !x.is_floating_point() {
            return Err(ModelError::BadInput {
                input: "images",
                reason: format!(
                    "{:?} {size:?}; expected float [batch, {}, {}, {}]",
                    x.kind(),
                    want[0],
                    want[1],
                    want[2]
                ),
            });
        }
        Ok(())
    }

    /// Images [B, C, S, S] from latents [B, latent, S/f, S/f].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor, ModelError> {
        let c = &self.cfg;
        let side = c.img_resolution / c.downsampling();
        let size = z.size();
        if size.len() != 4 || size[1..] != [c.latent_channels, side, side] || size[0] == 0 {
            return Err(ModelError::BadInput {
                input: "latents",
                reason: format!(
                    "{size:?}; expected [batch, {}, {side}, {side}]",
                    c.latent_channels
                ),
            });
        }
        let mut h = self.from_latent.forward(z);
        for block in &self.decoder {
            h = block.forward(&h, None, None);
        }
        Ok(self.out_conv.forward(&h).to_kind(Kind::Float))
    }

    /// Forced weight normalisation of every MPConv weight (after each optimiser step in training).
    pub fn force_normalize(&self) {
        for conv in [
            &self.input_conv,
            &self.to_latent,
            &self.from_latent,
            &self.out_conv,
        ]
        .into_iter()
        .chain(
            self.encoder
                .iter()
                .chain(&self.decoder)
                .flat_map(UNetBlock::convs),
        ) {
            conv.force_normalize();
        }
    }
}

/// Training: stage 0 the input convolution, one stage per encoder block, the latent (mean, log-variance and the
/// sample z = mean + exp(logvar / 2) * noise, the noise keyed per sample; the mean when there are no keys), the
/// projection out of the latent, one stage per decoder block, the output convolution. The output is the
/// reconstruction, followed by the latent's mean and log-variance; `inputs.x` are the images (the conditions are
/// not read).
impl StagedModel for RadVae {
    fn groups(&self) -> Vec<String> {
        std::iter::once("rest".to_string())
            .chain(
                self.encoder
                    .iter()
                    .chain(&self.decoder)
                    .map(|b| b.name().to_string()),
            )
            .collect()
    }

    fn group_of(&self, name: &str) -> usize {
        let (e, d) = (self.encoder.len(), self.decoder.len());
        match self.stage_of(name) {
            s if (1..=e).contains(&s) => s,
            s if (e + 3..e + 3 + d).contains(&s) => s - 2,
            _ => 0,
        }
    }

    fn stages(&self) -> usize {
        self.encoder.len() + self.decoder.len() + 4
    }

    fn stage_of(&self, name: &str) -> usize {
        let (e, d) = (self.encoder.len(), self.decoder.len());
        let within = |path: &str| super::net::under(name, path);
        if let Some(i) = self.encoder.iter().position(|b| within(b.name())) {
            return i + 1;
        }
        if let Some(i) = self.decoder.iter().position(|b| within(b.name())) {
            return e + 3 + i;
        }
        match () {
            _ if within("enc.out") => e + 1,
            _ if within("dec.in") => e + 2,
            _ if within("dec.out_conv") => e + d + 3,
            _ => 0,
        }
    }

    fn check_inputs(&self, inputs: &ModelInputs) -> Result<(), ModelError> {
        self.check_images(inputs.x)
    }

    fn stage(
        &self,
        i: usize,
        values: &[Tensor],
        at: &StageInputs,
    ) -> Result<Vec<Tensor>, ModelError> {
        let (e, d) = (self.encoder.len(), self.decoder.len());
        let kind = self.precision.compute_kind();
        if i == 0 {
            let x = at.inputs.x.to_kind(kind);
            let ones = x.narrow(1, 0, 1).ones_like();
            return Ok(vec![self.input_conv.forward(&Tensor::cat(&[&x, &ones], 1))]);
        }
        let h = values.last().ok_or_else(|| ModelError::BadInput {
            input: "x",
            reason: format!("stage {i} ran before the input convolution"),
        })?;
        Ok(match i {
            i if i <= e => vec![self.encoder[i - 1].forward(h, None, None)],
            i if i == e + 1 => {
                let (mean, logvar) = self.latent_moments(h);
                let z = match at.keys {
                    Some(keys) => {
                        let noise =
                            super::dropout::keyed_normal(keys, LATENT_NOISE, &mean.size()[1..]);
                        &mean + (&logvar * 0.5).exp() * noise.to_device(mean.device())
                    }
                    None => mean.shallow_clone(),
                };
                vec![mean, logvar, z.to_kind(kind)]
            }
            i if i == e + 2 => vec![self.from_latent.forward(h)],
            i if i < e + 3 + d => vec![self.decoder[i - e - 3].forward(h, None, None)],
            // The reconstruction, then the latent's moments again: the objective's KL term reads them.
            _ => vec![
                self.out_conv.forward(h).to_kind(Kind::Float),
                values[e + 1].shallow_clone(),
                values[e + 2].shallow_clone(),
            ],
        })
    }

    fn normalized_rows(&self, name: &str) -> bool {
        name.ends_with(".weight")
    }

    fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn::VarStore};

    #[test]
    fn its_stages_reconstruct_as_encode_then_decode_and_cover_every_parameter_once() {
        tch::manual_seed(1);
        let cfg = RadVaeConfig::preset("radvae-tiny").unwrap();
        let vs = VarStore::new(Device::Cpu);
        let vae = RadVae::new(&vs.root(), &cfg).unwrap();
        let x = Tensor::rand([3, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let (t, labels, age) = (x.zeros_like(), x.zeros_like(), x.zeros_like());
        let inputs = ModelInputs {
            x: &x,
            t: &t,
            labels: &labels,
            age: &age,
        };
        let staged = crate::staged::run_stages(&vae, &StageInputs { inputs, keys: None }).unwrap();
        let (mean, logvar) = vae.encode(&x).unwrap();
        let direct = vae.decode(&mean).unwrap();
        assert!(staged[0].allclose(&direct, 1e-6, 1e-6, false));
        // The last stage hands the objective the latent's moments too.
        assert!(staged[1].allclose(&mean, 1e-6, 1e-6, false));
        assert!(staged[2].allclose(&logvar, 1e-6, 1e-6, false));
        // With keys the latent is sampled: another reconstruction, the same for a sample in any batch.
        let keys = super::super::dropout::keys(3, 0, &[7, 8, 9]);
        let sampled = crate::staged::run_stages(
            &vae,
            &StageInputs {
                inputs,
                keys: Some(&keys),
            },
        )
        .unwrap();
        assert!(!sampled[0].allclose(&direct, 1e-4, 1e-4, false));
        let stages = vae.stages();
        let groups = vae.groups().len();
        for (name, _) in vs.variables() {
            assert!(vae.stage_of(&name) < stages, "{name}");
            assert!(vae.group_of(&name) < groups, "{name}");
        }
        assert_eq!(vae.stage_of("dec.out_conv.weight"), stages - 1);
        assert_eq!(vae.group_of("dec.out_conv.weight"), 0);
        assert_eq!(
            vae.groups()[vae.group_of("dec.16x16_block0.conv_res0.weight")],
            "dec.16x16_block0"
        );
    }

    #[test]
    fn the_closed_form_count_is_the_design_notes_and_the_built_network_has_it() {
        assert_eq!(
            RadVaeConfig::preset("radvae").unwrap().parameter_count(),
            88_305_024
        );
        tch::manual_seed(0);
        let cfg = RadVaeConfig::preset("radvae-tiny").unwrap();
        let vs = VarStore::new(Device::Cpu);
        let vae = RadVae::new(&vs.root(), &cfg).unwrap();
        let built: i64 = vs
            .trainable_variables()
            .iter()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum();
        assert_eq!(built as u64, cfg.parameter_count());
        let x = Tensor::rand([2, 1, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let (mean, logvar) = vae.encode(&x).unwrap();
        assert_eq!(mean.size(), [2, 4, 8, 8]);
        assert_eq!(logvar.size(), [2, 4, 8, 8]);
        let y = vae.decode(&mean).unwrap();
        assert_eq!(y.size(), [2, 1, 16, 16]);
        let err = vae.decode(&x).unwrap_err();
        assert!(
            err.to_string().contains("expected [batch, 4, 8, 8]"),
            "{err}"
        );
        let err = vae.encode(&mean).unwrap_err();
        assert!(err.to_string().contains("images"), "{err}");
    }
}

//! RadUNet's architecture: the presets of ../shared/design/radunet.md, the plan of blocks the network is built
//! from, and its closed-form parameter count and FLOPs, read off the same plan.

use serde::{Deserialize, Serialize};

use super::mp::Resample;
use crate::error::ModelError;
use crate::model::schema_classes;

/// Preset names accepted by [`UNetConfig::preset`].
pub const UNET_PRESETS: [&str; 4] = ["unet-pixel", "unet-latent", "unet-small", "unet-tiny"];

/// The architecture. EDM2's knobs keep EDM2's names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UNetConfig {
    /// Image (or latent) side.
    pub img_resolution: i64,
    /// Image (or latent) channels in and out.
    pub img_channels: i64,
    /// Base channel count; level i has `model_channels * channel_mult[i]`.
    pub model_channels: i64,
    pub channel_mult: Vec<i64>,
    /// Residual blocks per level (the decoder has one more).
    pub num_blocks: usize,
    /// Resolutions whose blocks have self-attention.
    pub attn_resolutions: Vec<i64>,
    #[serde(default = "default_channels_per_head")]
    pub channels_per_head: i64,
    /// Dropout in the residual branch (applied only in training).
    #[serde(default)]
    pub dropout: f64,
    /// Classes of each metadata variable (index 0 = missing), as RadiT's.
    #[serde(default = "schema_classes")]
    pub classes: Vec<i64>,
}

fn default_channels_per_head() -> i64 {
    64
}

/// EDM2's fixed balances: residual and attention branches 0.3, label 0.5, skip concatenation 0.5; clip ±256.
pub const RES_BALANCE: f64 = 0.3;
pub const ATTN_BALANCE: f64 = 0.3;
pub const LABEL_BALANCE: f64 = 0.5;
pub const CONCAT_BALANCE: f64 = 0.5;
pub const CLIP_ACT: f64 = 256.0;

/// Encoder or decoder flavour of a block (where the 1x1 skip convolution sits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Enc,
    Dec,
}

/// One block of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPlan {
    /// Its parameter path (`enc.16x16_block0`).
    pub name: String,
    pub cin: i64,
    pub cout: i64,
    pub flavor: Flavor,
    pub resample: Resample,
    pub attention: bool,
    /// The resolution it works at (after its resampling).
    pub resolution: i64,
    /// A decoder block fed `mp_cat(x, skip)`: `cin` counts both.
    pub takes_skip: bool,
}

/// The whole network as built: the encoder's first convolution, the encoder's and the decoder's blocks in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// (path, in channels, out channels) of the 3x3 input convolution (the input has a ones channel added).
    pub input_conv: (String, i64, i64),
    pub encoder: Vec<BlockPlan>,
    pub decoder: Vec<BlockPlan>,
    /// Channels into the 3x3 output convolution.
    pub out_cin: i64,
    /// The noise embedding's Fourier channels and the embedding width.
    pub cnoise: i64,
    pub cemb: i64,
}

/// Parameters of a RadUNet, split as the design note counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UNetCount {
    /// Everything but the metadata embedding (the design note's closed form).
    pub network: u64,
    /// The metadata embedding: one table per variable (K x cemb), age's Fourier projection and its null vector.
    pub label_path: u64,
}

impl UNetCount {
    pub fn total(&self) -> u64 {
        self.network + self.label_path
    }
}

impl UNetConfig {
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let c = |img_resolution,
                 img_channels,
                 model_channels,
                 mult: &[i64],
                 blocks,
                 attn: &[i64],
                 dropout| {
            UNetConfig {
                img_resolution,
                img_channels,
                model_channels,
                channel_mult: mult.to_vec(),
                num_blocks: blocks,
                attn_resolutions: attn.to_vec(),
                channels_per_head: 64,
                dropout,
                classes: schema_classes(),
            }
        };
        Ok(match name {
            "unet-pixel" => c(512, 1, 32, &[1, 2, 4, 8, 16, 32], 3, &[32, 16], 0.0),
            "unet-latent" => c(64, 32, 256, &[1, 2, 3, 4], 3, &[16, 8], 0.1),
            // unet-latent at a quarter of its width on 32x32x32 latents (31M parameters): the CPU benchmarks' size.
            "unet-small" => c(32, 32, 64, &[1, 2, 3, 4], 3, &[16, 8], 0.1),
            // Two levels, attention at the lower one: the twin's and the tests' size.
            "unet-tiny" => UNetConfig {
                channels_per_head: 16,
                ..c(16, 1, 16, &[1, 2], 1, &[8], 0.0)
            },
            other => {
                return Err(ModelError::UnknownPreset {
                    name: other.to_string(),
                    known: UNET_PRESETS.join(", "),
                });
            }
        })
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, reason: String| {
            Err(radit_protocol::ConfigError::new(format!("model.{field}"), reason).into())
        };
        check_levels(
            "model",
            self.model_channels,
            &self.channel_mult,
            self.img_resolution,
        )?;
        if self.img_channels <= 0 {
            return bad(
                "img_channels",
                format!("must be positive, got {}", self.img_channels),
            );
        }
        let plan = self.plan();
        if let Some(b) = plan
            .encoder
            .iter()
            .chain(&plan.decoder)
            .find(|b| b.attention && b.cout % self.channels_per_head != 0)
        {
            return bad(
                "channels_per_head",
                format!(
                    "{}: {} channels are not a whole number of {}-channel heads",
                    b.name, b.cout, self.channels_per_head
                ),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// The blocks in the order the network runs them, with their names and widths (EDM2's U-Net, Figure 21).
    pub fn plan(&self) -> Plan {
        let widths: Vec<i64> = self
            .channel_mult
            .iter()
            .map(|m| self.model_channels * m)
            .collect();
        let cnoise = widths[0];
        let cemb = *widths.iter().max().unwrap_or(&1);
        let attn = |res: i64| self.attn_resolutions.contains(&res);
        let block =
            |name: String, cin, cout, flavor, resample, attention, resolution, takes_skip| {
                BlockPlan {
                    name,
                    cin,
                    cout,
                    flavor,
                    resample,
                    attention,
                    resolution,
                    takes_skip,
                }
            };
        let mut encoder = Vec::new();
        let mut skips = Vec::new();
        let top = self.img_resolution;
        let input_conv = (
            format!("enc.{top}x{top}_conv"),
            self.img_channels + 1,
            widths[0],
        );
        skips.push(widths[0]);
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
                    false,
                ));
                skips.push(cout);
            }
            for idx in 0..self.num_blocks {
                let cin = cout;
                cout = channels;
                encoder.push(block(
                    format!("enc.{res}x{res}_block{idx}"),
                    cin,
                    cout,
                    Flavor::Enc,
                    Resample::Keep,
                    attn(res),
                    res,
                    false,
                ));
                skips.push(cout);
            }
        }
        let mut decoder = Vec::new();
        for (level, &channels) in widths.iter().enumerate().rev() {
            let res = self.img_resolution >> level;
            if level == widths.len() - 1 {
                decoder.push(block(
                    format!("dec.{res}x{res}_in0"),
                    cout,
                    cout,
                    Flavor::Dec,
                    Resample::Keep,
                    true,
                    res,
                    false,
                ));
                decoder.push(block(
                    format!("dec.{res}x{res}_in1"),
                    cout,
                    cout,
                    Flavor::Dec,
                    Resample::Keep,
                    false,
                    res,
                    false,
                ));
            } else {
                decoder.push(block(
                    format!("dec.{res}x{res}_up"),
                    cout,
                    cout,
                    Flavor::Dec,
                    Resample::Up,
                    false,
                    res,
                    false,
                ));
            }
            for idx in 0..=self.num_blocks {
                let cin = cout + skips.pop().unwrap_or(0);
                cout = channels;
                decoder.push(block(
                    format!("dec.{res}x{res}_block{idx}"),
                    cin,
                    cout,
                    Flavor::Dec,
                    Resample::Keep,
                    attn(res),
                    res,
                    true,
                ));
            }
        }
        Plan {
            input_conv,
            encoder,
            decoder,
            out_cin: cout,
            cnoise,
            cemb,
        }
    }

    /// The closed-form parameter count, off the plan (MPFourier's frequencies and phases are buffers).
    pub fn parameter_count(&self) -> UNetCount {
        let plan = self.plan();
        let cemb = plan.cemb as u64;
        let (cin, cout) = (plan.input_conv.1 as u64, plan.input_conv.2 as u64);
        let mut network = 1 + plan.cnoise as u64 * cemb + cin * cout * 9;
        for b in plan.encoder.iter().chain(&plan.decoder) {
            network += block_parameters(b, Some(cemb));
        }
        network += plan.out_cin as u64 * self.img_channels as u64 * 9;
        let tables: u64 = self.classes.iter().map(|&k| k as u64 * cemb).sum();
        UNetCount {
            network,
            label_path: tables + plan.cnoise as u64 * cemb + cemb,
        }
    }

    /// Forward FLOPs for one image (2 per multiply-add: convolutions, linear layers, attention's two products).
    pub fn flops_per_image(&self) -> f64 {
        let plan = self.plan();
        let top = self.img_resolution as f64;
        let conv = conv_flops;
        conv(plan.input_conv.1, plan.input_conv.2, 3.0, top)
            + conv(plan.out_cin, self.img_channels, 3.0, top)
            + 2.0 * (plan.cnoise * plan.cemb) as f64 * 2.0
            + blocks_flops(plan.encoder.iter().chain(&plan.decoder), plan.cemb)
    }
}

/// FLOPs of a convolution (2 per multiply-add) from `cin` to `cout` channels, `k` x `k`, over `res` x `res`.
pub(crate) fn conv_flops(cin: i64, cout: i64, k: f64, res: f64) -> f64 {
    2.0 * cin as f64 * cout as f64 * k * k * res * res
}

/// Forward FLOPs of U-Net blocks: their convolutions, the embedding's linear layer (`cemb` channels; 0 without
/// one), attention's projections and two products.
pub(crate) fn blocks_flops<'a>(blocks: impl Iterator<Item = &'a BlockPlan>, cemb: i64) -> f64 {
    let conv = conv_flops;
    let mut flops = 0.0;
    for b in blocks {
        let res = b.resolution as f64;
        let (cin, cout) = (b.cin, b.cout);
        let res0_in = if b.flavor == Flavor::Enc { cout } else { cin };
        flops += conv(res0_in, cout, 3.0, res) + conv(cout, cout, 3.0, res);
        flops += 2.0 * (cemb * cout) as f64;
        if cin != cout {
            // The encoder's skip runs after resampling, the decoder's on the block's input: same resolution.
            flops += conv(cin, cout, 1.0, res);
        }
        if b.attention {
            let tokens = res * res;
            flops += conv(cout, 3 * cout, 1.0, res) + conv(cout, cout, 1.0, res);
            flops += 2.0 * 2.0 * tokens * tokens * cout as f64;
        }
    }
    flops
}

impl UNetConfig {
    /// `radit model info` for a U-Net preset: the counts (the network's closed form and the metadata embedding
    /// apart, as the design note counts them) and FLOPs per image, as text or JSON.
    pub fn report(&self, preset: &str, json: bool) -> String {
        let count = self.parameter_count();
        let forward = self.flops_per_image();
        if json {
            return serde_json::json!({
                "preset": preset, "config": self, "parameters": count.total(), "breakdown": count,
                "forward_flops_per_image": forward, "training_flops_per_image": 3.0 * forward,
            })
            .to_string();
        }
        let plan = self.plan();
        let attention = plan
            .encoder
            .iter()
            .chain(&plan.decoder)
            .filter(|b| b.attention)
            .count();
        format!(
            "RadUNet {preset}: {} parameters ({:.3}B)\n  \
             network {} (the design note's closed form, without the metadata embedding) + metadata embedding {}\n  \
             input {}x{}x{}; channels {} x {:?}, {} blocks a level, attention at {:?} ({} of {} blocks, {}-channel \
             heads), embedding {}, dropout {}\n  \
             FLOPs per image: forward {:.3} GFLOP, training (forward + backward) {:.3} GFLOP",
            count.total(),
            count.total() as f64 / 1e9,
            count.network,
            count.label_path,
            self.img_resolution,
            self.img_resolution,
            self.img_channels,
            self.model_channels,
            self.channel_mult,
            self.num_blocks,
            self.attn_resolutions,
            attention,
            plan.encoder.len() + plan.decoder.len(),
            self.channels_per_head,
            plan.cemb,
            self.dropout,
            forward / 1e9,
            3.0 * forward / 1e9,
        )
    }
}

/// A block's parameters: emb_gain, conv_res0 (3x3), emb_linear, conv_res1 (3x3), the 1x1 skip where widths differ,
/// and qkv and proj (1x1) where it attends.
/// The levels both EDM2 networks share (RadUNet's, RadVAE's): positive widths, and a side that halves once per level
/// down to the lowest. `section` names the config's section in the error.
pub(crate) fn check_levels(
    section: &str,
    model_channels: i64,
    channel_mult: &[i64],
    img_resolution: i64,
) -> Result<(), ModelError> {
    let bad = |field: &str, reason: String| {
        Err(radit_protocol::ConfigError::new(format!("{section}.{field}"), reason).into())
    };
    let levels = channel_mult.len() as u32;
    if levels == 0 || channel_mult.iter().any(|&m| m <= 0) || model_channels <= 0 {
        return bad(
            "channel_mult",
            "model_channels and every channel_mult must be positive".into(),
        );
    }
    if img_resolution <= 0 || img_resolution % (1 << (levels - 1)) != 0 {
        return bad(
            "img_resolution",
            format!(
                "img_resolution {img_resolution} must be a multiple of 2^{} (one halving per level)",
                levels - 1
            ),
        );
    }
    Ok(())
}

/// A block's parameters; `cemb` is the embedding's width (its gain and projection), `None` without one.
pub(crate) fn block_parameters(b: &BlockPlan, cemb: Option<u64>) -> u64 {
    let (cin, cout) = (b.cin as u64, b.cout as u64);
    let res0_in = if b.flavor == Flavor::Enc { cout } else { cin };
    let mut n = res0_in * cout * 9 + cout * cout * 9 + cemb.map_or(0, |c| 1 + c * cout);
    if cin != cout {
        n += cin * cout;
    }
    if b.attention {
        n += 4 * cout * cout;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closed_form_counts_are_the_design_notes() {
        assert_eq!(
            UNetConfig::preset("unet-pixel")
                .unwrap()
                .parameter_count()
                .network,
            364_524_439
        );
        assert_eq!(
            UNetConfig::preset("unet-latent")
                .unwrap()
                .parameter_count()
                .network,
            496_912_677
        );
        // EDM2-M at 512x512 (64x64x4 latents, 1000 classes through one MPConv): the EDM2 paper's 498M, exactly.
        let m = UNetConfig {
            img_channels: 4,
            ..UNetConfig::preset("unet-latent").unwrap()
        };
        let cemb = m.plan().cemb as u64;
        assert_eq!(m.parameter_count().network + 1000 * cemb, 497_807_653);
    }

    #[test]
    fn the_label_path_is_one_table_per_variable_and_age() {
        let c = UNetConfig::preset("unet-latent").unwrap();
        let classes: u64 = c.classes.iter().map(|&k| k as u64).sum();
        assert_eq!(c.parameter_count().label_path, (classes + 256 + 1) * 1024);
    }

    #[test]
    fn presets_validate_and_bad_ones_are_named() {
        for p in UNET_PRESETS {
            UNetConfig::preset(p).unwrap().validate().unwrap();
        }
        let bad = UNetConfig {
            img_resolution: 20,
            ..UNetConfig::preset("unet-pixel").unwrap()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("multiple of 2^5")
        );
        assert!(UNetConfig::preset("unet-huge").is_err());
    }
}

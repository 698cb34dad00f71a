//! A feature network's preprocessing, exactly as its Hugging Face image processor does it on the CPU
//! (evaluation.md C.3), from radit's greyscale images in [0, 1]:
//!
//! - `processor`: 8-bit levels (round(255 x), as round(v / 257) of the 16-bit store), grey repeated to RGB, the
//!   shortest edge resized to the processor's size on the uint8 image (antialiased bicubic, the kernel torchvision
//!   calls on a CPU uint8 tensor), the centre crop, then (x - 255 mean) / (255 std) in fp32 (the processor's fused
//!   rescale and normalise).
//! - `chexgenbench`: CheXGenBench's chain before that processor: the 8-bit RGB image resized to 299 x 299 by PIL's
//!   bilinear filter (reproduced here to the bit: torch's uint8 kernel differs from PIL by one level on about 0.3%
//!   of pixels, which moves features by 1e-2), `ToTensor` then x 255 truncated to uint8.
//!
//! - DINOv3's processor (`rescale_first`): the 8-bit levels rescaled to [0, 1] in fp32 first, then resized
//!   (antialiased, in fp32), then normalised, the order its image processor keeps.
//!
//! The preprocessing is part of a feature's identity: [`Preprocessing::id`] names it, with a version bumped whenever
//! the numbers it produces change.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::ModelError;

const VERSION: u32 = 1;

/// The fields of `preprocessor_config.json` that decide the numbers.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ProcessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default)]
    pub size: Option<Size>,
    /// PIL's codes: 2 bilinear, 3 bicubic.
    #[serde(default = "bicubic")]
    pub resample: i64,
    /// A crop when absent (BitImageProcessor's default); null (DINOv3's processor writes it so) is no crop.
    #[serde(default = "some_yes")]
    pub do_center_crop: Option<bool>,
    #[serde(default)]
    pub crop_size: Option<Size>,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "one_over_255")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default)]
    pub image_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub image_std: Option<Vec<f64>>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Size {
    pub shortest_edge: Option<i64>,
    pub height: Option<i64>,
    pub width: Option<i64>,
}

fn yes() -> bool {
    true
}
fn some_yes() -> Option<bool> {
    Some(true)
}
fn bicubic() -> i64 {
    3
}
fn one_over_255() -> f64 {
    1.0 / 255.0
}

/// CheXGenBench's intermediate size.
const CHEXGENBENCH_SIZE: i64 = 299;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resample {
    Bilinear,
    Bicubic,
}

#[derive(Debug, Clone, Copy)]
enum Resize {
    ShortestEdge(i64),
    Exact(i64, i64),
}

/// A processor's steps, checked once at load.
#[derive(Debug, Clone)]
pub struct Preprocessing {
    chexgenbench: bool,
    resize: Option<(Resize, Resample)>,
    crop: Option<(i64, i64)>,
    /// (x - offset) / divisor per channel, the processor's fused rescale and normalise.
    offset: [f64; 3],
    divisor: [f64; 3],
    /// DINOv3's order: x * scale, resized in fp32, then (x - mean) / std.
    rescale_first: Option<RescaleFirst>,
    id: String,
}

#[derive(Debug, Clone, Copy)]
struct RescaleFirst {
    scale: f64,
    mean: [f64; 3],
    std: [f64; 3],
}

fn three(
    v: &Option<Vec<f64>>,
    default: f64,
    field: &str,
    path: &Path,
) -> Result<[f64; 3], ModelError> {
    match v.as_deref() {
        None => Ok([default; 3]),
        Some([x]) => Ok([*x; 3]),
        Some([a, b, c]) => Ok([*a, *b, *c]),
        Some(other) => Err(ModelError::BadWeights {
            path: path.display().to_string(),
            reason: format!("{field} has {} values; expected 1 or 3", other.len()),
        }),
    }
}

impl Preprocessing {
    /// `chain` is `processor` or `chexgenbench`; `path` names the processor file in errors.
    pub fn new(chain: &str, config: ProcessorConfig, path: &Path) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::BadWeights {
            path: path.display().to_string(),
            reason,
        };
        let chexgenbench = match chain {
            "processor" => false,
            "chexgenbench" => true,
            other => {
                return Err(ModelError::BadInput {
                    input: "preprocessing",
                    reason: format!("`{other}`: expected processor or chexgenbench"),
                });
            }
        };
        let resample = match config.resample {
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            r => {
                return Err(bad(format!(
                    "resample {r}: only 2 (bilinear) and 3 (bicubic) are supported"
                )));
            }
        };
        let resize = if config.do_resize {
            let size = config
                .size
                .as_ref()
                .ok_or_else(|| bad("do_resize without size".into()))?;
            let resize = match (size.shortest_edge, size.height, size.width) {
                (Some(s), _, _) if s > 0 => Resize::ShortestEdge(s),
                (None, Some(h), Some(w)) if h > 0 && w > 0 => Resize::Exact(h, w),
                _ => {
                    return Err(bad(format!(
                        "size {size:?}: expected shortest_edge or height and width"
                    )));
                }
            };
            Some((resize, resample))
        } else {
            None
        };
        let crop = if config.do_center_crop.unwrap_or(false) {
            match config.crop_size.as_ref() {
                Some(Size {
                    height: Some(h),
                    width: Some(w),
                    ..
                }) if *h > 0 && *w > 0 => Some((*h, *w)),
                other => {
                    return Err(bad(format!(
                        "crop_size {other:?}: expected height and width"
                    )));
                }
            }
        } else {
            None
        };
        let scale = if config.do_rescale {
            config.rescale_factor
        } else {
            1.0
        };
        let (mean, std) = if config.do_normalize {
            (
                three(&config.image_mean, 0.5, "image_mean", path)?,
                three(&config.image_std, 0.5, "image_std", path)?,
            )
        } else {
            ([0.0; 3], [1.0; 3])
        };
        if std.iter().any(|s| *s == 0.0 || !s.is_finite()) || scale.is_nan() || scale <= 0.0 {
            return Err(bad(format!(
                "image_std {std:?} and rescale_factor {scale} must be non-zero"
            )));
        }
        let offset = mean.map(|m| m / scale);
        let divisor = std.map(|s| s / scale);
        let list = |v: [f64; 3]| v.map(|x| x.to_string()).join(",");
        let resized = match resize {
            Some((Resize::ShortestEdge(e), r)) => format!("short{e}-{r:?}"),
            Some((Resize::Exact(h, w), r)) => format!("{h}x{w}-{r:?}"),
            None => "none".into(),
        };
        let cropped = crop.map_or("none".into(), |(h, w)| format!("{h}x{w}"));
        let id = format!(
            "{}-v{VERSION}:resize={resized}/crop={cropped}/mean={}/std={}/scale={scale}",
            if chexgenbench {
                "chexgenbench"
            } else {
                "processor"
            },
            list(mean),
            list(std),
        )
        .to_lowercase();
        Ok(Self {
            chexgenbench,
            resize,
            crop,
            offset,
            divisor,
            rescale_first: None,
            id,
        })
    }

    /// [`Preprocessing::new`] in DINOv3's order: rescale to [0, 1] in fp32, resize, normalise.
    pub fn rescaled_first(
        chain: &str,
        mut config: ProcessorConfig,
        path: &Path,
    ) -> Result<Self, ModelError> {
        // DINOv3's processor crops only when told to (its file leaves the field out).
        if config.crop_size.is_none() {
            config.do_center_crop = Some(false);
        }
        let scale = if config.do_rescale {
            config.rescale_factor
        } else {
            1.0
        };
        let mut p = Self::new(chain, config, path)?;
        let mean = p.offset.map(|o| o * scale);
        let std = p.divisor.map(|d| d * scale);
        p.rescale_first = Some(RescaleFirst { scale, mean, std });
        p.id = p.id.replacen(":", "-rescale-first:", 1);
        Ok(p)
    }

    /// The side the network sees: the crop, else the exact resize, else the shortest edge squared.
    pub fn input_size(&self) -> Option<(i64, i64)> {
        self.crop.or(match self.resize {
            Some((Resize::Exact(h, w), _)) => Some((h, w)),
            Some((Resize::ShortestEdge(s), _)) => Some((s, s)),
            None => None,
        })
    }

    /// Images in [0, 1] `[B, 3, H, W]` to the network's normalisation, differentiably: the processor's rescale
    /// and normalise on the 8-bit scale, without rounding to levels.
    pub fn normalise_unit(&self, x: &Tensor) -> Tensor {
        let device = x.device();
        let offset = Tensor::from_slice(&self.offset.map(|v| v as f32)).view([1, 3, 1, 1]);
        let divisor = Tensor::from_slice(&self.divisor.map(|v| v as f32)).view([1, 3, 1, 1]);
        (x.to_kind(Kind::Float) * 255.0 - offset.to_device(device)) / divisor.to_device(device)
    }

    /// What the preprocessing is, for a feature's identity.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `[B, 1, H, W]` in [0, 1] to the network's input `[B, 3, H', W']` (fp32, CPU).
    pub fn apply(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        super::grey_batch(images)?;
        let mut x = eight_bit_rgb(&images.to_device(tch::Device::Cpu));
        if self.chexgenbench {
            let sized = pil_bilinear(&x.select(1, 0), CHEXGENBENCH_SIZE, CHEXGENBENCH_SIZE)?
                .unsqueeze(1)
                .repeat([1, 3, 1, 1]);
            // ToTensor (/ 255 in fp32), then x 255 and a truncating cast, as CheXGenBench writes it.
            x = (sized.to_kind(Kind::Float) / 255.0 * 255.0).to_kind(Kind::Uint8);
        }
        if let Some(r) = self.rescale_first {
            return self.apply_rescaled_first(&x, r);
        }
        if let Some((nh, nw, resample)) = self.resized(x.size()[2], x.size()[3]) {
            x = resize_u8(&x, nh, nw, resample);
        }
        x = self.center_crop(x)?;
        let offset = Tensor::from_slice(&self.offset.map(|v| v as f32)).view([1, 3, 1, 1]);
        let divisor = Tensor::from_slice(&self.divisor.map(|v| v as f32)).view([1, 3, 1, 1]);
        Ok((x.to_kind(Kind::Float) - offset) / divisor)
    }
}

impl Preprocessing {
    /// The processor's centre crop, if it has one.
    fn center_crop(&self, x: Tensor) -> Result<Tensor, ModelError> {
        let Some((ch, cw)) = self.crop else {
            return Ok(x);
        };
        let (h, w) = (x.size()[2], x.size()[3]);
        if ch > h || cw > w {
            return Err(ModelError::BadInput {
                input: "images",
                reason: format!("{h}x{w} after resizing is smaller than the crop {ch}x{cw}"),
            });
        }
        let top = ((h - ch) as f64 / 2.0).round() as i64;
        let left = ((w - cw) as f64 / 2.0).round() as i64;
        Ok(x.narrow(2, top, ch).narrow(3, left, cw))
    }

    /// The resized size of an `h` x `w` image.
    fn resized(&self, h: i64, w: i64) -> Option<(i64, i64, Resample)> {
        let (resize, resample) = self.resize?;
        let (nh, nw) = match resize {
            Resize::Exact(nh, nw) => (nh, nw),
            Resize::ShortestEdge(s) if h <= w => (s, (s as f64 * w as f64 / h as f64) as i64),
            Resize::ShortestEdge(s) => ((s as f64 * h as f64 / w as f64) as i64, s),
        };
        ((nh, nw) != (h, w)).then_some((nh, nw, resample))
    }

    /// uint8 `[B, 3, H, W]` through DINOv3's order: rescale, an antialiased fp32 resize, the crop, normalise.
    fn apply_rescaled_first(&self, levels: &Tensor, r: RescaleFirst) -> Result<Tensor, ModelError> {
        let mut x = levels.to_kind(Kind::Float) * r.scale;
        let (h, w) = (x.size()[2], x.size()[3]);
        if let Some((nh, nw, resample)) = self.resized(h, w) {
            x = match resample {
                Resample::Bicubic => {
                    Tensor::internal_upsample_bicubic2d_aa(&x, [nh, nw], false, None, None)
                }
                Resample::Bilinear => {
                    Tensor::internal_upsample_bilinear2d_aa(&x, [nh, nw], false, None, None)
                }
            };
        }
        x = self.center_crop(x)?;
        let mean = Tensor::from_slice(&r.mean.map(|v| v as f32)).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&r.std.map(|v| v as f32)).view([1, 3, 1, 1]);
        Ok((x - mean) / std)
    }
}

/// Grey images `[B, 1, H, W]` in [0, 1] as the 8-bit RGB image a feature network's reference reads: levels
/// round(255 x) (round(v / 257) of the 16-bit store), uint8, grey repeated to 3 channels.
pub(crate) fn eight_bit_rgb(images: &Tensor) -> Tensor {
    (images.to_kind(Kind::Float) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .repeat([1, 3, 1, 1])
}

/// An antialiased resize of a uint8 `[B, 3, H, W]` tensor on the CPU, in uint8 (torch's kernels for uint8 round
/// and saturate as PIL does).
fn resize_u8(x: &Tensor, h: i64, w: i64, resample: Resample) -> Tensor {
    match resample {
        Resample::Bicubic => Tensor::internal_upsample_bicubic2d_aa(x, [h, w], false, None, None),
        Resample::Bilinear => Tensor::internal_upsample_bilinear2d_aa(x, [h, w], false, None, None),
    }
}

/// PIL's fixed-point precision for 8-bit resampling (`PRECISION_BITS` in Pillow's Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling weights along one axis for its bilinear (triangle) filter: for each output index, the
/// first input index and the fixed-point weights, computed in f64 and rounded as Pillow rounds them.
fn pil_coefficients(input: usize, output: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle's support is 1
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // Pillow truncates toward zero, then clamps
            let min = ((center - support + 0.5) as i64).max(0) as usize;
            let max = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let raw: Vec<f64> = (min..max)
                .map(|i| {
                    let x = ((i as f64 - center + 0.5) / filterscale).abs();
                    if x < 1.0 { 1.0 - x } else { 0.0 }
                })
                .collect();
            let total: f64 = raw.iter().sum();
            let unit = f64::from(1u32 << PRECISION_BITS);
            let fixed = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    if w < 0.0 {
                        (-0.5 + w * unit) as i32
                    } else {
                        (0.5 + w * unit) as i32
                    }
                })
                .collect();
            (min, fixed)
        })
        .collect()
}

/// One output sample of Pillow's 8-bit convolution: round half up in fixed point, then saturate.
fn pil_sample(values: impl Iterator<Item = u8>, weights: &[i32]) -> u8 {
    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
    for (v, w) in values.zip(weights) {
        acc += i64::from(v) * i64::from(*w);
    }
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize((w, h), Image.BILINEAR)` of uint8 images `[B, H, W]`: Pillow's two passes, horizontal first
/// with 8-bit rounding in between, so the result is PIL's to the bit.
fn pil_bilinear(images: &Tensor, h: i64, w: i64) -> Result<Tensor, ModelError> {
    let (b, ih, iw) = (
        images.size()[0],
        images.size()[1] as usize,
        images.size()[2] as usize,
    );
    let (oh, ow) = (h as usize, w as usize);
    let data = Vec::<u8>::try_from(images.contiguous().flatten(0, -1))?;
    let across = pil_coefficients(iw, ow);
    let down = pil_coefficients(ih, oh);
    let mut out = Vec::with_capacity(b as usize * oh * ow);
    let mut rows = vec![0u8; ih * ow];
    for image in data.chunks_exact(ih * iw) {
        for y in 0..ih {
            let row = &image[y * iw..(y + 1) * iw];
            for (x, (start, k)) in across.iter().enumerate() {
                rows[y * ow + x] = pil_sample(row[*start..].iter().copied(), k);
            }
        }
        for (start, k) in &down {
            for x in 0..ow {
                out.push(pil_sample((*start..ih).map(|y| rows[y * ow + x]), k));
            }
        }
    }
    Ok(Tensor::from_slice(&out).view([b, h, w]))
}

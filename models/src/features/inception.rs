//! The FID Inception network (Table 10: "Inception FID"): Inception-v3 as pytorch-fid and torchmetrics build it for
//! the TensorFlow FID weights of 2015-12-05 (`pt_inception-2015-12-05-6726825d.pth`): torchvision's layout and
//! names, with FID's patched blocks (average pools that leave the padding out of the count in Mixed_5b-5d, 6b-6e and
//! 7b; a max pool in 7c's pool branch), BatchNorm eps 1e-3 with the file's running statistics, and the 2048 pool3
//! features after a global average pool. The weights file is the user's (no download here):
//! `scripts/export-fid-inception.py` checks its sha256 and writes the safetensors file this loads.
//!
//! Input as pytorch-fid's `fid_score` feeds it: 8-bit levels (round(255 x), round(v / 257) of the store) over 255,
//! grey repeated to RGB, a bilinear resize to 299 x 299 (align_corners = false, no antialiasing) when not 299
//! already, then 2 x - 1.

use std::path::Path;

use tch::{Device, Kind, Tensor, nn};

use super::FeatureNet;
use crate::error::ModelError;

/// The metadata value `scripts/export-fid-inception.py` writes under [`NETWORK_KEY`].
pub const NETWORK: &str = "fid-inception-v3";
pub const NETWORK_KEY: &str = "radit_network";
/// The side the network was trained at.
pub const SIDE: i64 = 299;
const EPS: f64 = 1e-3;

/// Convolution (no bias), BatchNorm with running statistics, ReLU: torchvision's `BasicConv2d`.
struct Conv {
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    mean: Tensor,
    var: Tensor,
    stride: [i64; 2],
    padding: [i64; 2],
}

impl Conv {
    fn new(
        p: &nn::Path,
        inp: i64,
        out: i64,
        kernel: [i64; 2],
        stride: i64,
        padding: [i64; 2],
    ) -> Self {
        let c = p / "conv";
        let b = p / "bn";
        Self {
            weight: c.zeros_no_train("weight", &[out, inp, kernel[0], kernel[1]]),
            bn_weight: b.ones_no_train("weight", &[out]),
            bn_bias: b.zeros_no_train("bias", &[out]),
            mean: b.zeros_no_train("running_mean", &[out]),
            var: b.ones_no_train("running_var", &[out]),
            stride: [stride, stride],
            padding,
        }
    }

    fn square(p: &nn::Path, inp: i64, out: i64, k: i64, stride: i64, pad: i64) -> Self {
        Self::new(p, inp, out, [k, k], stride, [pad, pad])
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(
            &self.weight,
            None::<&Tensor>,
            self.stride,
            self.padding,
            [1, 1],
            1,
        );
        y.batch_norm(
            Some(&self.bn_weight),
            Some(&self.bn_bias),
            Some(&self.mean),
            Some(&self.var),
            false,
            0.1,
            EPS,
            false,
        )
        .relu()
    }
}

/// FID's average pool: 3 x 3, stride 1, padding 1, the padding left out of the count.
fn avg_pool(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)
}

fn max_pool(x: &Tensor, stride: i64, padding: i64) -> Tensor {
    x.max_pool2d([3, 3], [stride, stride], [padding, padding], [1, 1], false)
}

enum Block {
    /// InceptionA (Mixed_5b-5d).
    A {
        b1: Conv,
        b5: [Conv; 2],
        b3: [Conv; 3],
        pool: Conv,
    },
    /// InceptionB (Mixed_6a).
    B { b3: Conv, b3d: [Conv; 3] },
    /// InceptionC (Mixed_6b-6e).
    C {
        b1: Conv,
        b7: [Conv; 3],
        b7d: [Conv; 5],
        pool: Conv,
    },
    /// InceptionD (Mixed_7a).
    D { b3: [Conv; 2], b7: [Conv; 4] },
    /// InceptionE (Mixed_7b with an average pool, 7c with a max pool).
    E {
        b1: Conv,
        b3: Conv,
        b3a: Conv,
        b3b: Conv,
        b3d: [Conv; 2],
        b3da: Conv,
        b3db: Conv,
        pool: Conv,
        max: bool,
    },
}

fn chain(convs: &[Conv], x: &Tensor) -> Tensor {
    convs.iter().fold(x.shallow_clone(), |y, c| c.forward(&y))
}

impl Block {
    fn a(p: &nn::Path, inp: i64, pool: i64) -> Self {
        Block::A {
            b1: Conv::square(&(p / "branch1x1"), inp, 64, 1, 1, 0),
            b5: [
                Conv::square(&(p / "branch5x5_1"), inp, 48, 1, 1, 0),
                Conv::square(&(p / "branch5x5_2"), 48, 64, 5, 1, 2),
            ],
            b3: [
                Conv::square(&(p / "branch3x3dbl_1"), inp, 64, 1, 1, 0),
                Conv::square(&(p / "branch3x3dbl_2"), 64, 96, 3, 1, 1),
                Conv::square(&(p / "branch3x3dbl_3"), 96, 96, 3, 1, 1),
            ],
            pool: Conv::square(&(p / "branch_pool"), inp, pool, 1, 1, 0),
        }
    }

    fn b(p: &nn::Path, inp: i64) -> Self {
        Block::B {
            b3: Conv::square(&(p / "branch3x3"), inp, 384, 3, 2, 0),
            b3d: [
                Conv::square(&(p / "branch3x3dbl_1"), inp, 64, 1, 1, 0),
                Conv::square(&(p / "branch3x3dbl_2"), 64, 96, 3, 1, 1),
                Conv::square(&(p / "branch3x3dbl_3"), 96, 96, 3, 2, 0),
            ],
        }
    }

    fn c(p: &nn::Path, inp: i64, c7: i64) -> Self {
        let row = |name: &str, i: i64, o: i64| Conv::new(&(p / name), i, o, [1, 7], 1, [0, 3]);
        let col = |name: &str, i: i64, o: i64| Conv::new(&(p / name), i, o, [7, 1], 1, [3, 0]);
        Block::C {
            b1: Conv::square(&(p / "branch1x1"), inp, 192, 1, 1, 0),
            b7: [
                Conv::square(&(p / "branch7x7_1"), inp, c7, 1, 1, 0),
                row("branch7x7_2", c7, c7),
                col("branch7x7_3", c7, 192),
            ],
            b7d: [
                Conv::square(&(p / "branch7x7dbl_1"), inp, c7, 1, 1, 0),
                col("branch7x7dbl_2", c7, c7),
                row("branch7x7dbl_3", c7, c7),
                col("branch7x7dbl_4", c7, c7),
                row("branch7x7dbl_5", c7, 192),
            ],
            pool: Conv::square(&(p / "branch_pool"), inp, 192, 1, 1, 0),
        }
    }

    fn d(p: &nn::Path, inp: i64) -> Self {
        Block::D {
            b3: [
                Conv::square(&(p / "branch3x3_1"), inp, 192, 1, 1, 0),
                Conv::square(&(p / "branch3x3_2"), 192, 320, 3, 2, 0),
            ],
            b7: [
                Conv::square(&(p / "branch7x7x3_1"), inp, 192, 1, 1, 0),
                Conv::new(&(p / "branch7x7x3_2"), 192, 192, [1, 7], 1, [0, 3]),
                Conv::new(&(p / "branch7x7x3_3"), 192, 192, [7, 1], 1, [3, 0]),
                Conv::square(&(p / "branch7x7x3_4"), 192, 192, 3, 2, 0),
            ],
        }
    }

    fn e(p: &nn::Path, inp: i64, max: bool) -> Self {
        let row = |name: &str, i: i64| Conv::new(&(p / name), i, 384, [1, 3], 1, [0, 1]);
        let col = |name: &str, i: i64| Conv::new(&(p / name), i, 384, [3, 1], 1, [1, 0]);
        Block::E {
            b1: Conv::square(&(p / "branch1x1"), inp, 320, 1, 1, 0),
            b3: Conv::square(&(p / "branch3x3_1"), inp, 384, 1, 1, 0),
            b3a: row("branch3x3_2a", 384),
            b3b: col("branch3x3_2b", 384),
            b3d: [
                Conv::square(&(p / "branch3x3dbl_1"), inp, 448, 1, 1, 0),
                Conv::square(&(p / "branch3x3dbl_2"), 448, 384, 3, 1, 1),
            ],
            b3da: row("branch3x3dbl_3a", 384),
            b3db: col("branch3x3dbl_3b", 384),
            pool: Conv::square(&(p / "branch_pool"), inp, 192, 1, 1, 0),
            max,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Block::A { b1, b5, b3, pool } => Tensor::cat(
                &[
                    b1.forward(x),
                    chain(b5, x),
                    chain(b3, x),
                    pool.forward(&avg_pool(x)),
                ],
                1,
            ),
            Block::B { b3, b3d } => {
                Tensor::cat(&[b3.forward(x), chain(b3d, x), max_pool(x, 2, 0)], 1)
            }
            Block::C { b1, b7, b7d, pool } => Tensor::cat(
                &[
                    b1.forward(x),
                    chain(b7, x),
                    chain(b7d, x),
                    pool.forward(&avg_pool(x)),
                ],
                1,
            ),
            Block::D { b3, b7 } => Tensor::cat(&[chain(b3, x), chain(b7, x), max_pool(x, 2, 0)], 1),
            Block::E {
                b1,
                b3,
                b3a,
                b3b,
                b3d,
                b3da,
                b3db,
                pool,
                max,
            } => {
                let y3 = b3.forward(x);
                let y3d = chain(b3d, x);
                let pooled = if *max { max_pool(x, 1, 1) } else { avg_pool(x) };
                Tensor::cat(
                    &[
                        b1.forward(x),
                        b3a.forward(&y3),
                        b3b.forward(&y3),
                        b3da.forward(&y3d),
                        b3db.forward(&y3d),
                        pool.forward(&pooled),
                    ],
                    1,
                )
            }
        }
    }
}

/// The network up to pool3.
pub struct FidInception {
    stem: [Conv; 5],
    blocks: Vec<Block>,
}

impl FidInception {
    pub fn new(p: &nn::Path) -> Self {
        Self {
            stem: [
                Conv::square(&(p / "Conv2d_1a_3x3"), 3, 32, 3, 2, 0),
                Conv::square(&(p / "Conv2d_2a_3x3"), 32, 32, 3, 1, 0),
                Conv::square(&(p / "Conv2d_2b_3x3"), 32, 64, 3, 1, 1),
                Conv::square(&(p / "Conv2d_3b_1x1"), 64, 80, 1, 1, 0),
                Conv::square(&(p / "Conv2d_4a_3x3"), 80, 192, 3, 1, 0),
            ],
            blocks: vec![
                Block::a(&(p / "Mixed_5b"), 192, 32),
                Block::a(&(p / "Mixed_5c"), 256, 64),
                Block::a(&(p / "Mixed_5d"), 288, 64),
                Block::b(&(p / "Mixed_6a"), 288),
                Block::c(&(p / "Mixed_6b"), 768, 128),
                Block::c(&(p / "Mixed_6c"), 768, 160),
                Block::c(&(p / "Mixed_6d"), 768, 160),
                Block::c(&(p / "Mixed_6e"), 768, 192),
                Block::d(&(p / "Mixed_7a"), 768),
                Block::e(&(p / "Mixed_7b"), 1280, false),
                Block::e(&(p / "Mixed_7c"), 2048, true),
            ],
        }
    }

    /// pool3 features `[B, 2048]` of inputs `[B, 3, 299, 299]` in [-1, 1].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = &self.stem;
        let x = s[2].forward(&s[1].forward(&s[0].forward(x)));
        let x = max_pool(&x, 2, 0);
        let x = s[4].forward(&s[3].forward(&x));
        let mut x = max_pool(&x, 2, 0);
        for b in &self.blocks {
            x = b.forward(&x);
        }
        x.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

/// The FID Inception as a feature network.
pub struct InceptionNet {
    _vs: nn::VarStore,
    net: FidInception,
    device: Device,
    id: String,
}

impl InceptionNet {
    /// Loads the safetensors file `scripts/export-fid-inception.py` wrote, strictly (its `fc` is not needed).
    pub fn load(path: &Path, device: Device) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::BadWeights {
            path: path.display().to_string(),
            reason,
        };
        let meta = crate::model::read_metadata(path)?;
        if meta.get(NETWORK_KEY).map(String::as_str) != Some(NETWORK) {
            return Err(bad(format!(
                "not the FID Inception network ({NETWORK_KEY} = {NETWORK} is missing): convert \
                 pt_inception-2015-12-05-6726825d.pth with scripts/export-fid-inception.py"
            )));
        }
        let (vs, net, hash) = super::load_snapshot_weights(
            path,
            device,
            |mut tensors| {
                tensors.retain(|name, _| !name.starts_with("fc."));
                tensors
            },
            FidInception::new,
        )?;
        Ok(Self {
            _vs: vs,
            net,
            device,
            id: format!("fid-inception:{hash}@{SIDE}-u8-bilinear"),
        })
    }
}

impl FeatureNet for InceptionNet {
    fn features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let shape = super::grey_batch(images)?;
        let out = tch::no_grad(|| {
            // The 8-bit image pytorch-fid reads, as a tensor in [0, 1] (ToTensor).
            let rgb = super::preprocess::eight_bit_rgb(&images.to_device(self.device));
            let mut x = rgb.to_kind(Kind::Float) / 255.0;
            if shape[2] != SIDE || shape[3] != SIDE {
                x = x.upsample_bilinear2d([SIDE, SIDE], false, None, None);
            }
            self.net.forward(&(x * 2.0 - 1.0))
        });
        Ok(out.to_kind(Kind::Float).to_device(Device::Cpu))
    }

    fn id(&self) -> &str {
        &self.id
    }
}

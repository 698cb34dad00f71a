//! ResNet-50 (torchvision's v1.5: the stride on the 3x3 convolution) with frozen batch-norm statistics, for the
//! ResNet metadata predictor (editing.md). Every weight trains; the running means and variances stay the
//! ImageNet ones (in a separate store the engine never sees), so a step is the same on any world size and a
//! checkpoint holds every trained value [CHOICE: batch statistics per rank would make the result depend on the
//! world size]. Names are torchvision's, so its ImageNet file loads as it is.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor, nn};

use crate::error::ModelError;

const EPS: f64 = 1e-5;
/// torchvision's bottleneck widths multiply by 4 at the output.
const EXPANSION: i64 = 4;

struct FrozenNorm {
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    var: Tensor,
}

/// The trunk's trainable tensors by torchvision name, as they are made.
type Named = Vec<(String, Tensor)>;

fn name_of(p: &nn::Path, leaf: &str) -> String {
    let full = format!("{}.{leaf}", p.components().collect::<Vec<_>>().join("."));
    // Relative to the trunk: the predictor keeps it under `backbone`.
    full.strip_prefix("backbone.").unwrap_or(&full).to_string()
}

impl FrozenNorm {
    fn new(p: &nn::Path, stats: &nn::Path, c: i64, named: &mut Named) -> Self {
        let weight = p.ones("weight", &[c]);
        let bias = p.zeros("bias", &[c]);
        named.push((name_of(p, "weight"), weight.shallow_clone()));
        named.push((name_of(p, "bias"), bias.shallow_clone()));
        Self {
            weight,
            bias,
            mean: stats.zeros_no_train("running_mean", &[c]),
            var: stats.ones_no_train("running_var", &[c]),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let view = |t: &Tensor| t.to_kind(x.kind()).view([1, -1, 1, 1]);
        let scale = &self.weight / (&self.var + EPS).sqrt();
        let shift = &self.bias - &self.mean * &scale;
        x * view(&scale) + view(&shift)
    }
}

fn conv_weight(p: &nn::Path, out: i64, inp: i64, k: i64, named: &mut Named) -> Tensor {
    // Kaiming normal, fan out, as torchvision initialises them.
    let std = (2.0 / (out * k * k) as f64).sqrt();
    let w = p.var(
        "weight",
        &[out, inp, k, k],
        nn::Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    );
    named.push((name_of(p, "weight"), w.shallow_clone()));
    w
}

struct Bottleneck {
    conv1: Tensor,
    bn1: FrozenNorm,
    conv2: Tensor,
    bn2: FrozenNorm,
    conv3: Tensor,
    bn3: FrozenNorm,
    down: Option<(Tensor, FrozenNorm)>,
    stride: i64,
}

impl Bottleneck {
    fn new(
        p: &nn::Path,
        s: &nn::Path,
        (inp, width, stride): (i64, i64, i64),
        n: &mut Named,
    ) -> Self {
        let out = width * EXPANSION;
        let conv1 = conv_weight(&(p / "conv1"), width, inp, 1, n);
        let bn1 = FrozenNorm::new(&(p / "bn1"), &(s / "bn1"), width, n);
        let conv2 = conv_weight(&(p / "conv2"), width, width, 3, n);
        let bn2 = FrozenNorm::new(&(p / "bn2"), &(s / "bn2"), width, n);
        let conv3 = conv_weight(&(p / "conv3"), out, width, 1, n);
        let bn3 = FrozenNorm::new(&(p / "bn3"), &(s / "bn3"), out, n);
        let down = (stride != 1 || inp != out).then(|| {
            (
                conv_weight(&(p / "downsample" / "0"), out, inp, 1, n),
                FrozenNorm::new(&(p / "downsample" / "1"), &(s / "downsample" / "1"), out, n),
            )
        });
        Self {
            conv1,
            bn1,
            conv2,
            bn2,
            conv3,
            bn3,
            down,
            stride,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let conv = |x: &Tensor, w: &Tensor, stride: i64, pad: i64| {
            x.conv2d(
                &w.to_kind(x.kind()),
                None::<Tensor>,
                [stride; 2],
                [pad; 2],
                [1; 2],
                1,
            )
        };
        let y = self.bn1.forward(&conv(x, &self.conv1, 1, 0)).relu();
        let y = self
            .bn2
            .forward(&conv(&y, &self.conv2, self.stride, 1))
            .relu();
        let y = self.bn3.forward(&conv(&y, &self.conv3, 1, 0));
        let skip = match &self.down {
            Some((w, bn)) => bn.forward(&conv(x, w, self.stride, 0)),
            None => x.shallow_clone(),
        };
        (y + skip).relu()
    }
}

/// ResNet-50's trunk (no `fc`): `[B, 3, H, W]` to the pooled `[B, 8 x width]` (2048 at width 64).
pub struct ResNet {
    stats: nn::VarStore,
    named: Named,
    conv1: Tensor,
    bn1: FrozenNorm,
    layers: Vec<Vec<Bottleneck>>,
    pub features: i64,
}

impl ResNet {
    /// The trunk under `p` with `blocks` per stage (ResNet-50: 3, 4, 6, 3) and base `width` (64); the frozen
    /// statistics in their own store.
    pub fn new(p: &nn::Path, blocks: [i64; 4], width: i64) -> Self {
        let stats = nn::VarStore::new(p.device());
        let s = stats.root();
        let mut named = Named::new();
        let conv1 = conv_weight(&(p / "conv1"), width, 3, 7, &mut named);
        let bn1 = FrozenNorm::new(&(p / "bn1"), &(&s / "bn1"), width, &mut named);
        let mut inp = width;
        let mut layers = Vec::new();
        for (i, &n) in blocks.iter().enumerate() {
            let w = width << i;
            let name = format!("layer{}", i + 1);
            let stage: Vec<Bottleneck> = (0..n)
                .map(|j| {
                    let stride = if i > 0 && j == 0 { 2 } else { 1 };
                    let b = Bottleneck::new(
                        &(p / name.as_str() / j),
                        &(&s / name.as_str() / j),
                        (inp, w, stride),
                        &mut named,
                    );
                    inp = w * EXPANSION;
                    b
                })
                .collect();
            layers.push(stage);
        }
        Self {
            stats,
            named,
            conv1,
            bn1,
            layers,
            features: inp,
        }
    }

    /// Copies a torchvision ResNet file's weights and statistics (`fc` ignored) into the trunk, strictly: every
    /// value present with its shape.
    pub fn load(&mut self, path: &Path) -> Result<(), ModelError> {
        let file = crate::model::read_weights(path)?.tensors;
        let stats: Named = self.stats.variables().into_iter().collect();
        let bad = |reason: String| ModelError::BadWeights {
            path: path.display().to_string(),
            reason,
        };
        let missing: Vec<&String> = self
            .named
            .iter()
            .chain(&stats)
            .map(|(n, _)| n)
            .filter(|n| !file.contains_key(*n))
            .collect();
        if let Some(first) = missing.first() {
            return Err(bad(format!(
                "not a torchvision ResNet of this shape: {} values missing (first: {first})",
                missing.len()
            )));
        }
        for (name, var) in self.named.iter().chain(&stats) {
            let src = &file[name];
            if src.size() != var.size() {
                return Err(bad(format!(
                    "{name} is {:?} in the file, {:?} in the network",
                    src.size(),
                    var.size()
                )));
            }
        }
        tch::no_grad(|| {
            for (name, var) in self.named.iter().chain(&stats) {
                var.shallow_clone().copy_(&file[name].to_kind(var.kind()));
            }
        });
        Ok(())
    }

    /// `[B, 3, H, W]` (ImageNet-normalised) to `[B, features]`, in `x`'s kind.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(
            &self.conv1.to_kind(x.kind()),
            None::<Tensor>,
            [2, 2],
            [3, 3],
            [1, 1],
            1,
        );
        let mut y = self
            .bn1
            .forward(&y)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for stage in &self.layers {
            for block in stage {
                y = block.forward(&y);
            }
        }
        y.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }

    /// The trainable parameters of a trunk of this shape (counted, not built).
    pub fn parameters(blocks: [i64; 4], width: i64) -> u64 {
        let norm = |c: i64| 2 * c;
        let mut total = 3 * width * 49 + norm(width);
        let mut inp = width;
        for (i, &n) in blocks.iter().enumerate() {
            let w = width << i;
            for j in 0..n {
                let out = w * EXPANSION;
                total += inp * w + norm(w) + w * w * 9 + norm(w) + w * out + norm(out);
                if (i > 0 && j == 0) || inp != out {
                    total += inp * out + norm(out);
                }
                inp = out;
            }
        }
        total as u64
    }
}

/// Writes a torchvision-named ResNet of this shape with random weights and non-trivial statistics (seeded): a
/// stand-in for the ImageNet file, for tests.
pub fn write_random(
    path: &Path,
    blocks: [i64; 4],
    width: i64,
    seed: i64,
) -> Result<(), ModelError> {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let net = ResNet::new(&(vs.root() / "backbone"), blocks, width);
    let mut named: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n["backbone.".len()..].to_string(), t))
        .collect();
    for (n, t) in net.stats.variables() {
        let value = if n.ends_with("running_var") {
            t.rand_like() + 0.5
        } else {
            t.randn_like() * 0.1
        };
        named.insert(n, value.to_kind(Kind::Float));
    }
    named.insert(
        "fc.weight".into(),
        Tensor::zeros([10, net.features], (Kind::Float, tch::Device::Cpu)),
    );
    crate::model::write_safetensors(&named, &[], path)
}

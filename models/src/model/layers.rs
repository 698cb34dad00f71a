//! RadiT's layers. Shapes are checked once at the model's entry, so the ops here use tch's infallible forms.

use tch::{Kind, Tensor, nn, nn::Init};

/// xavier_uniform for a weight of shape [fan_out, fan_in] (convolutions flattened to 2-D, as DiT does).
fn xavier(fan_in: i64, fan_out: i64) -> Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A linear layer whose matmul runs in the compute kind while its parameters stay fp32.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(p: nn::Path, fan_in: i64, fan_out: i64, bias: bool, init: Init) -> Self {
        Self {
            weight: p.var("weight", &[fan_out, fan_in], init),
            bias: bias.then(|| p.var("bias", &[fan_out], Init::Const(0.0))),
        }
    }

    pub fn xavier(p: nn::Path, fan_in: i64, fan_out: i64, bias: bool) -> Self {
        Self::new(p, fan_in, fan_out, bias, xavier(fan_in, fan_out))
    }

    pub fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        let bias = self.bias.as_ref().map(|b| b.to_kind(kind));
        x.to_kind(kind)
            .linear(&self.weight.to_kind(kind), bias.as_ref())
    }
}

/// Conv2d(C, D, p, stride p) then tokens row-major: [B, C, H, W] -> [B, (H/p)(W/p), D].
#[derive(Debug)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch: i64,
}

impl PatchEmbed {
    pub fn new(p: nn::Path, channels: i64, hidden: i64, patch: i64) -> Self {
        let fan_in = channels * patch * patch;
        Self {
            weight: p.var(
                "weight",
                &[hidden, channels, patch, patch],
                xavier(fan_in, hidden),
            ),
            bias: p.var("bias", &[hidden], Init::Const(0.0)),
            patch,
        }
    }

    pub fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        let p = self.patch;
        let y = x.to_kind(kind).conv2d(
            &self.weight.to_kind(kind),
            Some(&self.bias.to_kind(kind)),
            [p, p],
            [0, 0],
            [1, 1],
            1,
        ); // [B, D, g, g]
        y.flatten(2, 3).transpose(1, 2) // [B, g*g, D]
    }
}

/// 1-D sin-cos embedding of `positions` into `dim` channels: [sin(pos w) | cos(pos w)], w_k = 10000^(-2k/dim).
fn sincos_1d(dim: i64, positions: &[f64]) -> Vec<Vec<f64>> {
    let half = dim / 2;
    positions
        .iter()
        .map(|&pos| {
            let omega = |k: i64| 1.0 / 10000f64.powf(k as f64 / half as f64);
            let sin = (0..half).map(|k| (pos * omega(k)).sin());
            let cos = (0..half).map(|k| (pos * omega(k)).cos());
            sin.chain(cos).collect()
        })
        .collect()
}

/// The fixed 2-D position embedding [g*g, dim]: first half encodes the column, second half the row; tokens
/// row-major. Computed in f64 like DiT's numpy version, then rounded to fp32.
pub fn position_embedding(dim: i64, grid: i64) -> Tensor {
    let n = (grid * grid) as usize;
    let cols: Vec<f64> = (0..n).map(|i| (i as i64 % grid) as f64).collect();
    let rows: Vec<f64> = (0..n).map(|i| (i as i64 / grid) as f64).collect();
    let (c, r) = (sincos_1d(dim / 2, &cols), sincos_1d(dim / 2, &rows));
    let flat: Vec<f32> = c
        .iter()
        .zip(&r)
        .flat_map(|(c, r)| c.iter().chain(r).map(|&v| v as f32))
        .collect();
    Tensor::from_slice(&flat).view([n as i64, dim])
}

/// DiT's timestep sinusoid: 256 channels, [cos(t f) | sin(t f)], f_k = exp(-ln(10000) k / 128). t: [B] -> [B, 256].
pub fn timestep_sinusoid(t: &Tensor) -> Tensor {
    let half = 128;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], 1)
}

/// Sinusoid -> Linear(256, D) -> SiLU -> Linear(D, D); used for the timestep and, with its own weights, for age.
#[derive(Debug)]
pub struct TimestepEmbedder {
    fc1: Linear,
    fc2: Linear,
}

impl TimestepEmbedder {
    pub fn new(p: nn::Path, hidden: i64) -> Self {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Self {
            fc1: Linear::new(&p / "mlp" / "0", 256, hidden, true, init),
            fc2: Linear::new(&p / "mlp" / "2", hidden, hidden, true, init),
        }
    }

    /// [B] -> [B, D] in fp32.
    pub fn forward(&self, t: &Tensor, kind: Kind) -> Tensor {
        let h = self.fc1.forward(&timestep_sinusoid(t), kind).silu();
        self.fc2.forward(&h, kind).to_kind(Kind::Float)
    }
}

/// The 19-variable metadata embedding: one table per categorical (class 0 = missing), age through its own
/// sinusoidal embedder with a learned null vector where age is NaN; the sum scaled by 1/sqrt(19).
#[derive(Debug)]
pub struct MetadataEmbedder {
    tables: Vec<Tensor>,
    age: TimestepEmbedder,
    age_null: Tensor,
    terms: f64,
}

impl MetadataEmbedder {
    pub fn new(p: nn::Path, classes: &[i64], hidden: i64) -> Self {
        let tables = classes
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                (&p / "tables" / i).var(
                    "weight",
                    &[k, hidden],
                    Init::Randn {
                        mean: 0.0,
                        stdev: 0.02,
                    },
                )
            })
            .collect();
        Self {
            tables,
            age: TimestepEmbedder::new(&p / "age", hidden),
            age_null: p.var("age_null", &[hidden], Init::Const(0.0)),
            terms: (classes.len() + 1) as f64,
        }
    }

    /// labels [B, V] integer class ids, age [B] (years/100, NaN = missing) -> [B, D] fp32.
    pub fn forward(&self, labels: &Tensor, age: &Tensor, kind: Kind) -> Tensor {
        let mut total = self.tables[0].embedding(&labels.select(1, 0));
        for (i, table) in self.tables.iter().enumerate().skip(1) {
            total += table.embedding(&labels.select(1, i as i64));
        }
        let age = age.to_kind(Kind::Float);
        let missing = age.isnan(); // [B]
        let a = self.age.forward(&age.nan_to_num(0.0, 0.0, 0.0), kind);
        // tch's where_self(self, cond, other) = where(cond, self, other).
        let a = self
            .age_null
            .unsqueeze(0)
            .expand_as(&a)
            .where_self(&missing.unsqueeze(1), &a);
        (total + a) / self.terms.sqrt()
    }
}

trait EmbeddingExt {
    fn embedding(&self, ids: &Tensor) -> Tensor;
}

impl EmbeddingExt for Tensor {
    fn embedding(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(self, ids, -1, false, false)
    }
}

/// Per-head RMSNorm over head_dim, normalised in fp32 and cast back before the scale (as Flux does).
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
}

impl RmsNorm {
    pub fn new(p: nn::Path, dim: i64) -> Self {
        Self {
            weight: p.var("weight", &[dim], Init::Const(1.0)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let rms = (xf.square().mean_dim(-1, true, Kind::Float) + 1e-6).rsqrt();
        (xf * rms).to_kind(kind) * self.weight.to_kind(kind)
    }
}

/// Multi-head self-attention with qkv bias and QK RMSNorm; scaled by 1/sqrt(head_dim).
#[derive(Debug)]
pub struct Attention {
    qkv: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    proj: Linear,
    heads: i64,
}

impl Attention {
    pub fn new(p: nn::Path, dim: i64, heads: i64) -> Self {
        let head_dim = dim / heads;
        Self {
            qkv: Linear::xavier(&p / "qkv", dim, 3 * dim, true),
            q_norm: RmsNorm::new(&p / "q_norm", head_dim),
            k_norm: RmsNorm::new(&p / "k_norm", head_dim),
            proj: Linear::xavier(&p / "proj", dim, dim, true),
            heads,
        }
    }

    pub fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        let (b, n, d) = (x.size()[0], x.size()[1], x.size()[2]);
        let qkv = self
            .qkv
            .forward(x, kind)
            .view([b, n, 3, self.heads, d / self.heads])
            .permute([2, 0, 3, 1, 4]); // [3, B, H, N, Dh]
        let q = self.q_norm.forward(&qkv.select(0, 0));
        let k = self.k_norm.forward(&qkv.select(0, 1));
        let v = qkv.select(0, 2);
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        ); // [B, H, N, Dh]
        self.proj
            .forward(&out.transpose(1, 2).reshape([b, n, d]), kind)
    }
}

/// W2(SiLU(W1 x) * W3 x), with W1 and W3 kept separate (their xavier bounds differ from a fused [2H, D] weight).
#[derive(Debug)]
pub struct SwiGlu {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl SwiGlu {
    pub fn new(p: nn::Path, dim: i64, hidden: i64, bias: bool) -> Self {
        Self {
            w1: Linear::xavier(&p / "w1", dim, hidden, bias),
            w2: Linear::xavier(&p / "w2", hidden, dim, bias),
            w3: Linear::xavier(&p / "w3", dim, hidden, bias),
        }
    }

    pub fn forward(&self, x: &Tensor, kind: Kind) -> Tensor {
        let gate = self.w1.forward(x, kind).silu() * self.w3.forward(x, kind);
        self.w2.forward(&gate, kind)
    }
}

/// LayerNorm without affine, eps 1e-6, in fp32.
fn layer_norm(x: &Tensor) -> Tensor {
    let d = *x.size().last().unwrap_or(&1);
    x.to_kind(Kind::Float)
        .layer_norm([d], None::<Tensor>, None::<Tensor>, 1e-6, false)
}

/// x * (1 + scale) + shift with [B, D] modulation broadcast over tokens.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// The zero-initialised adaLN projection SiLU(c) -> `parts` x D (named `adaLN_modulation.1` as in DiT).
fn adaln(p: &nn::Path, hidden: i64, parts: i64) -> Linear {
    Linear::new(
        p / "adaLN_modulation" / "1",
        hidden,
        parts * hidden,
        true,
        Init::Const(0.0),
    )
}

/// The `parts` fp32 modulation vectors [B, D] (shift, scale, gate, ...) from c.
fn modulation(ada: &Linear, c: &Conditioning, parts: i64, kind: Kind) -> Vec<Tensor> {
    ada.forward(&c.0.silu(), kind)
        .to_kind(Kind::Float)
        .chunk(parts, 1)
}

/// The conditioning vector c = t_emb(t) + c_meta, [B, D] fp32, computed once per forward and fed to every adaLN.
pub struct Conditioning(pub Tensor);

/// A DiT block with adaLN-Zero: the gates start at zero so the block starts as the identity.
#[derive(Debug)]
pub struct Block {
    attn: Attention,
    mlp: SwiGlu,
    ada: Linear,
}

impl Block {
    pub fn new(p: nn::Path, cfg: &super::RadiTConfig) -> Self {
        let d = cfg.hidden;
        Self {
            attn: Attention::new(&p / "attn", d, cfg.heads),
            mlp: SwiGlu::new(&p / "mlp", d, cfg.mlp_width(), cfg.mlp_bias),
            ada: adaln(&p, d, 6),
        }
    }

    /// x [B, N, D] fp32 residual stream -> same.
    pub fn forward(&self, x: &Tensor, c: &Conditioning, kind: Kind) -> Tensor {
        let m = modulation(&self.ada, c, 6, kind);
        let h = self
            .attn
            .forward(&modulate(&layer_norm(x), &m[0], &m[1]), kind);
        let x = x + m[2].unsqueeze(1) * h.to_kind(Kind::Float);
        let h = self
            .mlp
            .forward(&modulate(&layer_norm(&x), &m[3], &m[4]), kind);
        &x + m[5].unsqueeze(1) * h.to_kind(Kind::Float)
    }
}

/// adaLN-modulated LayerNorm then Linear(D, p*p*C); zero-initialised so the model's output starts at exactly 0.
#[derive(Debug)]
pub struct FinalLayer {
    linear: Linear,
    ada: Linear,
}

impl FinalLayer {
    pub fn new(p: nn::Path, hidden: i64, patch_dim: i64) -> Self {
        Self {
            linear: Linear::new(&p / "linear", hidden, patch_dim, true, Init::Const(0.0)),
            ada: adaln(&p, hidden, 2),
        }
    }

    pub fn forward(&self, x: &Tensor, c: &Conditioning, kind: Kind) -> Tensor {
        let m = modulation(&self.ada, c, 2, kind);
        self.linear
            .forward(&modulate(&layer_norm(x), &m[0], &m[1]), kind)
            .to_kind(Kind::Float)
    }
}

//! LoRA (low-rank adaptation) of convolutions and linear layers (../shared/design/radvae.md): a frozen weight W gets
//! the update ΔW = (α/r)·B·A, with A a k×k convolution (or an r×in matrix) into rank r, Kaiming-initialised, and B a
//! 1×1 convolution (or an out×r matrix) out of it, zero-initialised, so a fine-tune starts exactly at the frozen
//! network. Training runs the two branches (y = W x + (α/r) B(A(x))); [`Lora::merged`] folds the update into the
//! weight for a plain network that any loader reads. Which layers get one is a list of name patterns.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use radit_protocol::ConfigError;

/// Which layers get a LoRA update, and its rank and scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// r, the update's rank.
    pub rank: i64,
    /// α: the update is scaled by α / r.
    pub alpha: f64,
    /// Layer names (a parameter's name without `.weight`) that get an update; `*` matches any run of characters,
    /// so `decoder.up.*.block.2.conv2` is one residual convolution of each up block.
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.rank < 1 {
            return Err(ConfigError::new(
                format!("{field}.rank"),
                format!("{}: at least 1", self.rank),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(ConfigError::new(
                format!("{field}.alpha"),
                format!("{}: positive", self.alpha),
            ));
        }
        if let Some(bad) = self.targets.iter().find(|t| t.trim().is_empty()) {
            return Err(ConfigError::new(
                format!("{field}.targets"),
                format!("an empty pattern {bad:?}"),
            ));
        }
        Ok(())
    }

    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether layer `name` gets an update.
    pub fn targets(&self, name: &str) -> bool {
        self.targets.iter().any(|p| matches(p, name))
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (none included) and everything else
/// itself.
pub fn matches(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == name;
    };
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A LoRA update of one layer: A `[r, in, k, k]` (or `[r, in]`), B `[out, r, 1, 1]` (or `[out, r]`).
#[derive(Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Lora {
    /// A fresh update for a convolution `[out, in, k, k]` (a matrix `[out, in]`: `k` = None) under `p`, as
    /// `p.lora_A.weight` and `p.lora_B.weight` (peft's names): A Kaiming-uniform (a = √5, as peft and PyTorch's
    /// layers draw it), B zero.
    pub fn new(p: &nn::Path, out: i64, inp: i64, k: Option<i64>, cfg: &LoraConfig) -> Self {
        let r = cfg.rank;
        let (a_shape, b_shape) = match k {
            Some(k) => (vec![r, inp, k, k], vec![out, r, 1, 1]),
            None => (vec![r, inp], vec![out, r]),
        };
        let fan_in: i64 = a_shape[1..].iter().product();
        // Kaiming uniform with a = √5: bound = sqrt(6 / ((1 + a²) fan_in)) = 1 / sqrt(fan_in).
        let bound = 1.0 / (fan_in as f64).sqrt();
        let a = (p / "lora_A").var(
            "weight",
            &a_shape,
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let b = (p / "lora_B").var("weight", &b_shape, nn::Init::Const(0.0));
        Self {
            a,
            b,
            scale: cfg.scale(),
        }
    }

    /// The update's branch on a convolution's input: (α/r) B(A(x)), A with the layer's stride and padding.
    pub fn conv_branch(&self, x: &Tensor, stride: i64, padding: i64) -> Tensor {
        let kind = x.kind();
        let h = x.conv2d(
            &self.a.to_kind(kind),
            None::<Tensor>,
            [stride, stride],
            [padding, padding],
            [1, 1],
            1,
        );
        h.conv2d(
            &self.b.to_kind(kind),
            None::<Tensor>,
            [1, 1],
            [0, 0],
            [1, 1],
            1,
        ) * self.scale
    }

    /// The update's branch on a linear layer's input `[..., in]`.
    pub fn linear_branch(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        x.matmul(&self.a.to_kind(kind).tr())
            .matmul(&self.b.to_kind(kind).tr())
            * self.scale
    }

    /// ΔW = (α/r) B A in the layer's weight shape.
    pub fn delta(&self) -> Tensor {
        let (a, b) = (self.a.to_kind(Kind::Float), self.b.to_kind(Kind::Float));
        let shape = a.size();
        let (r, out) = (shape[0], b.size()[0]);
        let mut weight_shape = vec![out];
        weight_shape.extend_from_slice(&shape[1..]);
        (b.reshape([out, r]).matmul(&a.reshape([r, -1])) * self.scale).reshape(weight_shape)
    }

    /// W + ΔW: the plain layer's weight.
    pub fn merged(&self, weight: &Tensor) -> Tensor {
        weight.to_kind(Kind::Float) + self.delta()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn patterns_match_by_name() {
        for (p, n, want) in [
            ("decoder.conv_in", "decoder.conv_in", true),
            ("decoder.conv_in", "decoder.conv_in2", false),
            (
                "decoder.up.*.block.2.conv2",
                "decoder.up.3.block.2.conv2",
                true,
            ),
            (
                "decoder.up.*.block.2.conv2",
                "decoder.up.3.block.1.conv2",
                false,
            ),
            ("decoder.mid.*", "decoder.mid.attn_1.q", true),
            ("*.q", "decoder.mid.attn_1.q", true),
            ("*.q", "decoder.mid.attn_1.qk", false),
            ("a*b*a", "aba", true),
            ("a*b*a", "ab", false),
            ("*", "anything", true),
        ] {
            assert_eq!(matches(p, n), want, "{p} vs {n}");
        }
    }

    #[test]
    fn the_update_starts_at_zero_and_its_branch_equals_the_merged_weight() {
        tch::manual_seed(0);
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec![],
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let mut lora = Lora::new(&(vs.root() / "conv"), 5, 3, Some(3), &cfg);
        let w = Tensor::randn([5, 3, 3, 3], tch::kind::FLOAT_CPU);
        let x = Tensor::randn([2, 3, 8, 8], tch::kind::FLOAT_CPU);
        assert_eq!(lora.delta().abs().max().double_value(&[]), 0.0);
        tch::no_grad(|| {
            lora.b
                .copy_(&Tensor::randn([5, 2, 1, 1], tch::kind::FLOAT_CPU))
        });
        for stride in [1, 2] {
            let padding = 1;
            let conv = |w: &Tensor| {
                x.conv2d(
                    w,
                    None::<Tensor>,
                    [stride, stride],
                    [padding, padding],
                    [1, 1],
                    1,
                )
            };
            let branched = conv(&w) + lora.conv_branch(&x, stride, padding);
            let merged = conv(&lora.merged(&w));
            let err = (&branched - &merged).abs().max().double_value(&[]);
            assert!(err < 1e-5, "stride {stride}: {err}");
        }
        let mut lin = Lora::new(&(vs.root() / "lin"), 4, 6, None, &cfg);
        tch::no_grad(|| lin.b.copy_(&Tensor::randn([4, 2], tch::kind::FLOAT_CPU)));
        let w = Tensor::randn([4, 6], tch::kind::FLOAT_CPU);
        let x = Tensor::randn([3, 6], tch::kind::FLOAT_CPU);
        let branched = x.matmul(&w.tr()) + lin.linear_branch(&x);
        let merged = x.matmul(&lin.merged(&w).tr());
        assert!((&branched - &merged).abs().max().double_value(&[]) < 1e-5);
        assert_eq!(vs.variables().len(), 4);
        assert!(vs.variables().contains_key("conv.lora_A.weight"));
        let bad = LoraConfig { rank: 0, ..cfg };
        assert_eq!(bad.validate("lora").unwrap_err().field, "lora.rank");
    }
}

//! The Flow SCM's networks (scm.md): an embedding per variable (a table with a null row for categoricals;
//! MP-Fourier features and an MLP for age, with a learned null vector), magnitude-preserving parent sums as each
//! variable's condition, and one rectified-flow velocity network per variable (input projection, residual blocks
//! with zero-initialised output layers, LayerNorm head). The missing class is kept out of the flow space and
//! missing targets are masked out of the loss (`null_as_class` keeps it as a class instead).
//!
//! Parameter names (for safetensors and the PyTorch twin): `embed.<var>.table`, `embed.age.{freqs, phases, null,
//! fc1.*, fc2.*}`, `flow.<var>.proj.*`, `flow.<var>.blocks.<k>.{norm, fc1, fc2}.*`, `flow.<var>.head_norm.*`,
//! `flow.<var>.head.*`.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use super::graph::{Graph, Kind as VarKind};
use crate::error::ModelError;

/// The SCM's sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScmConfig {
    /// Width d of every variable's embedding (and of a condition).
    #[serde(default = "default_embed")]
    pub embed_dim: i64,
    /// MP-Fourier features of age.
    #[serde(default = "default_embed")]
    pub fourier: i64,
    /// Width of each velocity network.
    #[serde(default = "default_width")]
    pub width: i64,
    /// Residual blocks per velocity network.
    #[serde(default = "default_blocks")]
    pub blocks: i64,
    /// Keep the missing class as a class of the flow space (and train on it) instead of masking it.
    #[serde(default)]
    pub null_as_class: bool,
}

fn default_embed() -> i64 {
    256
}
fn default_width() -> i64 {
    512
}
fn default_blocks() -> i64 {
    3
}

impl ScmConfig {
    /// `paper` (d = 256, width 512, 3 blocks: about 32.7M parameters) or `tiny` (for tests).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        match name {
            "paper" => Ok(Self {
                embed_dim: 256,
                fourier: 256,
                width: 512,
                blocks: 3,
                null_as_class: false,
            }),
            "tiny" => Ok(Self {
                embed_dim: 16,
                fourier: 16,
                width: 32,
                blocks: 2,
                null_as_class: false,
            }),
            other => Err(ModelError::UnknownPreset {
                name: other.into(),
                known: "paper, tiny".into(),
            }),
        }
    }

    pub fn validate(&self) -> Result<(), radit_protocol::ConfigError> {
        if self.embed_dim <= 0 || self.fourier <= 0 || self.width <= 0 || self.blocks < 0 {
            return Err(radit_protocol::ConfigError::new(
                "scm.model",
                "embed_dim, fourier and width must be positive, blocks non-negative",
            ));
        }
        Ok(())
    }
}

/// Profiles as the store keeps them: `labels` `[B, 18]` class ids (0 = missing) and `age` `[B]` in years/100
/// (NaN = missing).
pub struct Profiles {
    pub labels: Tensor,
    pub age: Tensor,
}

impl Profiles {
    pub fn len(&self) -> i64 {
        self.age.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy on the CPU (labels int64, age f32), to fill in or change.
    pub fn to_cpu(&self) -> Profiles {
        Profiles {
            labels: self
                .labels
                .to_kind(Kind::Int64)
                .to_device(Device::Cpu)
                .copy(),
            age: self.age.to_kind(Kind::Float).to_device(Device::Cpu).copy(),
        }
    }
}

enum Embedding {
    Table(Tensor),
    Age {
        freqs: Tensor,
        phases: Tensor,
        fc1: nn::Linear,
        fc2: nn::Linear,
        null: Tensor,
    },
}

struct Block {
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

struct Flow {
    proj: nn::Linear,
    blocks: Vec<Block>,
    head_norm: nn::LayerNorm,
    head: nn::Linear,
}

/// The SCM on a `VarStore` path.
pub struct Scm {
    pub config: ScmConfig,
    pub graph: Graph,
    embeds: Vec<Embedding>,
    flows: Vec<Flow>,
}

impl Scm {
    pub fn new(p: &nn::Path, config: &ScmConfig, graph: &Graph) -> Result<Self, ModelError> {
        config.validate()?;
        let d = config.embed_dim;
        let mut embeds = Vec::new();
        let mut flows = Vec::new();
        for (i, v) in graph.variables.iter().enumerate() {
            let e = p / "embed" / v.name.as_str();
            embeds.push(match &v.kind {
                VarKind::Categorical { classes, .. } => {
                    Embedding::Table(e.randn("table", &[classes.len() as i64 + 1, d], 0.0, 1.0))
                }
                VarKind::Age => {
                    // Fixed random features (EDM2's MPFourier): kept in the file, never trained.
                    let mut freqs = e.zeros_no_train("freqs", &[config.fourier]);
                    let mut phases = e.zeros_no_train("phases", &[config.fourier]);
                    tch::no_grad(|| {
                        freqs.copy_(&Tensor::randn(
                            [config.fourier],
                            (Kind::Float, freqs.device()),
                        ));
                        phases.copy_(&Tensor::rand(
                            [config.fourier],
                            (Kind::Float, phases.device()),
                        ));
                    });
                    Embedding::Age {
                        freqs,
                        phases,
                        fc1: nn::linear(&e / "fc1", config.fourier, d, Default::default()),
                        fc2: nn::linear(&e / "fc2", d, d, Default::default()),
                        null: e.randn("null", &[d], 0.0, 1.0),
                    }
                }
            });
            let dim = self_dim(config, graph, i);
            let f = p / "flow" / v.name.as_str();
            let w = config.width;
            let blocks = (0..config.blocks)
                .map(|k| {
                    let b = &f / "blocks" / k;
                    Block {
                        norm: nn::layer_norm(&b / "norm", vec![w], Default::default()),
                        fc1: nn::linear(&b / "fc1", w, w, Default::default()),
                        // Zero-initialised: each block starts as the identity.
                        fc2: nn::linear(
                            &b / "fc2",
                            w,
                            w,
                            nn::LinearConfig {
                                ws_init: nn::Init::Const(0.0),
                                bs_init: Some(nn::Init::Const(0.0)),
                                bias: true,
                            },
                        ),
                    }
                })
                .collect();
            flows.push(Flow {
                proj: nn::linear(&f / "proj", 1 + dim + d, w, Default::default()),
                blocks,
                head_norm: nn::layer_norm(&f / "head_norm", vec![w], Default::default()),
                head: nn::linear(&f / "head", w, dim, Default::default()),
            });
        }
        Ok(Self {
            config: config.clone(),
            graph: graph.clone(),
            embeds,
            flows,
        })
    }

    /// Width of variable `i`'s flow space.
    pub fn dim(&self, i: usize) -> i64 {
        self_dim(&self.config, &self.graph, i)
    }

    /// Variable `i`'s embedding `[B, d]` of its values in `profiles` (class id, or age; missing included).
    pub fn embed(&self, i: usize, profiles: &Profiles) -> Tensor {
        match (&self.embeds[i], &self.graph.variables[i].kind) {
            (Embedding::Table(table), VarKind::Categorical { label, .. }) => {
                let ids = profiles
                    .labels
                    .select(1, *label as i64)
                    .to_kind(Kind::Int64);
                table.index_select(0, &ids.to_device(table.device()))
            }
            (
                Embedding::Age {
                    freqs,
                    phases,
                    fc1,
                    fc2,
                    null,
                },
                VarKind::Age,
            ) => {
                let age = profiles.age.to_kind(Kind::Float).to_device(freqs.device());
                let present = age.isfinite();
                let x = age.nan_to_num(0.0, None, None).unsqueeze(1);
                let features =
                    ((&x * freqs.unsqueeze(0) + phases.unsqueeze(0)) * std::f64::consts::TAU).cos()
                        * std::f64::consts::SQRT_2;
                let h = features.apply(fc1).silu().apply(fc2);
                h.where_self(&present.unsqueeze(1), &null.unsqueeze(0).expand_as(&h))
            }
            _ => unreachable!("embeddings are built from the variables' kinds"),
        }
    }

    /// Variable `i`'s condition `[B, d]` from its parents' embeddings (`embeds[j]` for every variable j):
    /// (1 / sqrt|P|) sum over parents, zeros for a root.
    pub fn condition(&self, i: usize, embeds: &[Tensor]) -> Tensor {
        let parents = &self.graph.parents[i];
        if parents.is_empty() {
            let b = embeds[0].size()[0];
            return Tensor::zeros(
                [b, self.config.embed_dim],
                (Kind::Float, embeds[0].device()),
            );
        }
        let sum = parents
            .iter()
            .map(|&p| embeds[p].shallow_clone())
            .reduce(|a, b| a + b)
            .expect("at least one parent");
        sum / (parents.len() as f64).sqrt()
    }

    /// Variable `i`'s velocity `[B, dim]` at state `x` `[B, dim]`, time `t` `[B]`, condition `c` `[B, d]`.
    pub fn velocity(&self, i: usize, x: &Tensor, t: &Tensor, c: &Tensor) -> Tensor {
        let f = &self.flows[i];
        let input = Tensor::cat(
            &[
                t.to_kind(Kind::Float).unsqueeze(1),
                x.to_kind(Kind::Float),
                c.shallow_clone(),
            ],
            1,
        );
        let mut h = input.apply(&f.proj).silu();
        for b in &f.blocks {
            h = &h + h.apply(&b.norm).apply(&b.fc1).silu().apply(&b.fc2);
        }
        h.apply(&f.head_norm).apply(&f.head)
    }

    /// Variable `i`'s observed values in flow space `[B, dim]` and which rows count (`[B]`, 1.0 or 0.0): a
    /// one-hot of the class (class 0 = missing is masked, or its own class with `null_as_class`), or age.
    pub fn target(&self, i: usize, profiles: &Profiles) -> (Tensor, Tensor) {
        let device = self.device();
        match &self.graph.variables[i].kind {
            VarKind::Categorical { label, classes } => {
                let ids = profiles
                    .labels
                    .select(1, *label as i64)
                    .to_kind(Kind::Int64)
                    .to_device(device);
                if self.config.null_as_class {
                    let x = ids.one_hot(classes.len() as i64 + 1).to_kind(Kind::Float);
                    (x, Tensor::ones_like(&ids).to_kind(Kind::Float))
                } else {
                    let present = ids.gt(0);
                    let x = (&ids - 1)
                        .clamp_min(0)
                        .one_hot(classes.len() as i64)
                        .to_kind(Kind::Float)
                        * present.unsqueeze(1).to_kind(Kind::Float);
                    (x, present.to_kind(Kind::Float))
                }
            }
            VarKind::Age => {
                let age = profiles.age.to_kind(Kind::Float).to_device(device);
                let present = age.isfinite();
                (
                    age.nan_to_num(0.0, None, None).unsqueeze(1),
                    present.to_kind(Kind::Float),
                )
            }
        }
    }

    /// The teacher-forced training loss: sum over variables of the masked mean over the batch of
    /// ||v_i(x_t, t_i, c_i) - (x_i - u_i)||^2, x_t = (1 - t_i) u_i + t_i x_i, with c_i from the observed parents.
    /// `noise[i]` is u_i `[B, dim_i]`, `t` is `[B, 19]`. Returns the total and each variable's term.
    pub fn loss(&self, profiles: &Profiles, noise: &[Tensor], t: &Tensor) -> (Tensor, Vec<Tensor>) {
        let n = self.graph.variables.len();
        let embeds: Vec<Tensor> = (0..n).map(|j| self.embed(j, profiles)).collect();
        let b = profiles.len() as f64;
        let terms: Vec<Tensor> = (0..n)
            .map(|i| {
                let (x1, mask) = self.target(i, profiles);
                let ti = t.select(1, i as i64).to_kind(Kind::Float);
                let tt = ti.unsqueeze(1);
                let u = noise[i].to_kind(Kind::Float);
                let xt = &u * (1.0 - &tt) + &x1 * &tt;
                let v = self.velocity(i, &xt, &ti, &self.condition(i, &embeds));
                ((v - (&x1 - &u))
                    .square()
                    .sum_dim_intlist([1].as_slice(), false, Kind::Float)
                    * mask)
                    .sum(Kind::Float)
                    / b
            })
            .collect();
        let total = terms
            .iter()
            .map(Tensor::shallow_clone)
            .reduce(|a, b| a + b)
            .expect("19 variables");
        (total, terms)
    }

    pub fn device(&self) -> Device {
        match &self.embeds[0] {
            Embedding::Table(t) => t.device(),
            Embedding::Age { null, .. } => null.device(),
        }
    }
}

fn self_dim(config: &ScmConfig, graph: &Graph, i: usize) -> i64 {
    let v = &graph.variables[i];
    match v.kind {
        VarKind::Categorical { .. } if config.null_as_class => v.classes() as i64 + 1,
        _ => v.classes() as i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_values_are_masked_or_with_null_as_class_a_class_of_their_own() {
        let graph = Graph::default_graph();
        let profiles = Profiles {
            // sex missing in row 0, Female (2) in row 1; every other label missing
            labels: Tensor::from_slice(&[0i64; 36]).view([2, 18]),
            age: Tensor::from_slice(&[f32::NAN, 0.5]),
        };
        let _ = profiles.labels.select(1, 15).get(1).fill_(2);
        let sex = graph.index("sex").unwrap();
        for null_as_class in [false, true] {
            let vs = nn::VarStore::new(Device::Cpu);
            let cfg = ScmConfig {
                null_as_class,
                ..ScmConfig::preset("tiny").unwrap()
            };
            let scm = Scm::new(&vs.root(), &cfg, &graph).unwrap();
            let (x, mask) = scm.target(sex, &profiles);
            let (x, mask) = (
                Vec::<f32>::try_from(x.flatten(0, -1)).unwrap(),
                Vec::<f32>::try_from(mask).unwrap(),
            );
            if null_as_class {
                assert_eq!(scm.dim(sex), 3);
                assert_eq!(
                    (x, mask),
                    (vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0], vec![1.0, 1.0])
                );
            } else {
                assert_eq!(scm.dim(sex), 2);
                assert_eq!((x, mask), (vec![0.0, 0.0, 0.0, 1.0], vec![0.0, 1.0]));
            }
            // Age is masked either way where missing.
            let (_, age_mask) = scm.target(graph.index("age").unwrap(), &profiles);
            assert_eq!(Vec::<f32>::try_from(age_mask).unwrap(), [0.0, 1.0]);
        }
    }

    #[test]
    fn a_binary_flow_has_the_closed_form_count_and_the_paper_model_about_32_7m() {
        let graph = Graph::default_graph();
        let vs = nn::VarStore::new(Device::Cpu);
        let _scm = Scm::new(&vs.root(), &ScmConfig::preset("paper").unwrap(), &graph).unwrap();
        let vars = vs.variables();
        let count = |prefix: &str| -> i64 {
            vars.iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(_, t)| t.numel() as i64)
                .sum()
        };
        assert_eq!(count("flow.pneumonia."), 1_714_178);
        let trainable: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert!((32_500_000..33_000_000).contains(&trainable), "{trainable}");
    }
}

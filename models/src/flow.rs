//! The rectified-flow objective: x_t = t x1 + (1 - t) x0 with x0 ~ N(0, I) at t = 0 and data at t = 1, target
//! u = x1 - x0, plain MSE; t drawn uniform (or logit-normal) then shifted by t / (s - (s - 1) t).
//!
//! Noise and times come from counter-based streams keyed by (seed, step, sample index), like the loader's
//! dequantisation noise: a resumed run draws exactly what the uninterrupted one would, on any world size.

use radit_sharding::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::model::ModelError;
use crate::network::VelocityNet;

/// How t is drawn before the shift.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TimeDistribution {
    /// u ~ U(0, 1) (SiT's choice, the spec's default).
    #[default]
    Uniform,
    /// u = sigmoid(mean + std n), n ~ N(0, 1) (SD3's rf/lognorm).
    LogitNormal { mean: f64, std: f64 },
}

/// The objective's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    #[serde(default)]
    pub time: TimeDistribution,
    /// The schedule shift s (3 for B pixel, 1 for the latent models); 1 is the identity.
    #[serde(default = "one")]
    pub shift: f64,
    /// Probability of replacing each metadata variable by "missing" (class 0; NaN age) in training, which
    /// classifier-free guidance would need. 0 by default: the paper uses no label dropout.
    #[serde(default)]
    pub condition_dropout: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            time: TimeDistribution::Uniform,
            shift: 1.0,
            condition_dropout: 0.0,
        }
    }
}

impl FlowConfig {
    pub fn validate(&self) -> Result<(), radit_protocol::ConfigError> {
        let bad = |field: &str, reason: String| {
            Err(radit_protocol::ConfigError {
                field: format!("flow.{field}"),
                reason,
            })
        };
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return bad("shift", format!("must be positive, got {}", self.shift));
        }
        if !(0.0..=1.0).contains(&self.condition_dropout) {
            return bad(
                "condition_dropout",
                format!("must be a probability, got {}", self.condition_dropout),
            );
        }
        if let TimeDistribution::LogitNormal { mean, std } = self.time
            && !(mean.is_finite() && std.is_finite() && std > 0.0)
        {
            return bad(
                "time",
                format!("logit-normal needs a finite mean and std > 0, got {mean}, {std}"),
            );
        }
        Ok(())
    }
}

/// t' = t / (s - (s - 1) t), i.e. logit(t') = logit(t) - ln s: with s > 1 more time is spent near the noise end.
pub fn shift_time(t: f64, s: f64) -> f64 {
    t / (s - (s - 1.0) * t)
}

/// Standard normal by Box-Muller from two uniforms in (0, 1].
fn normal_pair(rng: &mut SplitMix64) -> (f64, f64) {
    let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let r = (-2.0 * u1.ln()).sqrt();
    let a = std::f64::consts::TAU * u2;
    (r * a.cos(), r * a.sin())
}

/// Fills `out` with N(0, 1) from the stream named by `parts`.
pub fn fill_normal(parts: &[u64], out: &mut [f32]) {
    let mut rng = SplitMix64::stream(parts);
    for pair in out.chunks_mut(2) {
        let (a, b) = normal_pair(&mut rng);
        pair[0] = a as f32;
        if let Some(x) = pair.get_mut(1) {
            *x = b as f32;
        }
    }
}

const NOISE_STREAM: u64 = 0x15e0;
const TIME_STREAM: u64 = 0x71e;
const DROPOUT_STREAM: u64 = 0xd80;

/// The random part of one training step: source noise x0 [B, ...shape] and times t [B] (shifted), on the CPU.
pub struct FlowDraw {
    pub x0: Tensor,
    pub t: Tensor,
}

impl FlowConfig {
    /// Draws t for global sample `index` at `step`.
    pub fn time_for(&self, seed: u64, step: u64, index: u64) -> f64 {
        let mut rng = SplitMix64::stream(&[seed, step, index, TIME_STREAM]);
        let u = match self.time {
            TimeDistribution::Uniform => (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64,
            TimeDistribution::LogitNormal { mean, std } => {
                let n = normal_pair(&mut rng).0;
                1.0 / (1.0 + (-(mean + std * n)).exp())
            }
        };
        shift_time(u, self.shift)
    }

    /// Applies condition dropout in place to a batch's labels ([n, V] row-major) and ages ([n]) for the samples
    /// with these global indices; each (sample, variable) decision comes from its own stream, like the noise.
    pub fn drop_conditions(
        &self,
        seed: u64,
        step: u64,
        indices: &[u64],
        labels: &mut [u8],
        age: &mut [f32],
    ) {
        if self.condition_dropout <= 0.0 || indices.is_empty() {
            return;
        }
        let v = labels.len() / indices.len();
        for (k, &i) in indices.iter().enumerate() {
            let mut rng = SplitMix64::stream(&[seed, step, i, DROPOUT_STREAM]);
            for label in &mut labels[k * v..(k + 1) * v] {
                if f64::from(rng.unit_f32()) < self.condition_dropout {
                    *label = 0;
                }
            }
            if f64::from(rng.unit_f32()) < self.condition_dropout {
                age[k] = f32::NAN;
            }
        }
    }

    /// Draws x0 and t for the samples with these global indices at `step`; identical for a sample whatever rank
    /// or world size draws it.
    pub fn draw(&self, seed: u64, step: u64, indices: &[u64], sample_shape: &[i64]) -> FlowDraw {
        use rayon::prelude::*;
        let per: usize = sample_shape.iter().product::<i64>().max(0) as usize;
        let mut noise = vec![0f32; per * indices.len()];
        noise
            .par_chunks_mut(per.max(1))
            .zip(indices.par_iter())
            .for_each(|(out, &i)| fill_normal(&[seed, step, i, NOISE_STREAM], out));
        let t: Vec<f32> = indices
            .iter()
            .map(|&i| self.time_for(seed, step, i) as f32)
            .collect();
        let mut shape = vec![indices.len() as i64];
        shape.extend_from_slice(sample_shape);
        FlowDraw {
            x0: Tensor::from_slice(&noise).view(shape.as_slice()),
            t: Tensor::from_slice(&t),
        }
    }
}

/// x_t = t x1 + (1 - t) x0, with t [B] broadcast over the sample.
pub fn interpolate(x1: &Tensor, x0: &Tensor, t: &Tensor) -> Tensor {
    let mut shape = vec![-1i64];
    shape.extend(std::iter::repeat_n(1, x1.dim().saturating_sub(1)));
    let t = t.to_kind(Kind::Float).view(shape.as_slice());
    &t * x1 + (1.0 - &t) * x0
}

/// The training loss mean((v(x_t, t, metadata) - (x1 - x0))^2) in fp32, averaged over every element.
pub fn loss(
    model: &dyn VelocityNet,
    x1: &Tensor,
    x0: &Tensor,
    t: &Tensor,
    labels: &Tensor,
    age: &Tensor,
) -> Result<Tensor, ModelError> {
    if x1.size() != x0.size() {
        return Err(ModelError::BadInput {
            input: "x0",
            reason: format!("shape {:?} differs from x1 {:?}", x0.size(), x1.size()),
        });
    }
    let v = model.velocity(&interpolate(x1, x0, t), t, labels, age)?;
    Ok(velocity_mse(&v, x1, x0))
}

/// mean((v - (x1 - x0))^2) in fp32 over every element: the objective given a predicted velocity.
pub fn velocity_mse(v: &Tensor, x1: &Tensor, x0: &Tensor) -> Tensor {
    (v.to_kind(Kind::Float) - (x1.to_kind(Kind::Float) - x0.to_kind(Kind::Float)))
        .square()
        .mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_matches_the_spec() {
        assert!((shift_time(0.5, 3.0) - 0.25).abs() < 1e-15);
        assert_eq!(shift_time(0.3, 1.0), 0.3);
        assert_eq!(shift_time(0.0, 3.0), 0.0);
        assert_eq!(shift_time(1.0, 3.0), 1.0);
    }

    #[test]
    fn draws_are_per_sample_and_have_the_right_moments() {
        let cfg = FlowConfig {
            shift: 3.0,
            ..FlowConfig::default()
        };
        let all = cfg.draw(7, 11, &[0, 1, 2, 3], &[1, 64, 64]);
        let two = cfg.draw(7, 11, &[2, 3], &[1, 64, 64]);
        assert!(all.x0.narrow(0, 2, 2).equal(&two.x0));
        assert!(all.t.narrow(0, 2, 2).equal(&two.t));
        let mean = all.x0.mean(Kind::Double).double_value(&[]);
        let std = all.x0.std(true).double_value(&[]);
        assert!(
            mean.abs() < 0.02 && (std - 1.0).abs() < 0.02,
            "{mean} {std}"
        );
        // Shifted uniform with s = 3: median 0.25.
        let ts: Vec<f64> = (0..4000).map(|i| cfg.time_for(1, 2, i)).collect();
        let below = ts.iter().filter(|t| **t < 0.25).count() as f64 / ts.len() as f64;
        assert!((below - 0.5).abs() < 0.03, "{below}");
        let ln = FlowConfig {
            time: TimeDistribution::LogitNormal {
                mean: 0.0,
                std: 1.0,
            },
            ..FlowConfig::default()
        };
        let ts: Vec<f64> = (0..4000).map(|i| ln.time_for(1, 2, i)).collect();
        let below = ts.iter().filter(|t| **t < 0.5).count() as f64 / ts.len() as f64;
        assert!((below - 0.5).abs() < 0.03, "{below}");
        assert!(ts.iter().all(|t| *t > 0.0 && *t < 1.0));
    }

    #[test]
    fn condition_dropout_is_off_by_default_and_drops_at_its_rate() {
        let mut labels = vec![1u8; 18 * 1000];
        let mut age = vec![0.5f32; 1000];
        let indices: Vec<u64> = (0..1000).collect();
        FlowConfig::default().drop_conditions(1, 2, &indices, &mut labels, &mut age);
        assert!(labels.iter().all(|l| *l == 1) && age.iter().all(|a| *a == 0.5));
        let cfg = FlowConfig {
            condition_dropout: 0.25,
            ..FlowConfig::default()
        };
        cfg.drop_conditions(1, 2, &indices, &mut labels, &mut age);
        let dropped = labels.iter().filter(|l| **l == 0).count() as f64 / labels.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "{dropped}");
        let nan = age.iter().filter(|a| a.is_nan()).count() as f64 / age.len() as f64;
        assert!((nan - 0.25).abs() < 0.05, "{nan}");
        assert!(
            FlowConfig {
                condition_dropout: 1.5,
                ..cfg
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn invalid_knobs_are_named() {
        let err = FlowConfig {
            shift: 0.0,
            ..FlowConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("flow.shift"));
    }
}

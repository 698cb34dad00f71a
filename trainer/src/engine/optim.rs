//! Adam on flat fp32 slices, as PyTorch's `torch.optim.Adam` computes it (no weight decay, bias-corrected).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::EngineError;

/// Adam's settings (the paper: lr 1e-4, betas 0.9/0.999, eps 1e-8, no weight decay, no warm-up).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Linear warm-up over this many steps, then constant (0 = constant from the start, as the paper).
    #[serde(default)]
    pub warmup_steps: u64,
}

fn default_lr() -> f64 {
    1e-4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
        }
    }
}

/// The learning rate at a step.
pub trait LrSchedule {
    fn lr_at(&self, step: u64) -> f64;
}

impl LrSchedule for AdamConfig {
    /// Step numbers count from 0; with warm-up the first step uses lr / warmup_steps.
    fn lr_at(&self, step: u64) -> f64 {
        if self.warmup_steps == 0 {
            self.lr
        } else {
            self.lr * ((step + 1) as f64 / self.warmup_steps as f64).min(1.0)
        }
    }
}

impl AdamConfig {
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field: &str, reason: String| {
            Err(EngineError::InvalidConfig {
                field: format!("engine.adam.{field}"),
                reason,
            })
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be positive, got {}", self.lr));
        }
        for (f, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(f, format!("must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", format!("must be positive, got {}", self.eps));
        }
        Ok(())
    }

    /// One Adam update of `p` with gradient `g`; `t` is the 1-based step count.
    pub fn step(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        lr: f64,
        t: u64,
    ) {
        let bc1 = 1.0 - self.beta1.powi(t as i32);
        let bc2 = 1.0 - self.beta2.powi(t as i32);
        let _ = m
            .g_mul_scalar_(self.beta1)
            .g_add_(&(g * (1.0 - self.beta1)));
        let _ = v
            .g_mul_scalar_(self.beta2)
            .g_add_(&(g * g * (1.0 - self.beta2)));
        let denom = v.sqrt() / bc2.sqrt() + self.eps;
        let _ = p.g_add_(&(&*m / denom * (-lr / bc1)));
    }
}

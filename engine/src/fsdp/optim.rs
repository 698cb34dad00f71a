//! Adam on flat fp32 slices, as PyTorch's `torch.optim.Adam` computes it (no weight decay, bias-corrected).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

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
    /// Decoupled weight decay (AdamW): every step first scales the weights by 1 - lr x weight_decay, as
    /// `torch.optim.AdamW` does. 0 (the default) is plain Adam, bit for bit.
    #[serde(default)]
    pub weight_decay: f64,
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
            weight_decay: 0.0,
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
    pub fn validate(&self) -> Result<(), radit_protocol::ConfigError> {
        let bad = |field: &str, reason: String| {
            Err(radit_protocol::ConfigError {
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
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&(self.weight_decay * self.lr))) {
            return bad(
                "weight_decay",
                format!(
                    "must be at least 0 with lr x weight_decay below 1, got {}",
                    self.weight_decay
                ),
            );
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
        if self.weight_decay > 0.0 {
            let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
        }
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

/// The whole update of one slice in a single pass over memory on the CPU (clip, Adam, EMA; the gradient is only
/// read: the next micro-batch overwrites it),
/// with the same f32 arithmetic as the tensor path. Falls back to tensor ops elsewhere (GPUs).
#[allow(clippy::too_many_arguments)]
pub fn update_slice(
    adam: &AdamConfig,
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    ema: &mut Tensor,
    lr: f64,
    t: u64,
    clip: f64,
    decay: f64,
) {
    let cpu_f32 =
        |x: &Tensor| x.device() == Device::Cpu && x.kind() == Kind::Float && x.is_contiguous();
    if ![&*p, g, &*m, &*v, &*ema].iter().all(|x| cpu_f32(x)) {
        let g = if clip < 1.0 {
            g * clip
        } else {
            g.shallow_clone()
        };
        adam.step(p, &g, m, v, lr, t);
        let _ = ema.lerp_(&*p, 1.0 - decay);
        return;
    }
    let n = p.numel();
    let slice = |x: &mut Tensor| {
        // SAFETY: a contiguous CPU f32 tensor of n elements (checked above); the five tensors are distinct
        // allocations owned by the caller for the duration of this call.
        unsafe { std::slice::from_raw_parts_mut(x.data_ptr() as *mut f32, n) }
    };
    // SAFETY: as above; the gradient is only read.
    let gs = unsafe { std::slice::from_raw_parts(g.data_ptr() as *const f32, n) };
    let (ps, ms, vs, es) = (slice(p), slice(m), slice(v), slice(ema));
    let (b1, b2, eps) = (adam.beta1 as f32, adam.beta2 as f32, adam.eps as f32);
    let bc1 = 1.0 - adam.beta1.powi(t as i32);
    let bc2_sqrt = ((1.0 - adam.beta2.powi(t as i32)) as f32).sqrt();
    let step = (-lr / bc1) as f32;
    let (clip, decay) = (clip as f32, decay as f32);
    // Exactly 1 without weight decay, so plain Adam's arithmetic is unchanged.
    let keep = (1.0 - lr * adam.weight_decay) as f32;
    const CHUNK: usize = 1 << 15;
    ps.par_chunks_mut(CHUNK)
        .zip(gs.par_chunks(CHUNK))
        .zip(ms.par_chunks_mut(CHUNK))
        .zip(vs.par_chunks_mut(CHUNK))
        .zip(es.par_chunks_mut(CHUNK))
        .for_each(|((((p, g), m), v), e)| {
            // Zipped slices, so the loop has no bounds checks and vectorises.
            for ((((p, &g), m), v), e) in p
                .iter_mut()
                .zip(g)
                .zip(m.iter_mut())
                .zip(v.iter_mut())
                .zip(e.iter_mut())
            {
                let gi = if clip < 1.0 { g * clip } else { g };
                *m = *m * b1 + gi * (1.0 - b1);
                *v = *v * b2 + gi * gi * (1.0 - b2);
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p = *p * keep + *m / denom * step;
                *e += (*p - *e) * (1.0 - decay);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fused_cpu_update_matches_the_tensor_ops() {
        let adam = AdamConfig {
            lr: 1e-2,
            ..AdamConfig::default()
        };
        let n = 100_003;
        let wave = |phase: f64| (Tensor::arange(n, tch::kind::FLOAT_CPU) * 0.37 + phase).sin();
        let (p0, g0, m0, v0, e0) = (
            wave(0.0),
            wave(1.0) * 0.1,
            wave(2.0) * 0.01,
            wave(3.0).abs() * 1e-3,
            wave(4.0),
        );
        for (clip, weight_decay) in [(1.0, 0.0), (0.5, 0.0), (1.0, 0.1)] {
            let adam = AdamConfig {
                weight_decay,
                ..adam
            };
            let (mut p, g, mut m, mut v, mut e) =
                (p0.copy(), g0.copy(), m0.copy(), v0.copy(), e0.copy());
            update_slice(
                &adam, &mut p, &g, &mut m, &mut v, &mut e, 1e-2, 3, clip, 0.9,
            );
            // The tensor path, on the same values.
            let (mut p2, mut g2, mut m2, mut v2) = (p0.copy(), g0.copy(), m0.copy(), v0.copy());
            if clip < 1.0 {
                g2 *= clip;
            }
            adam.step(&mut p2, &g2, &mut m2, &mut v2, 1e-2, 3);
            let e2 = &e0 + (&p2 - &e0) * 0.1;
            for (a, b, what) in [
                (&p, &p2, "p"),
                (&m, &m2, "m"),
                (&v, &v2, "v"),
                (&e, &e2, "ema"),
            ] {
                let err = (a - b).abs().max().double_value(&[]);
                assert!(
                    err < 1e-6,
                    "{what} (clip {clip}, wd {weight_decay}): {err:e}"
                );
            }
            assert!(g.equal(&g0), "the gradient is only read");
        }
    }
}

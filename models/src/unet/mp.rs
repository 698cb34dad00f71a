//! EDM2's magnitude-preserving building blocks (Karras et al. 2024, ../shared/design/radunet.md), bias-free: each
//! keeps unit-magnitude inputs at unit magnitude, which is what lets the U-Net train without normalisation layers.

use tch::{Kind, Tensor, nn};

/// Divides `x` by its RMS over every dimension but the first (`eps` added to the scaled norm).
pub fn normalize(x: &Tensor) -> Tensor {
    let dims: Vec<i64> = (1..x.dim() as i64).collect();
    normalize_over(x, &dims)
}

/// Divides `x` by its RMS over `dims`: norm · √(kept elements / all elements) + 1e-4, in fp32.
pub fn normalize_over(x: &Tensor, dims: &[i64]) -> Tensor {
    let size = x.size();
    let reduced: i64 = dims
        .iter()
        .map(|&d| size[d.rem_euclid(size.len() as i64) as usize])
        .product();
    let norm = x.norm_scalaropt_dim_dtype(2.0, dims, true, Kind::Float);
    let norm = norm * (1.0 / reduced as f64).sqrt() + 1e-4;
    x / norm.to_kind(x.kind())
}

/// SiLU scaled to keep unit variance for unit-normal input (Eq. 81).
pub fn mp_silu(x: &Tensor) -> Tensor {
    x.silu() / 0.596
}

/// lerp(a, b, t) / √((1 - t)² + t²): a blend of two unit-magnitude tensors at unit magnitude (Eq. 88).
pub fn mp_sum(a: &Tensor, b: &Tensor, t: f64) -> Tensor {
    (a * (1.0 - t) + b * t) / ((1.0 - t).powi(2) + t.powi(2)).sqrt()
}

/// Concatenation along channels weighting `a` by 1 - t and `b` by t at unit magnitude (Eq. 103).
pub fn mp_cat(a: &Tensor, b: &Tensor, t: f64) -> Tensor {
    let (na, nb) = (a.size()[1] as f64, b.size()[1] as f64);
    let c = ((na + nb) / ((1.0 - t).powi(2) + t.powi(2))).sqrt();
    Tensor::cat(
        &[a * (c / na.sqrt() * (1.0 - t)), b * (c / nb.sqrt() * t)],
        1,
    )
}

/// How a block changes the resolution, with the [1, 1] filter: a 2x2 average down, nearest-neighbour x2 up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Keep,
    Down,
    Up,
}

pub fn resample(x: &Tensor, mode: Resample) -> Tensor {
    match mode {
        Resample::Keep => x.shallow_clone(),
        Resample::Down => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>),
        Resample::Up => {
            x.upsample_nearest2d([x.size()[2] * 2, x.size()[3] * 2], None::<f64>, None::<f64>)
        }
    }
}

/// cos(2π(f x + φ))·√2 with fixed random frequencies and phases (Eq. 75): unit-magnitude features of a scalar.
/// The frequencies and phases are buffers (saved with the weights, never trained).
#[derive(Debug)]
pub struct MpFourier {
    pub freqs: Tensor,
    pub phases: Tensor,
}

impl MpFourier {
    pub fn new(p: &nn::Path, channels: i64) -> Self {
        let freqs = p.zeros_no_train("freqs", &[channels]);
        let phases = p.zeros_no_train("phases", &[channels]);
        tch::no_grad(|| {
            let two_pi = 2.0 * std::f64::consts::PI;
            freqs.shallow_clone().copy_(&(freqs.randn_like() * two_pi));
            phases.shallow_clone().copy_(&(phases.rand_like() * two_pi));
        });
        Self { freqs, phases }
    }

    /// `x` [B] to [B, channels].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.to_kind(Kind::Float).outer(&self.freqs) + &self.phases;
        y.cos() * std::f64::consts::SQRT_2
    }
}

/// A bias-free convolution (or, with no kernel, a linear layer) whose weight is used normalised, per output
/// channel, and scaled by gain/√fan_in (Eq. 47). Training also normalises the stored weight itself after every
/// optimiser step ([`MpConv::force_normalize`], Eq. 66), so its magnitude cannot grow.
#[derive(Debug)]
pub struct MpConv {
    pub weight: Tensor,
}

impl MpConv {
    /// `kernel` 0: a linear layer [out, in]; else a k x k convolution [out, in, k, k]. Weights N(0, 1).
    pub fn new(p: &nn::Path, cin: i64, cout: i64, kernel: i64) -> Self {
        let dims: Vec<i64> = if kernel == 0 {
            vec![cout, cin]
        } else {
            vec![cout, cin, kernel, kernel]
        };
        Self {
            weight: p.var(
                "weight",
                &dims,
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            ),
        }
    }

    fn fan_in(&self) -> f64 {
        self.weight.size()[1..].iter().product::<i64>() as f64
    }

    /// The layer with gain 1.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.apply_weight(x, normalize(&self.weight) * (1.0 / self.fan_in().sqrt()))
    }

    /// The layer with a learned scalar gain (EDM2's `emb_gain`, `out_gain`).
    pub fn forward_gain(&self, x: &Tensor, gain: &Tensor) -> Tensor {
        self.apply_weight(x, normalize(&self.weight) * gain / self.fan_in().sqrt())
    }

    fn apply_weight(&self, x: &Tensor, w: Tensor) -> Tensor {
        let w = w.to_kind(x.kind());
        if w.dim() == 2 {
            x.matmul(&w.tr())
        } else {
            let pad = w.size()[3] / 2;
            x.conv2d(&w, None::<Tensor>, [1, 1], [pad, pad], [1, 1], 1)
        }
    }

    /// W <- normalize(W), in place and outside autograd: forced weight normalisation.
    pub fn force_normalize(&self) {
        tch::no_grad(|| {
            let normalized =
                normalize(&self.weight.to_kind(Kind::Float)).to_kind(self.weight.kind());
            self.weight.shallow_clone().copy_(&normalized);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, nn::VarStore};

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn rms(x: &Tensor) -> f64 {
        x.square().mean(Kind::Double).sqrt().double_value(&[])
    }

    #[test]
    fn the_blocks_preserve_unit_magnitude() {
        tch::manual_seed(0);
        let (a, b) = (randn(&[64, 32, 8, 8]), randn(&[64, 48, 8, 8]));
        assert!((rms(&mp_sum(&a, &a.randn_like(), 0.3)) - 1.0).abs() < 0.02);
        assert!((rms(&mp_cat(&a, &b, 0.5)) - 1.0).abs() < 0.02);
        assert!((rms(&mp_silu(&a)) - 1.0).abs() < 0.05);
        assert!((rms(&normalize(&(&a * 7.0))) - 1.0).abs() < 1e-3);
        let vs = VarStore::new(Device::Cpu);
        let conv = MpConv::new(&vs.root().sub("c"), 32, 16, 3);
        let y = conv.forward(&a);
        assert_eq!(y.size(), [64, 16, 8, 8]);
        // Zero padding at the border shrinks the magnitude a little; the interior keeps it.
        assert!((rms(&y.narrow(2, 1, 6).narrow(3, 1, 6)) - 1.0).abs() < 0.05);
        let f = MpFourier::new(&vs.root().sub("f"), 256);
        assert!(
            (rms(&f.forward(&Tensor::rand([512], (Kind::Float, Device::Cpu)))) - 1.0).abs() < 0.05
        );
        assert!(!f.freqs.requires_grad());
    }

    #[test]
    fn forced_normalisation_gives_unit_rows_and_resampling_is_exact() {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let conv = MpConv::new(&vs.root(), 5, 3, 3);
        tch::no_grad(|| {
            conv.weight
                .shallow_clone()
                .copy_(&(randn(&[3, 5, 3, 3]) * 4.0))
        });
        conv.force_normalize();
        let row_rms = conv
            .weight
            .square()
            .mean_dim([1, 2, 3].as_slice(), false, Kind::Float)
            .sqrt();
        assert!(row_rms.allclose(
            &Tensor::ones([3], (Kind::Float, Device::Cpu)),
            1e-3,
            1e-3,
            false
        ));
        let x = Tensor::arange(16, (Kind::Float, Device::Cpu)).view([1, 1, 4, 4]);
        let down = resample(&x, Resample::Down);
        assert_eq!(
            Vec::<f32>::try_from(down.flatten(0, -1)).unwrap(),
            [2.5, 4.5, 10.5, 12.5]
        );
        let up = resample(&down, Resample::Up);
        assert_eq!(up.size(), [1, 1, 4, 4]);
        assert_eq!(up.double_value(&[0, 0, 1, 1]), 2.5);
    }
}

//! Kernel distance (KID/KDD, Bińkowski et al. 2018): the unbiased MMD^2 with the polynomial kernel
//! k(x, y) = (x.y / d + 1)^3, averaged over random subsets of `subset_size` rows drawn without replacement from each
//! set. With equal set sizes and the subset size of CheXGenBench (the smaller set), every subset is the full set:
//! the full-set MMD^2, std 0, computed once.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use serde::{Deserialize, Serialize};

use crate::{EvalError, Features, SplitMix, same_width};

/// How subsets are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdConfig {
    /// Subsets averaged over (torch-fidelity, torchmetrics: 100).
    pub subsets: usize,
    /// Rows per subset; `None`: the smaller set's size (CheXGenBench). torch-fidelity's default is 1000.
    pub subset_size: Option<usize>,
    pub seed: u64,
}

impl Default for KdConfig {
    fn default() -> Self {
        Self {
            subsets: 100,
            subset_size: Some(1000),
            seed: 0,
        }
    }
}

/// The mean and (population) standard deviation of MMD^2 over the subsets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Kd {
    pub mean: f64,
    pub std: f64,
    pub subsets: usize,
    pub subset_size: usize,
}

/// The unbiased MMD^2 between `x` and `y` (both m rows).
pub fn mmd2_unbiased(x: &Features, y: &Features) -> f64 {
    let (m, d) = (x.rows(), x.dim());
    let kernel_sum = |a: &Features, b: &Features, skip_diagonal: bool| -> f64 {
        let mut dots = Mat::<f64>::zeros(a.rows(), b.rows());
        matmul(
            dots.as_mut(),
            Accum::Replace,
            MatRef::from_row_major_slice(a.data(), a.rows(), d),
            MatRef::from_row_major_slice(b.data(), b.rows(), d).transpose(),
            1.0,
            Par::rayon(0),
        );
        let mut sum = 0.0;
        for i in 0..a.rows() {
            for j in 0..b.rows() {
                if !(skip_diagonal && i == j) {
                    sum += (dots[(i, j)] / d as f64 + 1.0).powi(3);
                }
            }
        }
        sum
    };
    let m = m as f64;
    (kernel_sum(x, x, true) + kernel_sum(y, y, true)) / (m * (m - 1.0))
        - 2.0 * kernel_sum(x, y, false) / (m * m)
}

/// KD of `real` and `fake` over `cfg.subsets` subsets (see the module docs).
pub fn kernel_distance(real: &Features, fake: &Features, cfg: &KdConfig) -> Result<Kd, EvalError> {
    same_width(real, fake)?;
    let smaller = real.rows().min(fake.rows());
    let m = cfg.subset_size.unwrap_or(smaller);
    let metric = if cfg.subset_size.is_some_and(|m| m > smaller) {
        "KD subsets; --kd-subset-size min uses the smaller set's size"
    } else {
        "KD subsets"
    };
    real.require_rows(m.max(2), metric)?;
    fake.require_rows(m.max(2), metric)?;
    if cfg.subsets == 0 {
        return Err(EvalError::Undefined {
            what: "KD".into(),
            reason: "subsets must be at least 1".into(),
        });
    }
    if m == real.rows() && m == fake.rows() {
        return Ok(Kd {
            mean: mmd2_unbiased(real, fake),
            std: 0.0,
            subsets: cfg.subsets,
            subset_size: m,
        });
    }
    let values: Vec<f64> = (0..cfg.subsets as u64)
        .map(|s| {
            let x = real.select(&SplitMix::new(cfg.seed, 2 * s).sample(real.rows(), m));
            let y = fake.select(&SplitMix::new(cfg.seed, 2 * s + 1).sample(fake.rows(), m));
            mmd2_unbiased(&x, &y)
        })
        .collect();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    Ok(Kd {
        mean,
        std: var.sqrt(),
        subsets: cfg.subsets,
        subset_size: m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmd_by_hand_on_two_points_each() {
        // d = 1: k(a, b) = (ab + 1)^3.
        let x = Features::new("x", 1, vec![0.0, 1.0]).unwrap();
        let y = Features::new("y", 1, vec![1.0, 2.0]).unwrap();
        let k = |a: f64, b: f64| (a * b + 1.0).powi(3);
        let want = (2.0 * k(0.0, 1.0) + 2.0 * k(1.0, 2.0)) / 2.0
            - 2.0 * (k(0.0, 1.0) + k(0.0, 2.0) + k(1.0, 1.0) + k(1.0, 2.0)) / 4.0;
        assert!((mmd2_unbiased(&x, &y) - want).abs() < 1e-12);
    }

    #[test]
    fn full_sets_are_computed_once_and_subsets_are_reproducible() {
        let data = |n: usize, shift: f64| {
            (0..n * 4)
                .map(|i| (i as f64 * 0.37).sin() + shift)
                .collect()
        };
        let real = Features::new("real", 4, data(50, 0.0)).unwrap();
        let fake = Features::new("fake", 4, data(50, 0.3)).unwrap();
        let full = KdConfig {
            subset_size: None,
            ..KdConfig::default()
        };
        let kd = kernel_distance(&real, &fake, &full).unwrap();
        assert_eq!((kd.std, kd.subset_size), (0.0, 50));
        assert!((kd.mean - mmd2_unbiased(&real, &fake)).abs() < 1e-15);
        let sub = KdConfig {
            subsets: 10,
            subset_size: Some(20),
            seed: 3,
        };
        let a = kernel_distance(&real, &fake, &sub).unwrap();
        assert_eq!(a, kernel_distance(&real, &fake, &sub).unwrap());
        assert!(a.std > 0.0);
        let err = kernel_distance(
            &real,
            &fake,
            &KdConfig {
                subset_size: Some(60),
                ..sub
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains(
                "real (KD subsets; --kd-subset-size min uses the smaller set's size): 50 sample(s)"
            ),
            "{err}"
        );
    }
}

//! The evaluation metrics of ../shared/design/evaluation.md, without libtorch: on feature sets, FD (the symmetric
//! eigen route: no complex arithmetic, no failure on singular covariances), KD (unbiased polynomial-kernel MMD over
//! subsets) and precision / recall / density / coverage (blocked k-nearest-neighbour radii, never an N x M matrix);
//! on images, SSIM and PSNR; on predictions, ROC-AUC (ties averaged; one-vs-rest macro), MAE and Cohen's kappa.
//! Everything is computed in f64 with faer for the linear algebra.
//!
//! ```
//! use radit_eval::{Features, fd::{Moments, frechet_distance}};
//! let real = Features::new("real", 2, vec![0.0, 1.0, 1.0, 0.0, 2.0, 2.0])?;
//! let fake = Features::new("fake", 2, vec![0.5, 1.0, 1.5, 0.0, 2.5, 2.0])?;
//! let fd = frechet_distance(&Moments::of(&real)?, &Moments::of(&fake)?)?;
//! assert!((fd - 0.25).abs() < 1e-9); // the same covariance, means 0.5 apart
//! # Ok::<(), radit_eval::EvalError>(())
//! ```

pub mod classify;
pub mod distance;
pub mod fd;
pub mod fidelity;
pub mod image;
pub mod io;
pub mod kd;
pub mod prdc;
pub mod reader_study;

/// A metric that cannot be computed on these inputs, naming them.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EvalError {
    /// Shapes that do not fit together (widths, lengths, image sizes).
    #[error("{what}: {reason}")]
    Shape { what: String, reason: String },
    /// A NaN or infinity in the input.
    #[error("{what}: {at} is not finite ({value})")]
    NonFinite {
        what: String,
        at: String,
        value: f64,
    },
    /// Too few samples for the metric.
    #[error("{what}: {have} sample(s), the metric needs at least {need}")]
    TooFew {
        what: String,
        have: usize,
        need: usize,
    },
    /// The metric is not defined for these inputs (one class only, say).
    #[error("{what}: {reason}")]
    Undefined { what: String, reason: String },
    /// The linear algebra did not converge (a bug or pathological input; please report it).
    #[error("{what}: the eigendecomposition did not converge")]
    Numerical { what: String },
}

/// A set of feature vectors: `rows` x `dim`, row-major, finite, named for errors (usually its file).
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    name: String,
    dim: usize,
    data: Vec<f64>,
}

impl Features {
    /// Checks that `data` is whole rows of `dim` finite numbers.
    pub fn new(name: &str, dim: usize, data: Vec<f64>) -> Result<Self, EvalError> {
        if dim == 0 || !data.len().is_multiple_of(dim) {
            return Err(EvalError::Shape {
                what: name.into(),
                reason: format!("{} values are not whole rows of width {dim}", data.len()),
            });
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(EvalError::NonFinite {
                what: name.into(),
                at: format!("row {}, column {}", i / dim, i % dim),
                value: data[i],
            });
        }
        Ok(Self {
            name: name.into(),
            dim,
            data,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// All rows, row-major.
    pub fn data(&self) -> &[f64] {
        &self.data
    }

    /// The rows at `indices`, in that order, as a new set with the same name.
    pub fn select(&self, indices: &[usize]) -> Features {
        let mut data = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            data.extend_from_slice(self.row(i));
        }
        Features {
            name: self.name.clone(),
            dim: self.dim,
            data,
        }
    }

    /// At least `need` rows, or an error naming the set and the metric.
    pub(crate) fn require_rows(&self, need: usize, metric: &str) -> Result<(), EvalError> {
        if self.rows() < need {
            return Err(EvalError::TooFew {
                what: format!("{} ({metric})", self.name),
                have: self.rows(),
                need,
            });
        }
        Ok(())
    }
}

/// Both sets have the same width, or an error naming both.
pub(crate) fn same_width(a: &Features, b: &Features) -> Result<(), EvalError> {
    if a.dim != b.dim {
        return Err(EvalError::Shape {
            what: format!("{} and {}", a.name, b.name),
            reason: format!(
                "features of width {} and {}: they come from different networks",
                a.dim, b.dim
            ),
        });
    }
    Ok(())
}

/// splitmix64: the small seeded generator behind the KD subsets (the same draws on every platform).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        let mut s = Self(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        s.next();
        s
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift with rejection).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        loop {
            let m = u128::from(self.next()) * u128::from(n);
            if (m as u64) >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// `k` distinct indices of `0..n` (a partial Fisher-Yates shuffle).
    pub(crate) fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k.min(n) {
            let j = i + self.below((n - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(k.min(n));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_name_their_bad_value_and_shape() {
        let err =
            Features::new("fake.npy", 3, vec![0.0, 1.0, 2.0, 3.0, f64::NAN, 5.0]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "fake.npy: row 1, column 1 is not finite (NaN)"
        );
        let err = Features::new("real.npy", 4, vec![0.0; 6]).unwrap_err();
        assert!(
            err.to_string().contains("not whole rows of width 4"),
            "{err}"
        );
        let f = Features::new("x", 2, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!((f.rows(), f.row(2)), (3, &[5.0, 6.0][..]));
        assert_eq!(f.select(&[2, 0]).data(), &[5.0, 6.0, 1.0, 2.0]);
    }

    #[test]
    fn subsets_are_distinct_reproducible_and_cover_the_range() {
        let a = SplitMix::new(7, 1).sample(100, 40);
        assert_eq!(a, SplitMix::new(7, 1).sample(100, 40));
        assert_ne!(a, SplitMix::new(7, 2).sample(100, 40));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 40);
        assert!(sorted.iter().all(|&i| i < 100));
        let mut all = SplitMix::new(1, 0).sample(10, 10);
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }
}

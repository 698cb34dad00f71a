//! Fréchet distance between two Gaussians fitted to feature sets:
//! FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with mean and unbiased (n - 1) covariance in f64.
//!
//! Tr((S1 S2)^(1/2)) is taken as the sum of square roots of the eigenvalues of the symmetric A = S1^(1/2) S2 S1^(1/2)
//! (similar to S1 S2): symmetric eigensolvers only, eigenvalues at or below the solver's noise floor set to 0, so
//! singular covariances (fewer samples than dimensions) are fine and there is no complex arithmetic or sqrtm retry
//! as in pytorch-fid.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par, Side};

use crate::{EvalError, Features};

/// Rows per block when accumulating a covariance: a block of 4096 x 2048 f64 is 64 MB.
const ROWS: usize = 4096;

/// The mean and covariance of a feature set (what a reference cache keeps).
#[derive(Debug, Clone)]
pub struct Moments {
    pub name: String,
    pub n: usize,
    pub mean: Vec<f64>,
    /// `[dim, dim]`, unbiased.
    pub cov: Mat<f64>,
}

impl Moments {
    /// Needs at least 2 rows. Centred before the product (two passes), so large means cost no precision.
    pub fn of(x: &Features) -> Result<Self, EvalError> {
        x.require_rows(2, "a covariance")?;
        let (n, d) = (x.rows(), x.dim());
        let mut mean = vec![0.0; d];
        for i in 0..n {
            for (m, v) in mean.iter_mut().zip(x.row(i)) {
                *m += v;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut cov = Mat::<f64>::zeros(d, d);
        for start in (0..n).step_by(ROWS) {
            let rows = (n - start).min(ROWS);
            let centred = Mat::<f64>::from_fn(rows, d, |i, j| x.row(start + i)[j] - mean[j]);
            matmul(
                cov.as_mut(),
                Accum::Add,
                centred.transpose(),
                centred.as_ref(),
                1.0,
                Par::rayon(0),
            );
        }
        let scale = 1.0 / (n - 1) as f64;
        let cov = Mat::from_fn(d, d, |i, j| cov[(i, j)] * scale);
        Ok(Self {
            name: x.name().into(),
            n,
            mean,
            cov,
        })
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }
}

fn eigen_error(what: &str) -> impl Fn(faer::linalg::evd::EvdError) -> EvalError + '_ {
    move |_| EvalError::Numerical { what: what.into() }
}

/// Eigenvalues with those at or below the eigensolver's noise floor (d x eps x the largest, as numpy's
/// `matrix_rank` tolerance) set to 0: a singular covariance's zero eigenvalues come out as +-1e-16 x the largest,
/// whose square roots (1e-8) would otherwise add up to a visible error.
fn above_noise(values: &[f64]) -> Vec<f64> {
    let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = largest * values.len() as f64 * f64::EPSILON;
    values
        .iter()
        .map(|&v| if v > floor { v } else { 0.0 })
        .collect()
}

/// FD between the Gaussians of `a` and `b` (see the module docs).
pub fn frechet_distance(a: &Moments, b: &Moments) -> Result<f64, EvalError> {
    let d = a.dim();
    if b.dim() != d {
        return Err(EvalError::Shape {
            what: format!("{} and {}", a.name, b.name),
            reason: format!(
                "features of width {d} and {}: they come from different networks",
                b.dim()
            ),
        });
    }
    let what = format!("FD of {} and {}", a.name, b.name);
    let eig = a
        .cov
        .self_adjoint_eigen(Side::Lower)
        .map_err(eigen_error(&what))?;
    let (u, w) = (eig.U(), eig.S().column_vector());
    let w: Vec<f64> = (0..d).map(|i| w[i]).collect();
    let w = above_noise(&w);
    // S1^(1/2) = U diag(sqrt(w)) U^T.
    let scaled = Mat::<f64>::from_fn(d, d, |i, j| u[(i, j)] * w[j].sqrt());
    let mut root = Mat::<f64>::zeros(d, d);
    matmul(
        root.as_mut(),
        Accum::Replace,
        scaled.as_ref(),
        u.transpose(),
        1.0,
        Par::rayon(0),
    );
    let product = |l: MatRef<'_, f64>, r: MatRef<'_, f64>| {
        let mut out = Mat::<f64>::zeros(d, d);
        matmul(out.as_mut(), Accum::Replace, l, r, 1.0, Par::rayon(0));
        out
    };
    let inner = product(
        product(root.as_ref(), b.cov.as_ref()).as_ref(),
        root.as_ref(),
    );
    let symmetric = Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (inner[(i, j)] + inner[(j, i)]));
    let lambdas = symmetric
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(eigen_error(&what))?;
    let trace_root: f64 = above_noise(&lambdas).iter().map(|l| l.sqrt()).sum();
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let traces: f64 = (0..d).map(|i| a.cov[(i, i)] + b.cov[(i, i)]).sum();
    Ok(mean_term + traces - 2.0 * trace_root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(name: &str, n: usize, d: usize, seed: u64, shift: f64) -> Features {
        let mut rng = crate::SplitMix::new(seed, 0);
        let mut unit = || (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let data = (0..n * d)
            .map(|_| {
                // Box-Muller: a normal deviate.
                let (u, v) = (unit().max(1e-300), unit());
                (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() + shift
            })
            .collect();
        Features::new(name, d, data).unwrap()
    }

    #[test]
    fn identical_sets_are_zero_apart_and_a_shift_adds_its_square() {
        let x = gaussian("x", 200, 8, 1, 0.0);
        let m = Moments::of(&x).unwrap();
        assert!(frechet_distance(&m, &m).unwrap().abs() < 1e-10);
        // The same points moved by 0.5 in every one of 8 dimensions: the covariances are equal, FD = 8 * 0.25.
        let moved = Features::new("y", 8, x.data().iter().map(|v| v + 0.5).collect()).unwrap();
        let fd = frechet_distance(&m, &Moments::of(&moved).unwrap()).unwrap();
        assert!((fd - 2.0).abs() < 1e-9, "{fd}");
    }

    #[test]
    fn fewer_samples_than_dimensions_give_a_finite_nonnegative_distance() {
        let a = Moments::of(&gaussian("a", 10, 32, 2, 0.0)).unwrap();
        let b = Moments::of(&gaussian("b", 12, 32, 3, 0.1)).unwrap();
        let fd = frechet_distance(&a, &b).unwrap();
        assert!(fd.is_finite() && fd > 0.0, "{fd}");
        let own = frechet_distance(&a, &a).unwrap();
        assert!(own.abs() < 1e-9, "{own}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let one = Features::new("one.npy", 3, vec![1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            Moments::of(&one).unwrap_err().to_string(),
            "one.npy (a covariance): 1 sample(s), the metric needs at least 2"
        );
        let a = Moments::of(&gaussian("a.npy", 5, 3, 1, 0.0)).unwrap();
        let b = Moments::of(&gaussian("b.npy", 5, 4, 1, 0.0)).unwrap();
        let err = frechet_distance(&a, &b).unwrap_err().to_string();
        assert!(
            err.contains("a.npy and b.npy") && err.contains("width 3 and 4"),
            "{err}"
        );
    }
}

//! SSIM and PSNR of greyscale images given as row-major f64 pixels with a data range L (1 for [0, 1]).
//!
//! SSIM (Wang et al. 2004): Gaussian window of 11 taps, sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2, population
//! (co)variances, the map over the valid region only (the window never leaves the image), then its mean: what
//! scikit-image computes with `gaussian_weights=True, use_sample_covariance=False` (it crops the same border).

use crate::EvalError;

const TAPS: usize = 11;
const SIGMA: f64 = 1.5;

fn window() -> [f64; TAPS] {
    let mut w = [0.0; TAPS];
    let r = (TAPS / 2) as f64;
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - r;
        *v = (-0.5 * x * x / (SIGMA * SIGMA)).exp();
    }
    let sum: f64 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= sum);
    w
}

/// The separable Gaussian filter of `x` (`h` x `w`), valid region only: `(h - 10) x (w - 10)`.
fn filter_valid(x: &[f64], h: usize, w: usize) -> Vec<f64> {
    let g = window();
    let (oh, ow) = (h - TAPS + 1, w - TAPS + 1);
    let mut rows = vec![0.0; h * ow];
    for r in 0..h {
        for c in 0..ow {
            rows[r * ow + c] = (0..TAPS).map(|t| g[t] * x[r * w + c + t]).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for r in 0..oh {
        for c in 0..ow {
            out[r * ow + c] = (0..TAPS).map(|t| g[t] * rows[(r + t) * ow + c]).sum();
        }
    }
    out
}

fn check(a: &[f64], b: &[f64], h: usize, w: usize, min_side: usize) -> Result<(), EvalError> {
    if a.len() != h * w || b.len() != h * w {
        return Err(EvalError::Shape {
            what: "images".into(),
            reason: format!("{} and {} pixels for a {h}x{w} image", a.len(), b.len()),
        });
    }
    if h < min_side || w < min_side {
        return Err(EvalError::Shape {
            what: "images".into(),
            reason: format!("{h}x{w} is smaller than the {min_side}x{min_side} window"),
        });
    }
    if let Some(i) = a.iter().chain(b).position(|v| !v.is_finite()) {
        return Err(EvalError::NonFinite {
            what: "images".into(),
            at: format!("pixel {}", i % (h * w)),
            value: a.iter().chain(b).nth(i).copied().unwrap_or(f64::NAN),
        });
    }
    Ok(())
}

/// SSIM of two `h` x `w` images with data range `range`.
pub fn ssim(a: &[f64], b: &[f64], h: usize, w: usize, range: f64) -> Result<f64, EvalError> {
    check(a, b, h, w, TAPS)?;
    let product = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p * q).collect::<Vec<_>>();
    let (ux, uy) = (filter_valid(a, h, w), filter_valid(b, h, w));
    let uxx = filter_valid(&product(a, a), h, w);
    let uyy = filter_valid(&product(b, b), h, w);
    let uxy = filter_valid(&product(a, b), h, w);
    let (c1, c2) = ((0.01 * range).powi(2), (0.03 * range).powi(2));
    let map: f64 = (0..ux.len())
        .map(|i| {
            let (mx, my) = (ux[i], uy[i]);
            let (vx, vy, vxy) = (uxx[i] - mx * mx, uyy[i] - my * my, uxy[i] - mx * my);
            ((2.0 * mx * my + c1) * (2.0 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        })
        .sum();
    Ok(map / ux.len() as f64)
}

/// PSNR = 10 log10(L^2 / MSE); infinite for identical images.
pub fn psnr(a: &[f64], b: &[f64], h: usize, w: usize, range: f64) -> Result<f64, EvalError> {
    check(a, b, h, w, 1)?;
    let mse = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64;
    Ok(10.0 * (range * range / mse).log10())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_images_and_known_noise() {
        let (h, w) = (16, 20);
        let a: Vec<f64> = (0..h * w)
            .map(|i| ((i * 37) % 101) as f64 / 100.0)
            .collect();
        assert!((ssim(&a, &a, h, w, 1.0).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(psnr(&a, &a, h, w, 1.0).unwrap(), f64::INFINITY);
        // Every pixel off by 0.1: MSE 0.01, PSNR 20 dB.
        let b: Vec<f64> = a.iter().map(|v| v + 0.1).collect();
        assert!((psnr(&a, &b, h, w, 1.0).unwrap() - 20.0).abs() < 1e-9);
        let s = ssim(&a, &b, h, w, 1.0).unwrap();
        assert!(s < 1.0 && s > 0.9, "{s}");
        let err = ssim(&a[..100], &a[..100], 10, 10, 1.0).unwrap_err();
        assert!(
            err.to_string().contains("smaller than the 11x11 window"),
            "{err}"
        );
    }
}

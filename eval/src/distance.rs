//! Blocked Euclidean distances: a block of rows of one set against every row of another, through one matrix
//! product (|a|^2 + |b|^2 - 2 a.b), so that 50K x 50K never exists at once.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use crate::Features;

/// Rows per block: a block's distances to 50K rows are 256 x 50K f64 = 100 MB.
pub const BLOCK: usize = 256;

/// Each row's squared norm.
pub fn squared_norms(x: &Features) -> Vec<f64> {
    (0..x.rows())
        .map(|i| x.row(i).iter().map(|v| v * v).sum())
        .collect()
}

/// Distances from rows `rows` of `a` to every row of `b`, row-major `[rows.len(), b.rows()]`; `a_norms` and
/// `b_norms` from [`squared_norms`].
pub fn block_distances(
    a: &Features,
    a_norms: &[f64],
    rows: std::ops::Range<usize>,
    b: &Features,
    b_norms: &[f64],
) -> Vec<f64> {
    let d = a.dim();
    let (start, len, n) = (rows.start, rows.len(), b.rows());
    let block = MatRef::from_row_major_slice(&a.data()[start * d..rows.end * d], len, d);
    let all = MatRef::from_row_major_slice(b.data(), n, d);
    let mut dots = Mat::<f64>::zeros(len, n);
    // Blocks run in parallel already: the product inside one stays sequential.
    matmul(
        dots.as_mut(),
        Accum::Replace,
        block,
        all.transpose(),
        1.0,
        Par::Seq,
    );
    let mut out = vec![0.0; len * n];
    for i in 0..len {
        let na = a_norms[start + i];
        for j in 0..n {
            let nb = b_norms[j];
            let sq = na + nb - 2.0 * dots[(i, j)];
            // Near zero the expansion is all rounding: recompute exactly, so duplicates are exactly 0 apart.
            out[i * n + j] = if sq <= 1e-9 * (na + nb) {
                a.row(start + i)
                    .iter()
                    .zip(b.row(j))
                    .map(|(x, y)| (x - y) * (x - y))
                    .sum::<f64>()
                    .sqrt()
            } else {
                sq.sqrt()
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_distances_equal_the_direct_ones() {
        let a = Features::new("a", 3, (0..15).map(|i| (i as f64 * 0.7).sin()).collect()).unwrap();
        let mut data: Vec<f64> = (0..12).map(|i| (i as f64 * 1.3).cos()).collect();
        data.extend_from_slice(a.row(2)); // a duplicate of a's row 2
        let b = Features::new("b", 3, data).unwrap();
        let d = block_distances(&a, &squared_norms(&a), 1..4, &b, &squared_norms(&b));
        for i in 1..4 {
            for j in 0..5 {
                let direct: f64 = a
                    .row(i)
                    .iter()
                    .zip(b.row(j))
                    .map(|(x, y)| (x - y).powi(2))
                    .sum();
                assert!((d[(i - 1) * 5 + j] - direct.sqrt()).abs() < 1e-12);
            }
        }
        assert_eq!(d[5 + 4], 0.0, "duplicates are exactly 0 apart");
    }
}

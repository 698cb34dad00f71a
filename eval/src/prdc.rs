//! Precision, recall, density and coverage (Naeem et al. 2020; the `prdc` package and dgm-eval), with the k-th
//! nearest-neighbour radius of each point in its own set (itself excluded) and strict inequalities:
//! precision = share of fake points inside some real point's ball; recall = share of real points inside some fake
//! point's ball; density = (1/(kM)) x the number of (fake, real ball) containments; coverage = share of real points
//! whose ball holds a fake point. Distances are computed a block of rows at a time, in parallel, so memory stays at
//! a few blocks whatever the set sizes.

use rayon::prelude::*;
use serde::Serialize;

use crate::distance::{BLOCK, block_distances, squared_norms};
use crate::{EvalError, Features, same_width};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prdc {
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
    pub k: usize,
}

fn blocks(n: usize) -> Vec<std::ops::Range<usize>> {
    (0..n)
        .step_by(BLOCK)
        .map(|s| s..(s + BLOCK).min(n))
        .collect()
}

/// Each row's distance to its k-th nearest other row of the same set.
pub fn knn_radii(x: &Features, k: usize) -> Result<Vec<f64>, EvalError> {
    x.require_rows(k + 1, &format!("{k}-nearest-neighbour radii"))?;
    let norms = squared_norms(x);
    let n = x.rows();
    let per_block: Vec<Vec<f64>> = blocks(n)
        .into_par_iter()
        .map(|rows| {
            let d = block_distances(x, &norms, rows.clone(), x, &norms);
            rows.clone()
                .map(|i| {
                    let mut row = d[(i - rows.start) * n..(i - rows.start + 1) * n].to_vec();
                    row[i] = 0.0; // itself, exactly
                    // The (k+1)-th smallest including the zero distance to itself.
                    *row.select_nth_unstable_by(k, f64::total_cmp).1
                })
                .collect()
        })
        .collect();
    Ok(per_block.concat())
}

/// P, R, D, C of `fake` against `real` with `k` neighbours (k = 5 in CheXGenBench and the paper).
pub fn prdc(real: &Features, fake: &Features, k: usize) -> Result<Prdc, EvalError> {
    same_width(real, fake)?;
    if k == 0 {
        return Err(EvalError::Undefined {
            what: "PRDC".into(),
            reason: "k must be at least 1".into(),
        });
    }
    let real_radii = knn_radii(real, k)?;
    let fake_radii = knn_radii(fake, k)?;
    let (real_norms, fake_norms) = (squared_norms(real), squared_norms(fake));
    let n = real.rows();

    struct Partial {
        precise: usize,
        contained: usize,
        nearest_fake: Vec<f64>,
        recalled: Vec<bool>,
    }
    let partials: Vec<Partial> = blocks(fake.rows())
        .into_par_iter()
        .map(|rows| {
            let d = block_distances(fake, &fake_norms, rows.clone(), real, &real_norms);
            let mut p = Partial {
                precise: 0,
                contained: 0,
                nearest_fake: vec![f64::INFINITY; n],
                recalled: vec![false; n],
            };
            for (b, j) in rows.enumerate() {
                let row = &d[b * n..(b + 1) * n];
                let inside = row.iter().zip(&real_radii).filter(|(d, r)| d < r).count();
                p.precise += usize::from(inside > 0);
                p.contained += inside;
                for ((nearest, recalled), &d) in
                    p.nearest_fake.iter_mut().zip(&mut p.recalled).zip(row)
                {
                    *nearest = nearest.min(d);
                    *recalled |= d < fake_radii[j];
                }
            }
            p
        })
        .collect();
    let mut nearest = vec![f64::INFINITY; n];
    let mut recalled = vec![false; n];
    let (mut precise, mut contained) = (0usize, 0usize);
    for p in partials {
        precise += p.precise;
        contained += p.contained;
        for (i, (d, r)) in p.nearest_fake.iter().zip(&p.recalled).enumerate() {
            nearest[i] = nearest[i].min(*d);
            recalled[i] |= r;
        }
    }
    let m = fake.rows() as f64;
    Ok(Prdc {
        precision: precise as f64 / m,
        recall: recalled.iter().filter(|r| **r).count() as f64 / n as f64,
        density: contained as f64 / (k as f64 * m),
        coverage: nearest
            .iter()
            .zip(&real_radii)
            .filter(|(d, r)| d < r)
            .count() as f64
            / n as f64,
        k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_on_a_line_by_hand() {
        // Real 0, 1, 2, 3 (k = 1: every radius is 1); fake 0.5 and 10.
        let real = Features::new("real", 1, vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let fake = Features::new("fake", 1, vec![0.5, 10.0]).unwrap();
        assert_eq!(knn_radii(&real, 1).unwrap(), vec![1.0; 4]);
        let p = prdc(&real, &fake, 1).unwrap();
        // 0.5 is inside the balls of 0 and 1; 10 in none. The fake radii are 9.5: 0..3 are all within 9.5 of 0.5.
        assert_eq!(p.precision, 0.5);
        assert_eq!(p.density, 2.0 / 2.0);
        assert_eq!(p.recall, 1.0);
        // Real 0 and 1 have a fake point within their radius 1 (0.5 away); 2 and 3 do not (1.5 and 2.5).
        assert_eq!(p.coverage, 0.5);
    }

    #[test]
    fn identical_sets_cover_everything_and_too_few_points_are_named() {
        let x = Features::new("x", 2, (0..40).map(|i| (i as f64 * 0.9).sin()).collect()).unwrap();
        let p = prdc(&x, &x, 5).unwrap();
        assert_eq!((p.precision, p.recall, p.coverage), (1.0, 1.0, 1.0));
        let small = Features::new("small.npy", 2, vec![0.0; 10]).unwrap();
        let err = prdc(&x, &small, 5).unwrap_err().to_string();
        assert!(
            err.contains("small.npy") && err.contains("at least 6"),
            "{err}"
        );
    }
}

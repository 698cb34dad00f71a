//! Metrics of predictions against labels: ROC-AUC (the Mann-Whitney statistic with tied scores given their
//! average rank, as scikit-learn's `roc_auc_score`), its one-vs-rest macro average for several classes, the mean
//! absolute error (age, in years) and Cohen's kappa between two raters.

use crate::EvalError;

fn finite(what: &str, values: &[f64]) -> Result<(), EvalError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(EvalError::NonFinite {
            what: what.into(),
            at: format!("item {i}"),
            value: values[i],
        }),
        None => Ok(()),
    }
}

fn same_length(what: &str, a: usize, b: usize) -> Result<(), EvalError> {
    if a != b {
        return Err(EvalError::Shape {
            what: what.into(),
            reason: format!("{a} labels and {b} predictions"),
        });
    }
    Ok(())
}

/// ROC-AUC of `scores` for the positives in `labels`.
pub fn roc_auc(labels: &[bool], scores: &[f64]) -> Result<f64, EvalError> {
    same_length("ROC-AUC", labels.len(), scores.len())?;
    finite("ROC-AUC scores", scores)?;
    let positives = labels.iter().filter(|l| **l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return Err(EvalError::Undefined {
            what: "ROC-AUC".into(),
            reason: format!(
                "{positives} positive and {negatives} negative label(s): it needs both classes"
            ),
        });
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Ranks from 1; a run of ties shares the mean of its ranks.
    let mut rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        rank_sum += mean_rank * order[start..end].iter().filter(|&&i| labels[i]).count() as f64;
        start = end;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Ok((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// The macro average over classes of the one-vs-rest ROC-AUC; `scores` is row-major `[labels.len(), classes]`.
pub fn roc_auc_ovr(labels: &[usize], scores: &[f64], classes: usize) -> Result<f64, EvalError> {
    same_length("ROC-AUC", labels.len() * classes, scores.len())?;
    if let Some(&bad) = labels.iter().find(|&&l| l >= classes) {
        return Err(EvalError::Shape {
            what: "ROC-AUC".into(),
            reason: format!("label {bad} with {classes} classes of scores"),
        });
    }
    let mut total = 0.0;
    for c in 0..classes {
        let is_c: Vec<bool> = labels.iter().map(|&l| l == c).collect();
        let column: Vec<f64> = (0..labels.len()).map(|i| scores[i * classes + c]).collect();
        total += roc_auc(&is_c, &column).map_err(|e| match e {
            EvalError::Undefined { reason, .. } => EvalError::Undefined {
                what: format!("ROC-AUC of class {c} against the rest"),
                reason,
            },
            other => other,
        })?;
    }
    Ok(total / classes as f64)
}

/// The mean absolute error.
pub fn mae(predictions: &[f64], targets: &[f64]) -> Result<f64, EvalError> {
    same_length("MAE", targets.len(), predictions.len())?;
    finite("MAE predictions", predictions)?;
    finite("MAE targets", targets)?;
    if targets.is_empty() {
        return Err(EvalError::TooFew {
            what: "MAE".into(),
            have: 0,
            need: 1,
        });
    }
    Ok(predictions
        .iter()
        .zip(targets)
        .map(|(p, t)| (p - t).abs())
        .sum::<f64>()
        / targets.len() as f64)
}

/// Cohen's kappa = (p_o - p_e) / (1 - p_e) of two raters' categories; NaN when both always give the same single
/// category (p_e = 1), as scikit-learn.
pub fn cohen_kappa(a: &[usize], b: &[usize]) -> Result<f64, EvalError> {
    same_length("Cohen's kappa", a.len(), b.len())?;
    if a.is_empty() {
        return Err(EvalError::TooFew {
            what: "Cohen's kappa".into(),
            have: 0,
            need: 1,
        });
    }
    let categories = a.iter().chain(b).max().map_or(0, |m| m + 1);
    let (mut ca, mut cb) = (vec![0.0; categories], vec![0.0; categories]);
    let mut agree = 0.0;
    for (&x, &y) in a.iter().zip(b) {
        ca[x] += 1.0;
        cb[y] += 1.0;
        agree += f64::from(u8::from(x == y));
    }
    let n = a.len() as f64;
    let po = agree / n;
    let pe: f64 = ca.iter().zip(&cb).map(|(x, y)| x * y).sum::<f64>() / (n * n);
    Ok((po - pe) / (1.0 - pe))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_by_hand_with_ties() {
        // Positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8 > 0.4, 0.8 > 0.1, 0.4 = 0.4 -> 1/2, 0.4 > 0.1) = 3.5 / 4.
        let auc = roc_auc(&[true, true, false, false], &[0.8, 0.4, 0.4, 0.1]).unwrap();
        assert_eq!(auc, 0.875);
        assert_eq!(roc_auc(&[true, false], &[0.0, 1.0]).unwrap(), 0.0);
        let err = roc_auc(&[true, true], &[0.1, 0.2]).unwrap_err().to_string();
        assert!(err.contains("0 negative"), "{err}");
        let ovr = roc_auc_ovr(&[0, 1, 1], &[0.5, 0.5, 0.2, 0.8, 0.3, 0.7], 2).unwrap();
        assert!((ovr - 1.0).abs() < 1e-12);
        let missing = roc_auc_ovr(
            &[0, 0, 1],
            &[0.5, 0.3, 0.2, 0.6, 0.1, 0.2, 0.3, 0.4, 0.3],
            3,
        );
        assert!(missing.unwrap_err().to_string().contains("class 2"));
    }

    #[test]
    fn kappa_and_mae_by_hand() {
        // Agreement 3/4; marginals a = (2, 2), b = (1, 3): p_e = (2*1 + 2*3) / 16 = 0.5; kappa = 0.5.
        assert_eq!(cohen_kappa(&[0, 0, 1, 1], &[0, 1, 1, 1]).unwrap(), 0.5);
        assert!(cohen_kappa(&[1, 1], &[1, 1]).unwrap().is_nan());
        assert_eq!(mae(&[1.0, 5.0], &[2.0, 2.0]).unwrap(), 2.0);
        assert!(
            mae(&[f64::NAN], &[1.0])
                .unwrap_err()
                .to_string()
                .contains("item 0")
        );
    }
}

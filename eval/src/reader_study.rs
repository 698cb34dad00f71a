//! The expert reader study's scores (fidelity.md; the paper's §5.2 and Figure 2): readers label each image of a set
//! of real and synthetic radiographs, in two presentations shuffled separately. Per reader: accuracy with an exact
//! two-sided binomial test against chance (0.5); intra-rater agreement between the two presentations (percent and
//! Cohen's κ); and Cohen's κ of every pair of readers within a presentation.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::EvalError;
use crate::classify::cohen_kappa;

/// One reader's label of one image in one presentation: `synthetic` is the reader's call.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub reader: String,
    pub presentation: u32,
    pub image: String,
    pub synthetic: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Accuracy {
    pub answered: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Exact two-sided binomial test of `correct` of `answered` against 0.5.
    pub p_value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReaderScore {
    pub reader: String,
    /// Over every presentation.
    pub overall: Accuracy,
    /// Per presentation, in order.
    pub presentations: BTreeMap<u32, Accuracy>,
    /// Between the reader's first two presentations, over the images labelled in both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intra_rater: Option<Agreement>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    pub images: usize,
    /// Share of the images given the same label.
    pub percent: f64,
    /// Cohen's κ; NaN when both sides gave one label only (as scikit-learn).
    pub kappa: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairAgreement {
    pub readers: [String; 2],
    pub presentation: u32,
    #[serde(flatten)]
    pub agreement: Agreement,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReaderStudyScore {
    pub images: usize,
    pub synthetic: usize,
    pub readers: Vec<ReaderScore>,
    pub pairs: Vec<PairAgreement>,
}

/// ln C(n, k).
fn ln_choose(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum()
}

/// The exact two-sided binomial test of `k` successes in `n` trials against `p`: the total probability of the
/// outcomes no more likely than `k` (scipy's `binomtest`, with its relative tolerance of 1e-7 on the comparison).
pub fn binomial_two_sided(k: u64, n: u64, p: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let ln_pmf = |i: u64| ln_choose(n, i) + i as f64 * p.ln() + (n - i) as f64 * (1.0 - p).ln();
    let observed = ln_pmf(k);
    let threshold = observed + (1.0f64 + 1e-7).ln();
    let total: f64 = (0..=n)
        .map(ln_pmf)
        .filter(|&l| l <= threshold)
        .map(f64::exp)
        .sum();
    total.min(1.0)
}

fn accuracy(answers: &[(bool, bool)]) -> Accuracy {
    let correct = answers.iter().filter(|(said, truth)| said == truth).count();
    let answered = answers.len();
    Accuracy {
        answered,
        correct,
        accuracy: if answered == 0 {
            f64::NAN
        } else {
            correct as f64 / answered as f64
        },
        p_value: binomial_two_sided(correct as u64, answered as u64, 0.5),
    }
}

fn agreement(a: &[bool], b: &[bool]) -> Result<Agreement, EvalError> {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    let as_class = |v: &[bool]| v.iter().map(|&s| usize::from(s)).collect::<Vec<_>>();
    Ok(Agreement {
        images: a.len(),
        percent: 100.0 * same as f64 / a.len().max(1) as f64,
        kappa: cohen_kappa(&as_class(a), &as_class(b))?,
    })
}

/// Scores `responses` against `key` (image -> synthetic). A response naming an image the key does not have, or a
/// second label of the same image by the same reader in the same presentation, is an error naming it.
pub fn score(
    key: &BTreeMap<String, bool>,
    responses: &[Response],
) -> Result<ReaderStudyScore, EvalError> {
    // reader -> presentation -> image -> said synthetic
    let mut by: BTreeMap<&str, BTreeMap<u32, BTreeMap<&str, bool>>> = BTreeMap::new();
    for r in responses {
        if !key.contains_key(&r.image) {
            return Err(EvalError::Undefined {
                what: format!("reader {}, presentation {}", r.reader, r.presentation),
                reason: format!("image {} is not one of the study's images", r.image),
            });
        }
        let labels = by
            .entry(&r.reader)
            .or_default()
            .entry(r.presentation)
            .or_default();
        if labels.insert(&r.image, r.synthetic).is_some() {
            return Err(EvalError::Undefined {
                what: format!("reader {}, presentation {}", r.reader, r.presentation),
                reason: format!("image {} is labelled twice", r.image),
            });
        }
    }
    let mut readers = Vec::new();
    for (reader, presentations) in &by {
        let mut all = Vec::new();
        let mut per = BTreeMap::new();
        for (p, labels) in presentations {
            let answers: Vec<(bool, bool)> = labels
                .iter()
                .map(|(image, said)| (*said, key[*image]))
                .collect();
            all.extend(answers.iter().copied());
            per.insert(*p, accuracy(&answers));
        }
        let intra_rater = match presentations.values().take(2).collect::<Vec<_>>()[..] {
            [first, second] => {
                let both: Vec<&&str> = first.keys().filter(|i| second.contains_key(*i)).collect();
                let a: Vec<bool> = both.iter().map(|i| first[**i]).collect();
                let b: Vec<bool> = both.iter().map(|i| second[**i]).collect();
                (!both.is_empty()).then(|| agreement(&a, &b)).transpose()?
            }
            _ => None,
        };
        readers.push(ReaderScore {
            reader: reader.to_string(),
            overall: accuracy(&all),
            presentations: per,
            intra_rater,
        });
    }
    let mut pairs = Vec::new();
    let names: Vec<&&str> = by.keys().collect();
    let all_presentations: BTreeSet<u32> = by.values().flat_map(|p| p.keys().copied()).collect();
    for (i, a) in names.iter().enumerate() {
        for b in &names[i + 1..] {
            for p in &all_presentations {
                let (Some(la), Some(lb)) = (by[**a].get(p), by[**b].get(p)) else {
                    continue;
                };
                let both: Vec<&&str> = la.keys().filter(|k| lb.contains_key(*k)).collect();
                if both.is_empty() {
                    continue;
                }
                let x: Vec<bool> = both.iter().map(|k| la[**k]).collect();
                let y: Vec<bool> = both.iter().map(|k| lb[**k]).collect();
                pairs.push(PairAgreement {
                    readers: [a.to_string(), b.to_string()],
                    presentation: *p,
                    agreement: agreement(&x, &y)?,
                });
            }
        }
    }
    Ok(ReaderStudyScore {
        images: key.len(),
        synthetic: key.values().filter(|s| **s).count(),
        readers,
        pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_test_by_hand() {
        // n = 4, k = 0: P(0) + P(4) = 2 / 16.
        assert!((binomial_two_sided(0, 4, 0.5) - 0.125).abs() < 1e-15);
        // The centre of a symmetric test is 1.
        assert!((binomial_two_sided(2, 4, 0.5) - 1.0).abs() < 1e-12);
        // n = 10, k = 8: P(k <= 2) + P(k >= 8) = 2 * 56 / 1024.
        assert!((binomial_two_sided(8, 10, 0.5) - 112.0 / 1024.0).abs() < 1e-15);
        assert_eq!(binomial_two_sided(0, 0, 0.5), 1.0);
    }

    #[test]
    fn a_perfect_reader_and_a_contrary_one() {
        let key: BTreeMap<String, bool> = (0..4).map(|i| (format!("i{i}"), i % 2 == 0)).collect();
        let mut responses = Vec::new();
        for p in [1, 2] {
            for (image, truth) in &key {
                for (reader, said) in [("a", *truth), ("b", !*truth)] {
                    responses.push(Response {
                        reader: reader.into(),
                        presentation: p,
                        image: image.clone(),
                        synthetic: said,
                    });
                }
            }
        }
        let s = score(&key, &responses).unwrap();
        assert_eq!(s.readers[0].overall.accuracy, 1.0);
        assert_eq!(s.readers[1].overall.accuracy, 0.0);
        let intra = s.readers[0].intra_rater.as_ref().unwrap();
        assert_eq!((intra.percent, intra.kappa), (100.0, 1.0));
        assert_eq!(s.pairs.len(), 2);
        assert_eq!(s.pairs[0].agreement.kappa, -1.0);
        responses.push(responses[0].clone());
        assert!(
            score(&key, &responses)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}

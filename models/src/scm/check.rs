//! How well an SCM's samples match the data it learned (scm.md, check 3): the total-variation distance of each
//! variable's marginal, and of each variable's distribution given each configuration of its parents (age in
//! decades), over the configurations seen often enough on both sides. Missing values are left out on both sides.

use std::collections::BTreeMap;

use serde::Serialize;
use tch::Kind;

use super::graph::{Graph, Kind as VarKind};
use super::model::Profiles;

/// One variable's fit.
#[derive(Debug, Clone, Serialize)]
pub struct VariableFit {
    pub variable: String,
    /// TV distance of the marginals (over the observed values).
    pub marginal_tv: f64,
    /// TV distances given the parents: the mean weighted by the data's configuration counts, the largest, and
    /// how many configurations had at least `min_count` rows on both sides (none for a root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditional_tv_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditional_tv_max: Option<f64>,
    pub configurations: usize,
}

/// Every variable's value per row: the class id (0 = missing) or the age's decade + 1 (0 = missing).
fn values(graph: &Graph, p: &Profiles) -> Vec<Vec<u32>> {
    let labels =
        Vec::<i64>::try_from(p.labels.to_kind(Kind::Int64).flatten(0, -1)).unwrap_or_default();
    let age = Vec::<f32>::try_from(p.age.to_kind(Kind::Float)).unwrap_or_default();
    let columns = p.labels.size()[1] as usize;
    graph
        .variables
        .iter()
        .map(|v| match v.kind {
            VarKind::Categorical { label, .. } => (0..age.len())
                .map(|r| labels[r * columns + label] as u32)
                .collect(),
            VarKind::Age => age
                .iter()
                .map(|a| {
                    if a.is_finite() {
                        (a * 10.0).floor().clamp(0.0, 11.0) as u32 + 1
                    } else {
                        0
                    }
                })
                .collect(),
        })
        .collect()
}

/// TV distance of two histograms (value -> count), over their non-missing values.
fn tv(a: &BTreeMap<u32, f64>, b: &BTreeMap<u32, f64>) -> f64 {
    let (na, nb): (f64, f64) = (a.values().sum(), b.values().sum());
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    let keys: std::collections::BTreeSet<u32> = a.keys().chain(b.keys()).copied().collect();
    0.5 * keys
        .iter()
        .map(|k| (a.get(k).unwrap_or(&0.0) / na - b.get(k).unwrap_or(&0.0) / nb).abs())
        .sum::<f64>()
}

/// Histograms of variable `i` per parent configuration (rows with a missing parent or child left out).
fn by_configuration(
    graph: &Graph,
    v: &[Vec<u32>],
    i: usize,
) -> BTreeMap<Vec<u32>, BTreeMap<u32, f64>> {
    let mut out: BTreeMap<Vec<u32>, BTreeMap<u32, f64>> = BTreeMap::new();
    for (r, &child) in v[i].iter().enumerate() {
        let key: Vec<u32> = graph.parents[i].iter().map(|&p| v[p][r]).collect();
        if child == 0 || key.contains(&0) {
            continue;
        }
        *out.entry(key).or_default().entry(child).or_default() += 1.0;
    }
    out
}

/// The fit of `samples` to `data`, per variable in the graph's order; conditionals over configurations with at
/// least `min_count` rows on both sides.
pub fn fit(graph: &Graph, data: &Profiles, samples: &Profiles, min_count: f64) -> Vec<VariableFit> {
    let (vd, vs) = (values(graph, data), values(graph, samples));
    graph
        .order
        .iter()
        .map(|&i| {
            let marginal = |v: &[Vec<u32>]| {
                let mut h: BTreeMap<u32, f64> = BTreeMap::new();
                for &x in v[i].iter().filter(|&&x| x != 0) {
                    *h.entry(x).or_default() += 1.0;
                }
                h
            };
            let (cd, cs) = (
                by_configuration(graph, &vd, i),
                by_configuration(graph, &vs, i),
            );
            let mut weighted = (0.0, 0.0);
            let mut worst: Option<f64> = None;
            let mut configurations = 0;
            if !graph.parents[i].is_empty() {
                for (key, hd) in &cd {
                    let nd: f64 = hd.values().sum();
                    let Some(hs) = cs.get(key) else { continue };
                    if nd < min_count || hs.values().sum::<f64>() < min_count {
                        continue;
                    }
                    let d = tv(hd, hs);
                    weighted.0 += d * nd;
                    weighted.1 += nd;
                    worst = Some(worst.map_or(d, |w| w.max(d)));
                    configurations += 1;
                }
            }
            VariableFit {
                variable: graph.variables[i].name.clone(),
                marginal_tv: tv(&marginal(&vd), &marginal(&vs)),
                conditional_tv_mean: (weighted.1 > 0.0).then(|| weighted.0 / weighted.1),
                conditional_tv_max: worst,
                configurations,
            }
        })
        .collect()
}

//! Inference with the Flow SCM (scm.md): ancestral sampling in topological order, interventions (do(X = v): set,
//! cut from its parents, no ODE), and counterfactuals (abduction of each observed variable's noise by integrating
//! its flow backwards from the observed value under the observed parents, the action, then prediction of the
//! intervened variables' descendants only, from their abducted noise under the counterfactual parents;
//! non-descendants keep their observed values). Categoricals are the argmax of the solved state; age is the state.

use tch::{Kind, Tensor};

use super::graph::Kind as VarKind;
use super::model::{Profiles, Scm};
use crate::error::ModelError;
use crate::flow::fill_normal;
use crate::sampler::{Solver, VelocityField, solve};

/// The paper's SCM solver: dopri5 at atol = rtol = 1e-6 (its editing setting).
pub fn default_solver() -> Solver {
    Solver::Dopri5 {
        atol: 1e-6,
        rtol: 1e-6,
    }
}

const SCM_NOISE_STREAM: u64 = 0x5c3;

/// A value a variable is set to: a class id (1..=K; 0 = missing) or an age in years/100.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Class(u8),
    Age(f32),
}

/// `do(variable = value)`, by variable index.
#[derive(Debug, Clone, PartialEq)]
pub struct Intervention {
    pub variable: usize,
    pub value: Value,
}

/// Parses `name=value,...` (`sex=Female,age=63`) into interventions on `scm`'s graph: an unknown variable or
/// class is an error that lists the valid ones.
pub fn parse_interventions(scm: &Scm, text: &str) -> Result<Vec<Intervention>, ModelError> {
    let bad = |reason: String| ModelError::BadInput {
        input: "--do",
        reason,
    };
    let mut out: Vec<Intervention> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("`{item}` is not name=value")))?;
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        let variable = scm.graph.index(&name).ok_or_else(|| {
            bad(format!(
                "the graph has no variable `{name}` (it has: {})",
                scm.graph
                    .variables
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let value = match &scm.graph.variables[variable].kind {
            VarKind::Categorical { classes, .. } => {
                let k = classes
                    .iter()
                    .position(|c| c.eq_ignore_ascii_case(value))
                    .ok_or_else(|| {
                        bad(format!(
                            "`{value}` is not a class of {name} (classes: {})",
                            classes.join(", ")
                        ))
                    })?;
                Value::Class(k as u8 + 1)
            }
            VarKind::Age => {
                let years: f32 = value
                    .parse()
                    .ok()
                    .filter(|y: &f32| y.is_finite() && (0.0..=120.0).contains(y))
                    .ok_or_else(|| bad(format!("age `{value}`: expected years in 0..=120")))?;
                Value::Age(years / 100.0)
            }
        };
        if out.iter().any(|i| i.variable == variable) {
            return Err(bad(format!("`{name}` is set twice")));
        }
        out.push(Intervention { variable, value });
    }
    if out.is_empty() {
        return Err(bad("no intervention given (name=value, ...)".into()));
    }
    Ok(out)
}

/// One variable's flow under fixed conditions, as the solver sees it.
struct FlowField<'a> {
    scm: &'a Scm,
    variable: usize,
    condition: Tensor,
}

impl VelocityField for FlowField<'_> {
    fn velocity(&self, t: f64, x: &Tensor) -> Result<Tensor, ModelError> {
        let tt = Tensor::full([x.size()[0]], t, (Kind::Float, x.device()));
        Ok(self.scm.velocity(self.variable, x, &tt, &self.condition))
    }
}

/// Profiles being filled in: `labels` `[B, 18]` int64 and `age` `[B]` f32, on the CPU.
fn blank(scm: &Scm, n: i64) -> Profiles {
    let labels = scm
        .graph
        .variables
        .iter()
        .filter(|v| matches!(v.kind, VarKind::Categorical { .. }))
        .count() as i64;
    Profiles {
        labels: Tensor::zeros([n, labels], (Kind::Int64, tch::Device::Cpu)),
        age: Tensor::full([n], f64::NAN, (Kind::Float, tch::Device::Cpu)),
    }
}

/// Writes `values` (`[B]`: class ids as int64, or age as f32) into variable `i` of `p` where `rows` (bool `[B]`) is
/// set.
fn set(scm: &Scm, p: &mut Profiles, i: usize, values: &Tensor, rows: &Tensor) {
    match &scm.graph.variables[i].kind {
        VarKind::Categorical { label, .. } => {
            let column = p.labels.select(1, *label as i64);
            let new = values.to_kind(Kind::Int64).where_self(rows, &column);
            p.labels.select(1, *label as i64).copy_(&new);
        }
        VarKind::Age => {
            let new = values.to_kind(Kind::Float).where_self(rows, &p.age);
            p.age.copy_(&new);
        }
    }
}

/// A solved state `[B, dim]` as values `[B]`: argmax (+1 past the excluded missing class) or the age.
fn decode(scm: &Scm, i: usize, x: &Tensor) -> Tensor {
    match &scm.graph.variables[i].kind {
        VarKind::Categorical { .. } => {
            let k = x.argmax(1, false);
            if scm.config.null_as_class { k } else { k + 1 }
        }
        // 0 to 120 years, the range an age is accepted in
        VarKind::Age => x.select(1, 0).clamp(0.0, 1.2),
    }
}

/// Variable `i`'s value `[B]` of `p` as its observed flow state, and which rows have one.
fn observed(scm: &Scm, i: usize, p: &Profiles) -> (Tensor, Tensor) {
    let (x, mask) = scm.target(i, p);
    (x, mask.gt(0.5))
}

/// u_i `[n, dim]` for profiles `rows` (their indices) from the stream (seed, row, variable).
fn noise(scm: &Scm, i: usize, seed: u64, rows: &[u64]) -> Tensor {
    let dim = scm.dim(i) as usize;
    let mut data = vec![0f32; dim * rows.len()];
    for (chunk, &r) in data.chunks_mut(dim).zip(rows) {
        fill_normal(&[seed, r, i as u64, SCM_NOISE_STREAM], chunk);
    }
    Tensor::from_slice(&data).view([rows.len() as i64, dim as i64])
}

fn solve_variable(
    scm: &Scm,
    i: usize,
    parents_of: &Profiles,
    from: &Tensor,
    t0: f64,
    t1: f64,
    solver: Solver,
) -> Result<Tensor, ModelError> {
    let device = scm.device();
    let embeds: Vec<Tensor> = (0..scm.graph.variables.len())
        .map(|j| {
            if scm.graph.parents[i].contains(&j) {
                scm.embed(j, parents_of)
            } else {
                Tensor::zeros([1], (Kind::Float, device))
            }
        })
        .collect();
    let condition = if scm.graph.parents[i].is_empty() {
        Tensor::zeros(
            [from.size()[0], scm.config.embed_dim],
            (Kind::Float, device),
        )
    } else {
        scm.condition(i, &embeds)
    };
    let field = FlowField {
        scm,
        variable: i,
        condition,
    };
    let (x, _) = tch::no_grad(|| solve(&field, &from.to_device(device), t0, t1, solver))?;
    Ok(x.to_device(tch::Device::Cpu))
}

/// `n` profiles by ancestral sampling (profile k from the noise stream (seed, k)), with `interventions` applied:
/// an intervened variable is set for every profile and its flow is not solved.
pub fn sample(
    scm: &Scm,
    n: i64,
    seed: u64,
    interventions: &[Intervention],
    solver: Solver,
) -> Result<Profiles, ModelError> {
    let mut p = blank(scm, n);
    let rows: Vec<u64> = (0..n as u64).collect();
    let all = Tensor::ones([n], (Kind::Bool, tch::Device::Cpu));
    for &i in &scm.graph.order {
        let values = match interventions.iter().find(|x| x.variable == i) {
            Some(x) => constant(n, x.value),
            None => {
                let x = solve_variable(scm, i, &p, &noise(scm, i, seed, &rows), 0.0, 1.0, solver)?;
                decode(scm, i, &x)
            }
        };
        set(scm, &mut p, i, &values, &all);
    }
    Ok(p)
}

fn constant(n: i64, value: Value) -> Tensor {
    match value {
        Value::Class(c) => Tensor::full([n], i64::from(c), (Kind::Int64, tch::Device::Cpu)),
        Value::Age(a) => Tensor::full([n], f64::from(a), (Kind::Float, tch::Device::Cpu)),
    }
}

/// How a counterfactual treats an observed profile's missing values where it needs them (a descendant to
/// predict): keep them missing, or draw fresh noise (from `seed`) and predict them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Keep,
    Resample { seed: u64 },
}

/// Each profile's counterfactual under `interventions` (see the module docs).
pub fn counterfactual(
    scm: &Scm,
    observed_profiles: &Profiles,
    interventions: &[Intervention],
    missing: Missing,
    solver: Solver,
) -> Result<Profiles, ModelError> {
    let n = observed_profiles.len();
    let set: Vec<(usize, Tensor)> = interventions
        .iter()
        .map(|x| (x.variable, constant(n, x.value)))
        .collect();
    counterfactual_rows(scm, observed_profiles, &set, missing, solver)
}

/// Each profile's counterfactual under do(`variable` = its own value): `values` holds one per profile (class ids,
/// or ages in years/100), so profiles with different new values are solved together.
pub fn counterfactual_each(
    scm: &Scm,
    observed_profiles: &Profiles,
    variable: usize,
    values: &[Value],
    missing: Missing,
    solver: Solver,
) -> Result<Profiles, ModelError> {
    if values.len() as i64 != observed_profiles.len() {
        return Err(ModelError::BadInput {
            input: "interventions",
            reason: format!(
                "{} values for {} profiles",
                values.len(),
                observed_profiles.len()
            ),
        });
    }
    let column = match values.first() {
        Some(Value::Age(_)) => {
            let ages: Vec<f32> = values
                .iter()
                .map(|v| match v {
                    Value::Age(a) => *a,
                    Value::Class(_) => f32::NAN,
                })
                .collect();
            Tensor::from_slice(&ages)
        }
        _ => {
            let classes: Vec<i64> = values
                .iter()
                .map(|v| match v {
                    Value::Class(c) => i64::from(*c),
                    Value::Age(_) => 0,
                })
                .collect();
            Tensor::from_slice(&classes)
        }
    };
    counterfactual_rows(
        scm,
        observed_profiles,
        &[(variable, column)],
        missing,
        solver,
    )
}

/// The counterfactual with each intervened variable set to its column of values (one per profile).
fn counterfactual_rows(
    scm: &Scm,
    observed_profiles: &Profiles,
    set_to: &[(usize, Tensor)],
    missing: Missing,
    solver: Solver,
) -> Result<Profiles, ModelError> {
    let n = observed_profiles.len();
    let targets: Vec<usize> = set_to.iter().map(|x| x.0).collect();
    let below = scm.graph.descendants(&targets);
    let mut cf = observed_profiles.to_cpu();
    let all = Tensor::ones([n], (Kind::Bool, tch::Device::Cpu));
    let rows: Vec<u64> = (0..n as u64).collect();
    for &i in &scm.graph.order {
        if let Some((_, values)) = set_to.iter().find(|x| x.0 == i) {
            set(scm, &mut cf, i, values, &all);
            continue;
        }
        if !below[i] {
            continue;
        }
        // Abduction under the observed parents (rows with an observed value), then prediction under the
        // counterfactual parents.
        let (x1, present) = observed(scm, i, observed_profiles);
        let abducted = solve_variable(scm, i, observed_profiles, &x1, 1.0, 0.0, solver)?;
        let (u, predict) = match missing {
            Missing::Keep => (abducted, present.shallow_clone()),
            Missing::Resample { seed } => (
                abducted.where_self(&present.unsqueeze(1), &noise(scm, i, seed, &rows)),
                all.shallow_clone(),
            ),
        };
        let x = solve_variable(scm, i, &cf, &u, 0.0, 1.0, solver)?;
        set(scm, &mut cf, i, &decode(scm, i, &x), &predict);
    }
    Ok(cf)
}

/// Abduct-then-predict with no intervention: every observed variable's value from its own abducted noise under its
/// observed parents. A consistency check (it must return the observed profile).
pub fn reconstruct(
    scm: &Scm,
    observed_profiles: &Profiles,
    solver: Solver,
) -> Result<Profiles, ModelError> {
    let mut out = observed_profiles.to_cpu();
    for i in 0..scm.graph.variables.len() {
        let (x1, present) = observed(scm, i, observed_profiles);
        let u = solve_variable(scm, i, observed_profiles, &x1, 1.0, 0.0, solver)?;
        let x = solve_variable(scm, i, observed_profiles, &u, 0.0, 1.0, solver)?;
        set(scm, &mut out, i, &decode(scm, i, &x), &present);
    }
    Ok(out)
}

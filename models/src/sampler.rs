//! ODE samplers for the learned velocity field: Euler on the shifted grid, and adaptive dopri5 that reproduces
//! torchdiffeq's `dopri5` (tableau, error norm, step control, initial step, dense output at the end point).
//! Both run forward (noise -> image, t: 0 -> 1) and in reverse (image -> noise, 1 -> 0), which counterfactual
//! editing combines: abduct the noise under the original metadata, then regenerate under the edited metadata.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::flow::shift_time;
use crate::model::ModelError;
use crate::network::VelocityNet;

/// A time-dependent vector field dy/dt = f(t, y).
pub trait VelocityField {
    fn velocity(&self, t: f64, y: &Tensor) -> Result<Tensor, ModelError>;
}

impl<F: Fn(f64, &Tensor) -> Result<Tensor, ModelError>> VelocityField for F {
    fn velocity(&self, t: f64, y: &Tensor) -> Result<Tensor, ModelError> {
        self(t, y)
    }
}

/// A network's velocity under fixed metadata, without autograd.
pub struct Conditioned<'a> {
    pub model: &'a dyn VelocityNet,
    pub labels: &'a Tensor,
    pub age: &'a Tensor,
}

impl VelocityField for Conditioned<'_> {
    fn velocity(&self, t: f64, y: &Tensor) -> Result<Tensor, ModelError> {
        let b = y.size()[0];
        let t = Tensor::full([b], t, (Kind::Float, y.device()));
        let v = tch::no_grad(|| self.model.velocity(y, &t, self.labels, self.age))?;
        Ok(v.to_kind(y.kind()))
    }
}

/// Which ODE solver, and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Solver {
    /// Fixed steps on the grid shift(k / steps, s).
    Euler { steps: usize, shift: f64 },
    /// Adaptive Dormand-Prince 5(4) as torchdiffeq does it.
    Dopri5 { atol: f64, rtol: f64 },
}

impl Default for Solver {
    /// The paper's sampler for fidelity results: dopri5 at atol = rtol = 1e-5.
    fn default() -> Self {
        Solver::Dopri5 {
            atol: 1e-5,
            rtol: 1e-5,
        }
    }
}

impl Solver {
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, reason: String| {
            Err(radit_protocol::ConfigError::new(format!("sampler.{field}"), reason).into())
        };
        match *self {
            Solver::Euler { steps, shift } => {
                if steps == 0 {
                    return bad("steps", "must be at least 1".into());
                }
                if !(shift.is_finite() && shift > 0.0) {
                    return bad("shift", format!("must be positive, got {shift}"));
                }
            }
            Solver::Dopri5 { atol, rtol } => {
                for (f, v) in [("atol", atol), ("rtol", rtol)] {
                    if !(v.is_finite() && v > 0.0) {
                        return bad(f, format!("must be positive, got {v}"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a solve cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SolveStats {
    /// Function (model) evaluations.
    pub nfe: usize,
    pub accepted: usize,
    pub rejected: usize,
}

/// Integrates `field` from t0 to t1 (either direction) starting at `y`.
pub fn solve(
    field: &dyn VelocityField,
    y: &Tensor,
    t0: f64,
    t1: f64,
    solver: Solver,
) -> Result<(Tensor, SolveStats), ModelError> {
    solver.validate()?;
    match solver {
        Solver::Euler { steps, shift } => euler(field, y, t0, t1, steps, shift),
        Solver::Dopri5 { atol, rtol } => dopri5(field, y, t0, t1, atol, rtol),
    }
}

/// Euler on the shifted grid: x <- x + (t'_{k+1} - t'_k) v(x, t'_k). The grid maps [0, 1] through the shift, so
/// t0 and t1 must lie in [0, 1]; the reverse direction walks the same grid backwards.
pub fn euler(
    field: &dyn VelocityField,
    y: &Tensor,
    t0: f64,
    t1: f64,
    steps: usize,
    shift: f64,
) -> Result<(Tensor, SolveStats), ModelError> {
    if !(0.0..=1.0).contains(&t0) || !(0.0..=1.0).contains(&t1) {
        return Err(ModelError::BadInput {
            input: "t",
            reason: format!("Euler integrates within [0, 1], got {t0} -> {t1}"),
        });
    }
    let grid: Vec<f64> = (0..=steps)
        .map(|k| shift_time(t0 + (t1 - t0) * k as f64 / steps as f64, shift))
        .collect();
    let mut x = y.shallow_clone();
    for w in grid.windows(2) {
        x = &x + field.velocity(w[0], &x)? * (w[1] - w[0]);
    }
    Ok((
        x,
        SolveStats {
            nfe: steps,
            accepted: steps,
            rejected: 0,
        },
    ))
}

// Dormand-Prince 5(4) with Shampine's embedded pair and dense-output midpoint, as in torchdiffeq.
const ALPHA: [f64; 6] = [1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const BETA: [&[f64]; 6] = [
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
    &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
const ERROR: [f64; 7] = [
    35.0 / 384.0 - 1951.0 / 21600.0,
    0.0,
    500.0 / 1113.0 - 22642.0 / 50085.0,
    125.0 / 192.0 - 451.0 / 720.0,
    -2187.0 / 6784.0 + 12231.0 / 42400.0,
    11.0 / 84.0 - 649.0 / 6300.0,
    -1.0 / 60.0,
];
const MID: [f64; 7] = [
    6025192743.0 / 30085553152.0 / 2.0,
    0.0,
    51252292925.0 / 65400821598.0 / 2.0,
    -2691868925.0 / 45128329728.0 / 2.0,
    187940372067.0 / 1594534317056.0 / 2.0,
    -1776094331.0 / 19743644256.0 / 2.0,
    11237099.0 / 235043384.0 / 2.0,
];
const SAFETY: f64 = 0.9;
const IFACTOR: f64 = 10.0;
const DFACTOR: f64 = 0.2;
const ORDER: f64 = 5.0;
/// Step attempts before giving up (a stiff or diverging field); torchdiffeq's default is unbounded.
const MAX_ATTEMPTS: usize = 100_000;

/// RMS over the whole tensor (the batch shares its step sizes, as in torchdiffeq).
fn rms(x: &Tensor) -> f64 {
    x.square().mean(x.kind()).sqrt().double_value(&[])
}

/// Σ_j c_j k_j * dt, skipping zero coefficients.
fn combine(k: &[Tensor], coeffs: &[f64], dt: f64) -> Option<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (kj, &c) in k.iter().zip(coeffs) {
        if c == 0.0 {
            continue;
        }
        let term = kj * (c * dt);
        acc = Some(match acc {
            Some(a) => a + term,
            None => term,
        });
    }
    acc
}

/// Adaptive dopri5 from t0 to t1 (t1 < t0 integrates in reverse, as torchdiffeq does by negating time). The
/// result at t1 comes from the 4th-order dense output of the step that crosses it, not from a clipped last step.
pub fn dopri5(
    field: &dyn VelocityField,
    y0: &Tensor,
    t0: f64,
    t1: f64,
    atol: f64,
    rtol: f64,
) -> Result<(Tensor, SolveStats), ModelError> {
    if t0 == t1 {
        return Ok((y0.shallow_clone(), SolveStats::default()));
    }
    let sign = if t1 > t0 { 1.0 } else { -1.0 };
    let mut stats = SolveStats::default();
    // In the reversed problem s = -t: dy/ds = -f(-s, y).
    let mut f = |s: f64, y: &Tensor| -> Result<Tensor, ModelError> {
        stats.nfe += 1;
        let v = field.velocity(sign * s, y)?;
        Ok(if sign > 0.0 { v } else { -v })
    };
    let (s0, s1) = (sign * t0, sign * t1);

    let mut y = y0.shallow_clone();
    let mut fy = f(s0, &y)?;
    let mut dt = initial_step(&mut f, s0, &y, &fy, atol, rtol)?;
    let mut s = s0;
    let mut last: Option<(f64, f64, [Tensor; 5])> = None;
    let mut attempts = 0usize;
    while s1 > last.as_ref().map_or(s0, |l| l.1) {
        attempts += 1;
        if attempts > MAX_ATTEMPTS {
            return Err(ModelError::BadInput {
                input: "ode",
                reason: format!(
                    "dopri5 gave up after {MAX_ATTEMPTS} steps at t = {}",
                    sign * s
                ),
            });
        }
        if !(dt.is_finite() && s + dt > s) {
            return Err(ModelError::BadInput {
                input: "ode",
                reason: format!("dopri5 step size underflow ({dt}) at t = {}", sign * s),
            });
        }
        let s_next = s + dt;
        let mut k: Vec<Tensor> = vec![fy.shallow_clone()];
        let mut yi = y.shallow_clone();
        for (i, (&a, beta)) in ALPHA.iter().zip(BETA).enumerate() {
            let si = if a == 1.0 { s_next } else { s + a * dt };
            yi = match combine(&k[..=i], beta, dt) {
                Some(delta) => &y + delta,
                None => y.shallow_clone(),
            };
            k.push(f(si, &yi)?);
        }
        // FSAL: the last stage was evaluated at the 5th-order solution, which is yi.
        let y_next = yi;
        let err = combine(&k, &ERROR, dt).unwrap_or_else(|| y.zeros_like());
        let tol = y.abs().maximum(&y_next.abs()) * rtol + atol;
        let ratio = rms(&(err / tol));
        if ratio <= 1.0 {
            stats.accepted += 1;
            let y_mid = &y + combine(&k, &MID, dt).unwrap_or_else(|| y.zeros_like());
            let coeffs = interp_fit(&y, &y_next, &y_mid, &k[0], &k[6], dt);
            last = Some((s, s_next, coeffs));
            fy = k.swap_remove(6);
            y = y_next;
            s = s_next;
        } else {
            stats.rejected += 1;
        }
        dt = if ratio == 0.0 {
            dt * IFACTOR
        } else {
            let dfactor = if ratio < 1.0 { 1.0 } else { DFACTOR };
            dt * IFACTOR.min((SAFETY / ratio.powf(1.0 / ORDER)).max(dfactor))
        };
    }
    let Some((a, b, coeffs)) = last else {
        unreachable!("the loop runs until an accepted step passes s1")
    };
    Ok((interp_evaluate(&coeffs, a, b, s1), stats))
}

/// Hairer's initial step (Solving ODEs I, II.4) with torchdiffeq's constants.
fn initial_step(
    f: &mut dyn FnMut(f64, &Tensor) -> Result<Tensor, ModelError>,
    s0: f64,
    y0: &Tensor,
    f0: &Tensor,
    atol: f64,
    rtol: f64,
) -> Result<f64, ModelError> {
    let scale = y0.abs() * rtol + atol;
    let d0 = rms(&(y0 / &scale));
    let d1 = rms(&(f0 / &scale));
    let h0 = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6
    } else {
        0.01 * d0 / d1
    };
    let f1 = f(s0 + h0, &(y0 + f0 * h0))?;
    let d2 = rms(&((f1 - f0) / &scale)) / h0;
    let h1 = if d1 <= 1e-15 && d2 <= 1e-15 {
        (h0 * 1e-3).max(1e-6)
    } else {
        // Hairer's exponent 1/(q+1) with torchdiffeq's q = order - 1.
        (0.01 / d1.max(d2)).powf(1.0 / ORDER)
    };
    Ok((100.0 * h0).min(h1))
}

/// Quartic through y0, y1, the midpoint estimate and the end slopes, in x = (s - s0) / (s1 - s0).
fn interp_fit(
    y0: &Tensor,
    y1: &Tensor,
    y_mid: &Tensor,
    f0: &Tensor,
    f1: &Tensor,
    dt: f64,
) -> [Tensor; 5] {
    let a = (f1 - f0) * (2.0 * dt) - (y1 + y0) * 8.0 + y_mid * 16.0;
    let b = (f0 * 5.0 - f1 * 3.0) * dt + y0 * 18.0 + y1 * 14.0 - y_mid * 32.0;
    let c = (f1 - f0 * 4.0) * dt - y0 * 11.0 - y1 * 5.0 + y_mid * 16.0;
    let d = f0 * dt;
    [y0.shallow_clone(), d, c, b, a]
}

fn interp_evaluate(coeffs: &[Tensor; 5], s0: f64, s1: f64, s: f64) -> Tensor {
    let x = (s - s0) / (s1 - s0);
    let mut total = &coeffs[0] + &coeffs[1] * x;
    let mut power = x;
    for c in &coeffs[2..] {
        power *= x;
        total += c * power;
    }
    total
}

/// Generates images from noise x0 under the given metadata: integrates 0 -> 1.
pub fn generate(
    model: &dyn VelocityNet,
    noise: &Tensor,
    labels: &Tensor,
    age: &Tensor,
    solver: Solver,
) -> Result<(Tensor, SolveStats), ModelError> {
    solve(&Conditioned { model, labels, age }, noise, 0.0, 1.0, solver)
}

/// The result of a counterfactual edit.
pub struct Edit {
    /// The abducted noise (the image integrated back to t = 0 under its own metadata).
    pub noise: Tensor,
    /// The counterfactual image (that noise integrated to t = 1 under the edited metadata).
    pub image: Tensor,
    pub abduction: SolveStats,
    pub prediction: SolveStats,
}

/// Counterfactual editing: abduct x0 = ODE(x, 1 -> 0, original metadata), then x' = ODE(x0, 0 -> 1, edited).
#[allow(clippy::too_many_arguments)]
pub fn edit(
    model: &dyn VelocityNet,
    image: &Tensor,
    labels: &Tensor,
    age: &Tensor,
    new_labels: &Tensor,
    new_age: &Tensor,
    solver: Solver,
) -> Result<Edit, ModelError> {
    let original = Conditioned { model, labels, age };
    let (noise, abduction) = solve(&original, image, 1.0, 0.0, solver)?;
    let edited = Conditioned {
        model,
        labels: new_labels,
        age: new_age,
    };
    let (image, prediction) = solve(&edited, &noise, 0.0, 1.0, solver)?;
    Ok(Edit {
        noise,
        image,
        abduction,
        prediction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_field(
        y0: f64,
        field: impl Fn(f64, &Tensor) -> Tensor + 'static,
    ) -> (Tensor, Box<dyn VelocityField>) {
        let y = Tensor::from_slice(&[y0]).to_kind(Kind::Double);
        (y, Box::new(move |t: f64, y: &Tensor| Ok(field(t, y))))
    }

    #[test]
    fn dopri5_meets_its_tolerance_on_a_known_solution_both_ways() {
        // dy/dt = -2 t y, y(0) = 1: y(t) = exp(-t^2).
        let (y, f) = scalar_field(1.0, |t, y| y * (-2.0 * t));
        let (y1, stats) = dopri5(f.as_ref(), &y, 0.0, 1.0, 1e-8, 1e-8).unwrap();
        let exact = (-1.0f64).exp();
        assert!(
            (y1.double_value(&[0]) - exact).abs() < 1e-7,
            "{}",
            y1.double_value(&[0])
        );
        assert!(stats.nfe > 8 && stats.accepted > 1, "{stats:?}");
        let (back, _) = dopri5(f.as_ref(), &y1, 1.0, 0.0, 1e-8, 1e-8).unwrap();
        assert!((back.double_value(&[0]) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn euler_is_exact_for_a_constant_field_on_any_grid() {
        let (y, f) = scalar_field(0.25, |_, y| y.ones_like() * 2.0);
        let (y1, stats) = euler(f.as_ref(), &y, 0.0, 1.0, 7, 3.0).unwrap();
        assert!((y1.double_value(&[0]) - 2.25).abs() < 1e-12);
        assert_eq!(stats.nfe, 7);
        let (y0, _) = euler(f.as_ref(), &y1, 1.0, 0.0, 7, 3.0).unwrap();
        assert!((y0.double_value(&[0]) - 0.25).abs() < 1e-12);
    }

    /// A tiny RadiT with every zero-initialised layer moved, so its velocity depends on x, t and metadata.
    fn perturbed_tiny() -> (tch::nn::VarStore, crate::model::RadiT) {
        tch::manual_seed(3);
        let cfg = crate::model::RadiTConfig::preset("tiny").unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let model = crate::model::RadiT::new(&vs.root(), &cfg).unwrap();
        tch::no_grad(|| {
            for (name, mut v) in vs.variables() {
                if name.contains("adaLN") || name.starts_with("final_layer") {
                    v.copy_(&(v.randn_like() * 0.05));
                }
            }
        });
        (vs, model)
    }

    #[test]
    fn editing_with_unchanged_metadata_returns_the_image_and_edits_change_it() {
        let (_vs, model) = perturbed_tiny();
        let x = Tensor::randn([2, 1, 16, 16], tch::kind::FLOAT_CPU);
        let labels = Tensor::ones([2, 18], (Kind::Int64, tch::Device::Cpu));
        let age = Tensor::from_slice(&[0.4f32, f32::NAN]);
        let solver = Solver::Dopri5 {
            atol: 1e-6,
            rtol: 1e-6,
        };
        let same = edit(&model, &x, &labels, &age, &labels, &age, solver).unwrap();
        let err = (&same.image - &x).abs().max().double_value(&[]);
        assert!(
            err < 1e-3,
            "abduct then predict under the same metadata drifts by {err}"
        );
        assert!(same.abduction.nfe > 0 && same.prediction.nfe > 0);
        // Every finding flipped from negative to positive, and 40 years older.
        let edited_labels = labels.ones_like() * 2;
        let older = Tensor::from_slice(&[0.8f32, 0.6]);
        let other = edit(&model, &x, &labels, &age, &edited_labels, &older, solver).unwrap();
        let drift = (&same.image - &x).abs().mean(Kind::Float).double_value(&[]);
        let moved = (&other.image - &x)
            .abs()
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(
            moved > 10.0 * drift,
            "the edit moved the image by {moved}, drift alone is {drift}"
        );
        assert!(
            other.noise.equal(&same.noise),
            "abduction depends only on the original metadata"
        );
    }

    #[test]
    fn bf16_mode_tracks_fp32_and_keeps_fp32_parameters_and_gradients() {
        let (vs, mut model) = perturbed_tiny();
        let x1 = Tensor::randn([2, 1, 16, 16], tch::kind::FLOAT_CPU);
        let x0 = Tensor::randn([2, 1, 16, 16], tch::kind::FLOAT_CPU);
        let t = Tensor::from_slice(&[0.3f32, 0.8]);
        let labels = Tensor::ones([2, 18], (Kind::Int64, tch::Device::Cpu));
        let age = Tensor::from_slice(&[0.4f32, 0.7]);
        let xt = crate::flow::interpolate(&x1, &x0, &t);
        let full = model.forward(&xt, &t, &labels, &age).unwrap();
        model.set_precision(crate::precision::Precision::Bf16);
        let half = model.forward(&xt, &t, &labels, &age).unwrap();
        assert_eq!(
            half.kind(),
            Kind::Float,
            "the output (and so the loss) is fp32"
        );
        let err = ((&half - &full).norm().double_value(&[])) / full.norm().double_value(&[]);
        assert!(err > 0.0 && err < 3e-2, "bf16 relative error {err}");
        let loss = crate::flow::loss(&model, &x1, &x0, &t, &labels, &age).unwrap();
        loss.backward();
        for (name, v) in vs.variables() {
            assert_eq!(v.kind(), Kind::Float, "{name}");
            assert_eq!(v.grad().kind(), Kind::Float, "{name}");
        }
    }

    #[test]
    fn invalid_settings_are_named() {
        let err = Solver::Dopri5 {
            atol: 0.0,
            rtol: 1e-5,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("sampler.atol"));
        let err = Solver::Euler {
            steps: 0,
            shift: 1.0,
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("sampler.steps"));
    }
}

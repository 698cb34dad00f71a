//! The engine against plain autograd + Adam on one unsharded model, on worlds 1, 2 and 4 (threads).

use std::collections::BTreeMap;
use std::time::Duration;

use tch::{Device, Kind, Tensor, nn::VarStore};

use super::*;
use crate::collective::local::LocalGroup;
use crate::collective::threaded::overlapping;
use radit_models::model::{RadiT, RadiTConfig};

const BATCH: i64 = 4;

/// Tiny RadiT weights with every zero-initialised layer moved, so every parameter gets a gradient.
fn initial_weights(cfg: &RadiTConfig) -> BTreeMap<String, Tensor> {
    // Seeded: each test is its own process under nextest, so the same weights every run (unseeded draws made the
    // gap to the plain model vary from run to run, past the bound now and then).
    tch::manual_seed(11);
    let vs = VarStore::new(Device::Cpu);
    let _m = RadiT::new(&vs.root(), cfg).unwrap();
    let mut out = BTreeMap::new();
    for (i, (name, t)) in vs
        .variables()
        .into_iter()
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .enumerate()
    {
        let t = t.detach().copy();
        let t = if name.contains("adaLN")
            || name.starts_with("final_layer")
            || name.ends_with("age_null")
        {
            // Deterministic, not drawn from the shared generator: tests run in parallel.
            let n = t.numel() as i64;
            (Tensor::arange(n, tch::kind::FLOAT_CPU) * 0.37 + i as f64)
                .sin()
                .view(t.size().as_slice())
                * 0.05
        } else {
            t
        };
        out.insert(name, t);
    }
    out
}

struct Data {
    x1: Tensor,
    x0: Tensor,
    t: Tensor,
    labels: Tensor,
    age: Tensor,
}

fn data(cfg: &RadiTConfig, step: i64) -> Data {
    let n = BATCH * cfg.in_channels * cfg.input_size * cfg.input_size;
    let wave = |phase: f64| {
        (Tensor::arange(n, tch::kind::FLOAT_CPU) * 0.013 + phase + step as f64)
            .sin()
            .view([BATCH, cfg.in_channels, cfg.input_size, cfg.input_size])
    };
    let v = cfg.classes.len() as i64;
    let labels = Tensor::arange(BATCH * v, (Kind::Int64, Device::Cpu))
        .view([BATCH, v])
        .fmod(2)
        + 1;
    Data {
        x1: wave(0.0),
        x0: wave(1.7) * 1.3,
        t: Tensor::from_slice(&[0.1f32, 0.4, 0.6, 0.9]) + 0.01 * step as f64,
        labels,
        age: Tensor::from_slice(&[0.3f32, f32::NAN, 0.7, 0.5]),
    }
}

/// Plain training: the whole batch through one model with autograd, global clip, the same Adam and EMA.
type Run = (
    Vec<(f64, f64)>,
    BTreeMap<String, Tensor>,
    BTreeMap<String, Tensor>,
);

/// Returns per-step (loss, gradient norm), the final weights and the final EMA.
fn reference(
    cfg: &RadiTConfig,
    w0: &BTreeMap<String, Tensor>,
    steps: i64,
    ecfg: &EngineConfig,
) -> Run {
    let vs = VarStore::new(Device::Cpu);
    let model = RadiT::new(&vs.root(), cfg).unwrap();
    let vars = vs.variables();
    copy_weights(&vars, w0).unwrap();
    let names: Vec<String> = w0.keys().cloned().collect();
    let mut m: Vec<Tensor> = names.iter().map(|n| w0[n].zeros_like()).collect();
    let mut v: Vec<Tensor> = names.iter().map(|n| w0[n].zeros_like()).collect();
    let mut ema: Vec<Tensor> = names.iter().map(|n| w0[n].copy()).collect();
    let mut losses = Vec::new();
    for step in 0..steps {
        let d = data(cfg, step);
        let loss = radit_models::flow::loss(&model, &d.x1, &d.x0, &d.t, &d.labels, &d.age).unwrap();
        let params: Vec<Tensor> = names.iter().map(|n| vars[n].shallow_clone()).collect();
        let grads = Tensor::run_backward(&[&loss], &params, false, false);
        losses.push((loss.double_value(&[]), 0.0));
        let norm: f64 = grads
            .iter()
            .map(|g| g.square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let last = losses.len() - 1;
        losses[last] = (losses[last].0, norm);
        let clip = (ecfg.grad_clip / (norm + 1e-6)).min(1.0);
        // The engine's update arithmetic, applied per parameter (the sharding is what is under test).
        tch::no_grad(|| {
            for (k, p) in params.iter().enumerate() {
                let g = grads[k].copy();
                let mut p = p.shallow_clone();
                super::optim::update_slice(
                    &ecfg.adam,
                    &mut p,
                    &g,
                    &mut m[k],
                    &mut v[k],
                    &mut ema[k],
                    ecfg.adam.lr,
                    step as u64 + 1,
                    clip,
                    ecfg.ema_decay,
                );
            }
        });
    }
    let params = names
        .iter()
        .map(|n| (n.clone(), vars[n].detach().copy()))
        .collect();
    let ema = names.iter().cloned().zip(ema).collect();
    (losses, params, ema)
}

/// Runs `body` on `world` threads, each with an engine over an in-process group (on a communication thread, as
/// CPU ranks run, unless `threaded` is false), all starting from `w0`; returns each rank's result in rank order.
fn on_ranks<R: Send + 'static>(
    cfg: &RadiTConfig,
    w0: &BTreeMap<String, Tensor>,
    world: usize,
    ecfg: &EngineConfig,
    threaded: bool,
    body: impl Fn(usize, &mut Fsdp) -> R + Send + Clone + 'static,
) -> Vec<R> {
    let threads: Vec<_> = LocalGroup::ranks(world, Duration::from_secs(120))
        .into_iter()
        .map(|comm| {
            let (cfg, w0, ecfg, body) = (cfg.clone(), copy_map(w0), ecfg.clone(), body.clone());
            std::thread::spawn(move || {
                let rank = comm.rank();
                let comm: Box<dyn Collective> = if threaded {
                    overlapping(Box::new(comm), Device::Cpu).unwrap()
                } else {
                    Box::new(comm)
                };
                let mut e = Fsdp::new(
                    RadiT::builder(&cfg),
                    ecfg,
                    comm,
                    Device::Cpu,
                    Initial::Weights(&w0),
                )
                .unwrap();
                body(rank, &mut e)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("rank"))
        .collect()
}

/// Runs the engine on `world` threads (on communication threads unless `threaded` is false); each rank takes its
/// contiguous slice of the batch in `micro` pieces.
fn engine_run(
    cfg: &RadiTConfig,
    w0: &BTreeMap<String, Tensor>,
    steps: i64,
    world: usize,
    micro: i64,
    ecfg: &EngineConfig,
    threaded: bool,
) -> Run {
    let model_cfg = cfg.clone();
    let mut results = on_ranks(cfg, w0, world, ecfg, threaded, move |rank, e| {
        let rank = rank as i64;
        let per_rank = BATCH / world as i64;
        let per_micro = per_rank / micro;
        let mut losses = Vec::new();
        for step in 0..steps {
            let d = data(&model_cfg, step);
            let mut sum = 0.0;
            for k in 0..micro {
                let start = rank * per_rank + k * per_micro;
                let s = |t: &Tensor| t.narrow(0, start, per_micro);
                let mb = MicroBatch {
                    x1: &s(&d.x1),
                    x0: &s(&d.x0),
                    t: &s(&d.t),
                    labels: &s(&d.labels),
                    age: &s(&d.age),
                };
                sum += mb
                    .forward_backward(e, 1.0 / (world as f64 * micro as f64))
                    .unwrap();
            }
            let r = e.optimizer_step(sum, e.config().adam.lr).unwrap();
            assert!(!r.skipped);
            losses.push((r.loss, r.grad_norm));
        }
        (
            losses,
            e.gather_named(false).unwrap(),
            e.gather_named(true).unwrap(),
        )
    });
    for r in &results[1..] {
        assert_eq!(r.0, results[0].0, "every rank reports the same losses");
    }
    results.swap_remove(0)
}

fn copy_map(m: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    m.iter().map(|(k, v)| (k.clone(), v.copy())).collect()
}

/// Same weights up to reduction order: Adam divides by sqrt(v), so an element whose gradient is nearly zero can move
/// by a visible fraction of one learning-rate step when its gradient's last bits change. The bound is therefore on
/// the largest deviation (`tol` of the tensor's scale, or a tenth of one step of the test's lr for such an element:
/// a fresh-clone CI run saw 0.02 lr) and, 100x tighter than `tol`, on the mean deviation.
fn assert_close(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>, tol: f64, what: &str) {
    let one_step = cfg().1.adam.lr;
    assert_eq!(a.len(), b.len());
    for (name, x) in a {
        let y = &b[name];
        let diff = (x - y).abs();
        let (max, mean) = (
            diff.max().double_value(&[]),
            diff.mean(Kind::Double).double_value(&[]),
        );
        let scale = y.abs().max().double_value(&[]).max(1e-3);
        assert!(
            max <= (tol * scale).max(0.1 * one_step) && mean <= tol / 100.0 * scale,
            "{what}: {name} differs by {max:e} at most, {mean:e} on average (scale {scale:e})"
        );
    }
}

/// Per-step losses and gradient norms agree to 1e-5 (Adam hides a wrongly scaled gradient; the norm does not).
fn assert_steps_close(a: &[(f64, f64)], b: &[(f64, f64)], what: &str) {
    assert_eq!(a.len(), b.len());
    let gap = |x: f64, y: f64| (x - y).abs() / y.abs();
    let (loss_gap, norm_gap) = a.iter().zip(b).fold((0f64, 0f64), |(l, n), (x, y)| {
        (l.max(gap(x.0, y.0)), n.max(gap(x.1, y.1)))
    });
    // Read by scripts/parity-under-load.sh, which records the largest gaps of 50 runs beside CPU hogs.
    eprintln!("{what}: largest relative gap: loss {loss_gap:.3e}, gradient norm {norm_gap:.3e}");
    for ((la, na), (lb, nb)) in a.iter().zip(b) {
        assert!(
            (la - lb).abs() <= 1e-5 * lb.abs(),
            "{what}: loss {la} vs {lb}"
        );
        assert!(
            (na - nb).abs() <= 1e-5 * nb,
            "{what}: gradient norm {na} vs {nb}"
        );
    }
}

fn cfg() -> (RadiTConfig, EngineConfig) {
    let cfg = RadiTConfig::preset("tiny").unwrap();
    // A large learning rate and a small EMA decay so three steps move everything measurably.
    let ecfg = EngineConfig {
        adam: AdamConfig {
            lr: 1e-2,
            ..AdamConfig::default()
        },
        ema_decay: 0.5,
        ..EngineConfig::default()
    };
    (cfg, ecfg)
}

#[test]
fn sharded_training_matches_plain_autograd_on_worlds_1_2_and_4() {
    // One thread per op: every reduction's order is fixed, whatever the machine's cores and load.
    tch::set_num_threads(1);
    let (cfg, ecfg) = cfg();
    let w0 = initial_weights(&cfg);
    let (ref_losses, ref_params, ref_ema) = reference(&cfg, &w0, 3, &ecfg);
    assert!(
        ref_params.iter().any(|(n, p)| !p.equal(&w0[n])),
        "training moved the weights"
    );
    for world in [1, 2, 4] {
        let (losses, params, ema) = engine_run(&cfg, &w0, 3, world, 1, &ecfg, true);
        assert_steps_close(&losses, &ref_losses, &format!("world {world}"));
        assert_close(&params, &ref_params, 1e-3, &format!("world {world} params"));
        assert_close(&ema, &ref_ema, 1e-3, &format!("world {world} ema"));
    }
}

#[test]
fn zero2_equals_zero3_and_accumulation_equals_one_big_micro_batch() {
    let (cfg, ecfg) = cfg();
    let w0 = initial_weights(&cfg);
    let (l3, p3, _) = engine_run(&cfg, &w0, 2, 2, 1, &ecfg, true);
    let zero2 = EngineConfig {
        mode: ShardingMode::Zero2,
        ..ecfg.clone()
    };
    let (l2, p2, _) = engine_run(&cfg, &w0, 2, 2, 1, &zero2, true);
    assert_eq!(l2, l3);
    for (name, p) in &p3 {
        assert!(
            p.equal(&p2[name]),
            "{name}: ZeRO-2 and ZeRO-3 must compute the same thing"
        );
    }
    let (la, pa, _) = engine_run(&cfg, &w0, 2, 2, 2, &ecfg, true);
    assert_steps_close(&la, &l3, "two micro-batches vs one");
    assert_close(&pa, &p3, 1e-3, "two micro-batches vs one");
    // World 1 lands gradients in place (no reduce-scatter): the second micro-batch adds to the first.
    let (l1, p1, _) = engine_run(&cfg, &w0, 2, 1, 1, &ecfg, true);
    let (l1a, p1a, _) = engine_run(&cfg, &w0, 2, 1, 2, &ecfg, true);
    assert_steps_close(&l1a, &l1, "world 1: two micro-batches vs one");
    assert_close(&p1a, &p1, 1e-3, "world 1: two micro-batches vs one");
}

/// Overlapping the collectives changes when they run, not what they compute: with the communication thread and
/// without it, two ranks with two micro-batches reach the same losses and weights, bit for bit.
#[test]
fn the_communication_thread_changes_nothing_but_timing() {
    let (cfg, ecfg) = cfg();
    let w0 = initial_weights(&cfg);
    let (lt, pt, et) = engine_run(&cfg, &w0, 2, 2, 2, &ecfg, true);
    let (lb, pb, eb) = engine_run(&cfg, &w0, 2, 2, 2, &ecfg, false);
    assert_eq!(lt, lb);
    for (name, p) in &pb {
        assert!(p.equal(&pt[name]), "{name}: weights differ");
        assert!(eb[name].equal(&et[name]), "{name}: EMA differs");
    }
}

#[test]
fn a_non_finite_loss_on_one_rank_skips_the_step_everywhere() {
    let (cfg, ecfg) = cfg();
    let w0 = initial_weights(&cfg);
    let model_cfg = cfg.clone();
    let results = on_ranks(&cfg, &w0, 2, &ecfg, true, move |rank, e| {
        let d = data(&model_cfg, 0);
        let x1 = d.x1.narrow(0, 0, 2).copy();
        if rank == 1 {
            let _ = x1.get(0).get(0).get(0).get(0).fill_(f64::NAN);
        }
        let mb = MicroBatch {
            x1: &x1,
            x0: &d.x0.narrow(0, 0, 2),
            t: &d.t.narrow(0, 0, 2),
            labels: &d.labels.narrow(0, 0, 2),
            age: &d.age.narrow(0, 0, 2),
        };
        let loss = mb.forward_backward(e, 0.5).unwrap();
        let r = e.optimizer_step(loss, 1e-2).unwrap();
        (r.skipped, e.adam_steps(), e.gather_named(false).unwrap())
    });
    for (skipped, steps, params) in results {
        assert!(skipped, "every rank skips");
        assert_eq!(steps, 0);
        for (name, p) in &params {
            assert!(p.equal(&w0[name]), "{name} changed in a skipped step");
        }
    }
}

#[test]
fn bf16_training_tracks_fp32() {
    let (cfg, ecfg) = cfg();
    let w0 = initial_weights(&cfg);
    let (l32, _, _) = engine_run(&cfg, &w0, 2, 2, 1, &ecfg, true);
    let bf16 = EngineConfig {
        precision: Precision::Bf16,
        ..ecfg
    };
    let (l16, _, _) = engine_run(&cfg, &w0, 2, 2, 1, &bf16, true);
    for ((a, _), (b, _)) in l16.iter().zip(&l32) {
        assert!((a - b).abs() <= 2e-2 * b.abs(), "bf16 loss {a} vs fp32 {b}");
    }
    // And bf16 is really used: an engine that ignored it would give fp32's losses to the bit (bf16's epsilon is
    // 7.8e-3; the matmuls' rounding shows far above 1e-5).
    let largest = l16
        .iter()
        .zip(&l32)
        .map(|((a, _), (b, _))| (a - b).abs() / b.abs())
        .fold(0.0, f64::max);
    assert!(
        largest > 1e-5,
        "bf16 losses equal fp32's ({largest:e}): bf16 was not used"
    );
}

#[test]
fn training_state_that_cannot_fit_is_refused_before_it_is_allocated() {
    // XL (1.37 B parameters) alone on a 24 GiB host: 27.4 GB of state, with 16 GiB free once the model is built
    // (its own 5.5 GB of fp32 weights are freed as the shards are made, so they count as free).
    let xl = 1_370_482_816u64;
    let e = check_state_fits(xl, 1, Some(16 << 30))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("needs at least 25.5 GiB")
            && e.contains("over 1 rank(s)")
            && e.contains("21.1 GiB is free"),
        "{e}"
    );
    // Sharded over 8 ranks it fits; unknown free memory is never refused.
    check_state_fits(xl, 8, Some(16 << 30)).unwrap();
    check_state_fits(xl, 1, None).unwrap();
}

/// One micro-batch of the rectified-flow objective through the engine, as the train loop runs it (the loop's own
/// type lives in the jobs crate, above the engine).
struct MicroBatch<'a> {
    x1: &'a Tensor,
    x0: &'a Tensor,
    t: &'a Tensor,
    labels: &'a Tensor,
    age: &'a Tensor,
}

impl MicroBatch<'_> {
    fn forward_backward(&self, engine: &mut Fsdp, scale: f64) -> Result<f64, EngineError> {
        let xt = radit_models::flow::interpolate(self.x1, self.x0, self.t);
        let inputs = ModelInputs {
            x: &xt,
            t: self.t,
            labels: self.labels,
            age: self.age,
        };
        engine.forward_backward(
            &inputs,
            |v| radit_models::flow::velocity_mse(v, self.x1, self.x0),
            scale,
        )
    }
}

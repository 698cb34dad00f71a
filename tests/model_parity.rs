//! Parity of the Rust RadiT with its PyTorch twin (tests/python/radit_twin.py, written from the spec): the twin's
//! weights load into the Rust model, every intermediate, the loss and every gradient agree to fp32 relative error
//! 1e-5; weights written by Rust load strictly into the twin; dopri5 reproduces torchdiffeq.

mod common;

use common::{read_tensors as read, relative_error};

use std::path::{Path, PathBuf};

use radit_models::model::{
    RadiT, RadiTConfig, Trace, load_weights, read_weights_config, save_weights,
};
use radit_models::tch::{self, Kind, Tensor, nn::VarStore};
use radit_models::{flow, sampler};

fn twin() -> std::process::Command {
    let mut cmd = common::python();
    cmd.arg(common::repo().join("tests/python/radit_twin.py"));
    cmd
}

fn export(dir: &Path, preset: &str, perturb: bool) -> PathBuf {
    let out = dir.join(format!(
        "{preset}-{}",
        if perturb { "perturbed" } else { "init" }
    ));
    let mut cmd = twin();
    cmd.args(["export", "--preset", preset, "--out"]).arg(&out);
    if perturb {
        cmd.arg("--perturb");
    }
    common::run_ok(&mut cmd);
    out
}

struct Loaded {
    vs: VarStore,
    model: RadiT,
    cfg: RadiTConfig,
}

fn load(dir: &Path, preset: &str) -> Loaded {
    let weights = dir.join("weights.safetensors");
    let radit_models::network::Architecture::RadiT(cfg) = read_weights_config(&weights)
        .unwrap()
        .expect("the twin writes its config")
    else {
        panic!("the twin writes a RadiT config");
    };
    assert_eq!(
        cfg,
        RadiTConfig::preset(preset).unwrap(),
        "the twin's {preset} is the Rust preset"
    );
    let vs = VarStore::new(tch::Device::Cpu);
    let model = RadiT::new(&vs.root(), &cfg).unwrap();
    load_weights(&vs, &weights).unwrap();
    Loaded { vs, model, cfg }
}

#[test]
fn every_layer_the_loss_and_every_gradient_match_the_pytorch_twin() {
    let tmp = tempfile::tempdir().unwrap();
    // tiny: pixel-like (1 channel, patch 4); tiny-latent: 4 channels, patch 2, 3 heads (catches layout bugs).
    for preset in ["tiny", "tiny-latent"] {
        let dir = export(tmp.path(), preset, true);
        let Loaded { vs, model, cfg } = load(&dir, preset);
        let inp = read(&dir.join("inputs.safetensors"));
        let want = read(&dir.join("outputs.safetensors"));
        let (x1, x0, t) = (&inp["x1"], &inp["x0"], &inp["t"]);
        let (labels, age) = (&inp["labels"], &inp["age"]);
        assert!(
            age.get(0).isnan().int64_value(&[]) == 1,
            "the batch covers missing age"
        );

        let mut trace = Trace::new();
        let xt = flow::interpolate(x1, x0, t);
        let velocity = model
            .forward_traced(&xt, t, labels, age, &mut trace)
            .unwrap();
        assert!(velocity.equal(&trace.last().unwrap().1));
        assert_eq!(trace.len(), cfg.depth as usize + 3);
        for (name, got) in &trace {
            let err = relative_error(got, &want[name]);
            assert!(err <= 1e-5, "{preset} {name}: relative error {err:e}");
        }

        let loss = flow::loss(&model, x1, x0, t, labels, age).unwrap();
        let err = relative_error(&loss, &want["loss"].reshape([]));
        assert!(err <= 1e-5, "{preset} loss: relative error {err:e}");
        loss.backward();
        let grads = read(&dir.join("grads.safetensors"));
        let vars = vs.variables();
        assert_eq!(grads.len(), vars.len());
        for (name, g) in &grads {
            let err = relative_error(&vars[name].grad(), g);
            assert!(
                err <= 1e-5,
                "{preset} grad of {name}: relative error {err:e}"
            );
        }

        // Weights written by Rust load into the twin with strict names and shapes and give the same loss.
        let ours = dir.join("from-rust.safetensors");
        save_weights(&vs, &cfg, &ours).unwrap();
        let mut cmd = twin();
        cmd.args(["check-load", "--dir"])
            .arg(&dir)
            .arg("--weights")
            .arg(&ours);
        common::run_ok(&mut cmd);
    }
}

#[test]
fn the_zero_initialised_model_predicts_zero_so_the_loss_is_the_target_energy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export(tmp.path(), "tiny", false);
    let Loaded { model, .. } = load(&dir, "tiny");
    let inp = read(&dir.join("inputs.safetensors"));
    let want = read(&dir.join("outputs.safetensors"));
    let (x1, x0) = (&inp["x1"], &inp["x0"]);
    let energy = (x1 - x0).square().mean(Kind::Float);
    let loss = flow::loss(&model, x1, x0, &inp["t"], &inp["labels"], &inp["age"]).unwrap();
    assert_eq!(loss.double_value(&[]), energy.double_value(&[]));
    assert_eq!(want["velocity"].abs().max().double_value(&[]), 0.0);
    assert!(relative_error(&want["loss"].reshape([]), &energy) <= 1e-6);
}

#[test]
fn dopri5_reproduces_torchdiffeq_forward_reverse_and_on_an_analytic_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = export(tmp.path(), "tiny", true);
    common::run_ok(twin().args(["odeint", "--dir"]).arg(&dir));
    let nfe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ode.json")).unwrap()).unwrap();
    let want = read(&dir.join("ode.safetensors"));
    let Loaded { model, .. } = load(&dir, "tiny");
    let inp = read(&dir.join("inputs.safetensors"));
    let field = sampler::Conditioned {
        model: &model,
        labels: &inp["labels"],
        age: &inp["age"],
    };
    let solver = sampler::Solver::Dopri5 {
        atol: 1e-5,
        rtol: 1e-5,
    };

    for (key, start, t0, t1) in [("forward", "x0", 0.0, 1.0), ("reverse", "x1", 1.0, 0.0)] {
        let (y, stats) = sampler::solve(&field, &inp[start], t0, t1, solver).unwrap();
        assert_eq!(
            stats.nfe as u64,
            nfe[key].as_u64().unwrap(),
            "{key}: {stats:?}"
        );
        let err = relative_error(&y, &want[key]);
        assert!(err <= 1e-5, "{key}: relative error {err:e}");
    }

    // The same field as the twin's analytic_field, in float64: step for step the same solve.
    let analytic = |t: f64, y: &Tensor| -> Result<Tensor, radit_models::model::ModelError> {
        Ok(y * (3.0 * t).cos() - y.pow_tensor_scalar(3) * 0.5 + t)
    };
    let (y, stats) =
        sampler::dopri5(&analytic, &want["analytic_y0"], 0.0, 2.0, 1e-9, 1e-7).unwrap();
    assert_eq!(
        stats.nfe as u64,
        nfe["analytic"].as_u64().unwrap(),
        "{stats:?}"
    );
    let err = relative_error(&y, &want["analytic"]);
    assert!(err <= 1e-12, "analytic: relative error {err:e}");
}

#[test]
fn the_twin_and_the_rust_presets_count_the_same_parameters() {
    for preset in ["b-pixel", "b-latent", "xl-latent", "tiny", "tiny-latent"] {
        let out = common::run_ok(twin().args(["count", "--preset", preset]));
        let twin_count: i64 = common::stdout(&out).trim().parse().unwrap();
        let cfg = RadiTConfig::preset(preset).unwrap();
        assert_eq!(twin_count, cfg.parameter_count().total(), "{preset}");
    }
}

/// The engine's Adam, with and without decoupled weight decay, against `torch.optim.AdamW` (weight_decay 0 is
/// `torch.optim.Adam`): three steps of the same gradients from the same weights agree to fp32 relative 1e-5.
#[test]
fn adam_and_adamw_match_torch_optim() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let p0 = Tensor::randn([257], (Kind::Float, tch::Device::Cpu));
    let grads: Vec<Tensor> = (0..3)
        .map(|_| Tensor::randn([257], (Kind::Float, tch::Device::Cpu)) * 0.1)
        .collect();
    let mut io: Vec<(String, Tensor)> = vec![("p0".into(), p0.shallow_clone())];
    io.extend(
        grads
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("g{i}"), g.shallow_clone())),
    );
    let inputs = dir.path().join("in.safetensors");
    Tensor::write_safetensors(&io, &inputs).unwrap();
    for weight_decay in [0.0, 0.1] {
        let adam = radit_engine::fsdp::AdamConfig {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            warmup_steps: 0,
            weight_decay,
        };
        let out = dir.path().join(format!("torch-{weight_decay}.safetensors"));
        let script = format!(
            "import sys, torch\nfrom safetensors.torch import load_file, save_file\n\
             t = load_file(sys.argv[1]); p = torch.nn.Parameter(t['p0'].clone())\n\
             o = torch.optim.AdamW([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay={weight_decay})\n\
             for i in range(3):\n    p.grad = t[f'g{{i}}'].clone(); o.step()\n\
             save_file({{'p': p.detach().contiguous()}}, sys.argv[2])\n"
        );
        common::run_ok(
            common::python()
                .args(["-c", &script])
                .arg(&inputs)
                .arg(&out),
        );
        let mut p = p0.copy();
        let (mut m, mut v) = (p0.zeros_like(), p0.zeros_like());
        for (i, g) in grads.iter().enumerate() {
            adam.step(&mut p, g, &mut m, &mut v, adam.lr, i as u64 + 1);
        }
        let want = &read(&out)["p"];
        let err = relative_error(&p, want);
        assert!(err <= 1e-6, "weight decay {weight_decay}: {err:e}");
    }
}

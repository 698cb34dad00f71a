//! Parity of the Rust RadUNet with its PyTorch twin (tests/python/radunet_twin.py, written from the design note):
//! the twin's tiny U-Net's weights load into the Rust model under the same names, and the velocity, the loss, every
//! gradient and the weights after an SGD step with forced weight normalisation agree to fp32 relative 1e-5, with
//! and without keyed dropout.

mod common;

use common::{read_tensors as read, relative_error};

use radit_models::flow;
use radit_models::tch::{self, Kind, Tensor, nn::VarStore};
use radit_models::unet::{RadUNet, UNetConfig};

const TOL: f64 = 1e-5;

#[test]
fn the_tiny_unet_matches_its_pytorch_twin_forward_backward_and_after_a_normalised_step() {
    twin_parity(0.0);
}

/// The same with dropout 0.25 in every residual branch: the twin draws the masks from the same keys (seed, step,
/// sample, block, element) with the same integer hash, so the two agree as closely as without dropout.
#[test]
fn with_keyed_dropout_the_tiny_unet_still_matches_its_twin() {
    twin_parity(0.25);
}

fn twin_parity(dropout: f64) {
    let dir = tempfile::tempdir().unwrap();
    common::run_ok(
        common::python()
            .arg(common::repo().join("tests/python/radunet_twin.py"))
            .args(["export", "--out"])
            .arg(dir.path())
            .args(["--dropout", &dropout.to_string()]),
    );
    let weights = dir.path().join("weights.safetensors");
    let meta = radit_models::model::read_metadata(&weights).unwrap();
    let cfg: UNetConfig = serde_json::from_str(&meta["radit.unet.config"]).unwrap();
    assert_eq!(
        cfg,
        UNetConfig {
            dropout,
            ..UNetConfig::preset("unet-tiny").unwrap()
        },
        "the twin's tiny U-Net is the Rust preset"
    );
    let mut vs = VarStore::new(tch::Device::Cpu);
    let net = RadUNet::new(&vs.root(), &cfg).unwrap();
    let twin_weights = read(&weights);
    let ours: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
    assert_eq!(
        twin_weights
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        ours,
        "the same parameter and buffer names"
    );
    vs.load(&weights).unwrap();

    let io = read(&dir.path().join("inputs.safetensors"));
    let (x1, x0, t) = (&io["x1"], &io["x0"], &io["t"]);
    let xt = flow::interpolate(x1, x0, t);
    let keys = radit_models::unet::dropout::keys(5, 3, &[40, 41, 42, 43]);
    assert!(keys.equal(&io["keys"]), "the twin's keys are radit's");
    let v = if dropout > 0.0 {
        net.forward_train(&xt, t, &io["labels"], &io["age"], &keys)
    } else {
        net.forward(&xt, t, &io["labels"], &io["age"])
    }
    .unwrap();
    let loss = flow::velocity_mse(&v, x1, x0);
    let out = read(&dir.path().join("outputs.safetensors"));
    let err = relative_error(&v, &out["velocity"]);
    assert!(err <= TOL, "velocity differs by {err:e}");
    let err = relative_error(&loss, &out["loss"]);
    assert!(err <= TOL, "loss differs by {err:e}");

    let trainable = vs.trainable_variables().len();
    let names: Vec<String> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), trainable, "the buffers are not trained");
    let vars = vs.variables();
    let params: Vec<Tensor> = names.iter().map(|n| vars[n].shallow_clone()).collect();
    let grads = Tensor::run_backward(&[&loss], &params, false, false);
    let want = read(&dir.path().join("grads.safetensors"));
    assert_eq!(want.len(), names.len(), "a gradient for every parameter");
    let mut worst = (0.0, String::new());
    for (name, g) in names.iter().zip(&grads) {
        let err = relative_error(g, &want[name]);
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    assert!(
        worst.0 <= TOL,
        "gradient of {} differs by {:e}",
        worst.1,
        worst.0
    );

    // One SGD step, then forced weight normalisation, as training does after every optimiser step.
    tch::no_grad(|| {
        for (p, g) in params.iter().zip(&grads) {
            p.shallow_clone().copy_(&(p - g * 0.1));
        }
    });
    net.force_normalize();
    let after = read(&dir.path().join("after_step.safetensors"));
    for (name, p) in names.iter().zip(&params) {
        let err = relative_error(p, &after[name]);
        assert!(err <= TOL, "{name} after the step differs by {err:e}");
        if p.dim() >= 2 {
            // Unit RMS per output channel, up to the 1e-4 that normalisation adds to the RMS it divides by.
            let rows = p
                .to_kind(Kind::Double)
                .flatten(1, -1)
                .square()
                .mean_dim(1, false, Kind::Double)
                .sqrt();
            let off = (rows - 1.0).abs().max().double_value(&[]);
            assert!(
                off < 5e-3,
                "{name}: rows of unit RMS after forced normalisation ({off:e})"
            );
        }
    }
}

#[test]
fn model_info_reports_the_design_notes_counts_and_flops_for_the_unet_presets() {
    for (preset, network) in [("unet-pixel", 364_524_439u64), ("unet-latent", 496_912_677)] {
        let out = common::run_ok(common::radit().args(["model", "info", preset, "--json"]));
        let r: serde_json::Value = serde_json::from_str(common::stdout(&out).trim()).unwrap();
        assert_eq!(r["breakdown"]["network"], network, "{r}");
        let label = r["breakdown"]["label_path"].as_u64().unwrap();
        assert_eq!(r["parameters"].as_u64().unwrap(), network + label);
        assert!(r["forward_flops_per_image"].as_f64().unwrap() > 1e10, "{r}");
        let text = common::stdout(&common::run_ok(
            common::radit().args(["model", "info", preset]),
        ));
        assert!(text.contains(&format!("network {network}")), "{text}");
    }
}

/// RadVAE (Scratch) at the twin's tiny size: the twin's weights load under the same names, and the latent's mean
/// and log-variance, the decoded mean, its L1 reconstruction loss and every gradient agree to fp32 relative 1e-5.
#[test]
fn the_tiny_radvae_matches_its_pytorch_twin() {
    use radit_models::unet::{RadVae, RadVaeConfig};
    let dir = tempfile::tempdir().unwrap();
    common::run_ok(
        common::python()
            .arg(common::repo().join("tests/python/radunet_twin.py"))
            .args(["export-vae", "--out"])
            .arg(dir.path()),
    );
    let weights = dir.path().join("weights.safetensors");
    let meta = radit_models::model::read_metadata(&weights).unwrap();
    let cfg: RadVaeConfig = serde_json::from_str(&meta["radit.vae.config"]).unwrap();
    assert_eq!(cfg, RadVaeConfig::preset("radvae-tiny").unwrap());
    let mut vs = VarStore::new(tch::Device::Cpu);
    let vae = RadVae::new(&vs.root(), &cfg).unwrap();
    let twin_weights = read(&weights);
    let ours: std::collections::BTreeSet<String> = vs.variables().into_keys().collect();
    assert_eq!(
        twin_weights
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        ours,
        "the same parameter names"
    );
    vs.load(&weights).unwrap();
    let x = &read(&dir.path().join("inputs.safetensors"))["x"];
    let out = read(&dir.path().join("outputs.safetensors"));
    let (mean, logvar) = vae.encode(x).unwrap();
    let decoded = vae.decode(&mean).unwrap();
    let loss = (&decoded - x).abs().mean(Kind::Float);
    for (name, ours, theirs) in [
        ("mean", &mean, &out["mean"]),
        ("log-variance", &logvar, &out["logvar"]),
        ("decoded", &decoded, &out["decoded"]),
        ("loss", &loss, &out["loss"]),
    ] {
        let err = relative_error(ours, theirs);
        assert!(err <= TOL, "{name} differs by {err:e}");
    }
    let vars = vs.variables();
    let names: Vec<&String> = vars.keys().collect();
    let params: Vec<Tensor> = names.iter().map(|n| vars[*n].shallow_clone()).collect();
    let grads = Tensor::run_backward(&[&loss], &params, false, false);
    let want = read(&dir.path().join("grads.safetensors"));
    for (name, g) in names.iter().zip(&grads) {
        let err = relative_error(g, &want[*name]);
        assert!(err <= TOL, "gradient of {name} differs by {err:e}");
    }
}

//! radit-eval against the reference packages, in the same run (tests/python/eval_twin.py): FD against scipy's sqrtm
//! route (pytorch-fid, dgm-eval) and torchmetrics' eigenvalue route, KD against torch-fidelity's unbiased MMD^2, PRDC
//! against the `prdc` package, SSIM and PSNR against scikit-image, ROC-AUC, MAE and Cohen's kappa against
//! scikit-learn; on random features, fewer samples than dimensions, duplicated points and identical sets.

mod common;

use std::collections::BTreeMap;

use std::path::Path;

use common::*;
use radit_eval::fd::{Moments, frechet_distance};
use radit_eval::kd::{KdConfig, kernel_distance};
use radit_eval::{Features, classify, image, prdc};

/// Deterministic normal deviates (splitmix64 + Box-Muller).
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn next(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn matrix(&mut self, n: usize, d: usize, scale: f64, shift: f64) -> Vec<f64> {
        (0..n * d).map(|_| self.next() * scale + shift).collect()
    }
}

fn write(dir: &Path, name: &str, values: &[f64]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join(format!("{name}.f64")), bytes).unwrap();
}

fn reference(dir: &Path, case: serde_json::Value) -> serde_json::Value {
    std::fs::write(dir.join("case.json"), case.to_string()).unwrap();
    let out = run_ok(
        python()
            .arg(repo().join("tests/python/eval_twin.py"))
            .arg(dir),
    );
    serde_json::from_str(stdout(&out).trim()).unwrap()
}

fn close(what: &str, got: f64, want: f64, relative: f64) {
    let scale = want.abs().max(1e-12);
    assert!(
        (got - want).abs() <= relative * scale,
        "{what}: radit {got} vs reference {want} (relative {:e})",
        (got - want).abs() / scale
    );
}

/// FD, KD and PRDC of one pair of feature sets against the references; returns the references' answers.
/// `fd_route` names the reference FD and `fd_tolerance` the relative agreement expected with it.
fn compare_features(
    real: &[f64],
    fake: &[f64],
    d: usize,
    fd_route: &str,
    fd_tolerance: f64,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let (n, m) = (real.len() / d, fake.len() / d);
    write(dir.path(), "real", real);
    write(dir.path(), "fake", fake);
    let want = reference(
        dir.path(),
        serde_json::json!({"features": {"real": [n, d], "fake": [m, d], "k": 5}}),
    );
    let real = Features::new("real", d, real.to_vec()).unwrap();
    let fake = Features::new("fake", d, fake.to_vec()).unwrap();
    let fd = frechet_distance(&Moments::of(&real).unwrap(), &Moments::of(&fake).unwrap()).unwrap();
    let want_fd = want[fd_route].as_f64().unwrap();
    // Identical sets: both sides are round-off around 0.
    if want_fd.abs() < 1e-9 {
        assert!(fd.abs() < 1e-9, "FD of identical sets: {fd}");
    } else {
        close("FD", fd, want_fd, fd_tolerance);
    }
    if n == m {
        let kd = kernel_distance(
            &real,
            &fake,
            &KdConfig {
                subset_size: None,
                ..KdConfig::default()
            },
        )
        .unwrap();
        close("KD", kd.mean, want["kd"].as_f64().unwrap(), 1e-9);
    }
    let p = prdc::prdc(&real, &fake, 5).unwrap();
    for (name, got) in [
        ("precision", p.precision),
        ("recall", p.recall),
        ("density", p.density),
        ("coverage", p.coverage),
    ] {
        close(name, got, want["prdc"][name].as_f64().unwrap(), 1e-12);
    }
    want
}

#[test]
fn feature_metrics_agree_with_the_reference_packages() {
    let mut rng = Normal(11);
    // Random Gaussians of different means and spreads.
    let real = rng.matrix(300, 16, 1.0, 0.0);
    let fake = rng.matrix(300, 16, 1.3, 0.2);
    compare_features(&real, &fake, 16, "fd", 1e-8);
    // Fewer samples than dimensions (singular covariances): torchmetrics' route is the reference there, as sqrtm
    // of a singular product is itself inaccurate; the square roots of its zero eigenvalues' round-off (about 1e-8
    // each) leave about 1e-8 relative between any two routes, so agreement is checked to 1e-6.
    let real = rng.matrix(20, 48, 1.0, 0.0);
    let fake = rng.matrix(24, 48, 1.0, 0.1);
    compare_features(&real, &fake, 48, "fd_eigvals", 1e-6);
    // Every real point twice: the duplicate is a zero-distance neighbour, the radius comes from the others.
    let unique = rng.matrix(100, 8, 1.0, 0.0);
    let real: Vec<f64> = unique.iter().chain(&unique).copied().collect();
    let fake = rng.matrix(200, 8, 1.0, 0.1);
    compare_features(&real, &fake, 8, "fd", 1e-8);
    // Identical sets: FD 0, every P, R, C 1.
    let real = rng.matrix(120, 8, 1.0, 0.0);
    let want = compare_features(&real, &real, 8, "fd", 1e-8);
    assert_eq!(want["prdc"]["coverage"], 1.0);
}

#[test]
fn image_and_prediction_metrics_agree_with_the_reference_packages() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Normal(5);
    let (h, w) = (48, 40);
    let a: Vec<f64> = (0..h * w)
        .map(|i| {
            let (r, c) = ((i / w) as f64, (i % w) as f64);
            0.5 + 0.3 * (r / 7.0).sin() * (c / 5.0).cos()
        })
        .collect();
    let b: Vec<f64> = a
        .iter()
        .map(|v| (v + 0.05 * rng.next()).clamp(0.0, 1.0))
        .collect();
    write(dir.path(), "image_a", &a);
    write(dir.path(), "image_b", &b);
    // Scores with ties (rounded to tenths), a 3-class softmax, ages, two raters of 4 categories.
    let n = 200;
    let binary: Vec<bool> = (0..n).map(|_| rng.uniform() < 0.4).collect();
    let scores: Vec<f64> = binary
        .iter()
        .map(|&l| ((rng.next() + if l { 0.8 } else { 0.0 }) * 10.0).round() / 10.0)
        .collect();
    let classes: Vec<usize> = (0..n).map(|i| i % 3).collect();
    let mut class_scores = Vec::new();
    for &c in &classes {
        let logits: Vec<f64> = (0..3)
            .map(|k| rng.next() + if k == c { 1.0 } else { 0.0 })
            .collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        class_scores.extend(logits.iter().map(|l| l.exp() / z));
    }
    let age_true: Vec<f64> = (0..n).map(|_| 20.0 + 60.0 * rng.uniform()).collect();
    let age_pred: Vec<f64> = age_true.iter().map(|a| a + 5.0 * rng.next()).collect();
    let rater_a: Vec<usize> = (0..n).map(|_| (rng.uniform() * 4.0) as usize).collect();
    let rater_b: Vec<usize> = rater_a
        .iter()
        .map(|&x| {
            if rng.uniform() < 0.7 {
                x
            } else {
                (rng.uniform() * 4.0) as usize
            }
        })
        .collect();
    write(dir.path(), "binary_scores", &scores);
    write(dir.path(), "class_scores", &class_scores);
    write(dir.path(), "age_true", &age_true);
    write(dir.path(), "age_pred", &age_pred);
    let want = reference(
        dir.path(),
        serde_json::json!({
            "images": {"shape": [h, w], "range": 1.0},
            "labels": {
                "binary": binary, "classes": classes, "n_classes": 3, "n_age": n,
                "rater_a": rater_a, "rater_b": rater_b,
            },
        }),
    );
    let get = |k: &str| want[k].as_f64().unwrap();
    close(
        "SSIM",
        image::ssim(&a, &b, h, w, 1.0).unwrap(),
        get("ssim"),
        1e-10,
    );
    close(
        "PSNR",
        image::psnr(&a, &b, h, w, 1.0).unwrap(),
        get("psnr"),
        1e-10,
    );
    close(
        "ROC-AUC",
        classify::roc_auc(&binary, &scores).unwrap(),
        get("auc"),
        1e-12,
    );
    close(
        "ROC-AUC one-vs-rest",
        classify::roc_auc_ovr(&classes, &class_scores, 3).unwrap(),
        get("auc_ovr"),
        1e-12,
    );
    close(
        "MAE",
        classify::mae(&age_pred, &age_true).unwrap(),
        get("mae"),
        1e-12,
    );
    close(
        "Cohen's kappa",
        classify::cohen_kappa(&rater_a, &rater_b).unwrap(),
        get("kappa"),
        1e-12,
    );
}

#[test]
fn radit_eval_fidelity_reads_numpy_files_and_appends_a_csv_row() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // float32 files as numpy.save writes them; one with a NaN, one of another width, one too small for k = 5.
    run_ok(
        python()
            .arg("-c")
            .arg(
                r#"
import sys, numpy as np
d = sys.argv[1]
rng = np.random.default_rng(3)
np.save(f"{d}/real.npy", rng.normal(size=(400, 12)).astype(np.float32))
np.save(f"{d}/fake.npy", (rng.normal(size=(300, 12)) * 1.2 + 0.1).astype(np.float32))
bad = rng.normal(size=(300, 12)).astype(np.float32); bad[7, 3] = np.nan
np.save(f"{d}/nan.npy", bad)
np.save(f"{d}/wide.npy", rng.normal(size=(300, 16)).astype(np.float32))
np.save(f"{d}/five.npy", rng.normal(size=(5, 12)).astype(np.float32))
"#,
            )
            .arg(d),
    );
    let fidelity = |fake: &str, extra: &[&str]| {
        let mut cmd = radit();
        cmd.args(["eval", "fidelity", "--real"])
            .arg(d.join("real.npy"))
            .arg("--fake")
            .arg(d.join(fake))
            .args(["--kd-subsets", "10", "--kd-subset-size", "100"])
            .args(extra);
        cmd
    };
    let csv = d.join("table.csv");
    let out = run_ok(
        fidelity(
            "fake.npy",
            &[
                "--model",
                "tiny",
                "--reference",
                "test",
                "--network",
                "none",
                "--csv",
            ],
        )
        .arg(&csv),
    );
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    // The same numbers as the library on the same files.
    let real = radit_eval::io::read_npy(&d.join("real.npy")).unwrap();
    let fake = radit_eval::io::read_npy(&d.join("fake.npy")).unwrap();
    let fd = frechet_distance(&Moments::of(&real).unwrap(), &Moments::of(&fake).unwrap()).unwrap();
    close("FD", report["mean"]["fd"].as_f64().unwrap(), fd, 1e-12);
    let p = prdc::prdc(&real, &fake, 5).unwrap();
    assert_eq!(report["mean"]["coverage"].as_f64().unwrap(), p.coverage);
    // Table 13's regime: three draws of 200 reference rows.
    run_ok(
        fidelity(
            "fake.npy",
            &[
                "--reference-draws",
                "3",
                "--draw-size",
                "200",
                "--model",
                "tiny",
                "--csv",
            ],
        )
        .arg(&csv),
    );
    let table = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("model,reference,network,n_real"));
    assert!(
        lines[1].starts_with("tiny,test,none,400,300,12,1,"),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("tiny,,,200,300,12,3,"), "{}", lines[2]);

    // Bad input: named, exit 2.
    let err = fails_with_usage(
        &mut fidelity("nan.npy", &[]),
        "nan.npy: row 7, column 3 is not finite",
    );
    assert!(!err.contains("panicked"));
    let err = fails_with_usage(&mut fidelity("wide.npy", &[]), "width 12 and 16");
    assert!(
        err.contains("real.npy") && err.contains("wide.npy"),
        "{err}"
    );
    fails_with_usage(
        &mut fidelity("five.npy", &["--kd-subset-size", "min"]),
        "five.npy",
    );
}

#[test]
fn radit_eval_features_match_the_module_in_pytorch_and_score_two_splits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 160, "40x48", 8, &[]);
    let net = feature_net(d);
    let twin = repo().join("tests/python/feature_twin.py");
    let features = |split: &str| {
        let out = d.join(format!("{split}.npy"));
        let report = run_ok(
            radit()
                .args(["eval", "features", "--store"])
                .arg(&store)
                .args([
                    "--split",
                    split,
                    "--input-size",
                    "32",
                    "--batch",
                    "5",
                    "--device",
                    "cpu",
                ])
                .arg("--net")
                .arg(&net)
                .arg("--out")
                .arg(&out),
        );
        let report: serde_json::Value = serde_json::from_str(stdout(&report).trim()).unwrap();
        assert_eq!(report["dim"], 24, "{report}");
        assert!(
            report["network"]
                .as_str()
                .unwrap()
                .starts_with("torchscript:")
        );
        out
    };
    for split in ["train", "test"] {
        let out = features(split);
        let check = run_ok(
            python()
                .arg(&twin)
                .args(["check", store.to_str().unwrap(), split])
                .arg(&net)
                .arg(&out),
        );
        let c: serde_json::Value = serde_json::from_str(stdout(&check).trim()).unwrap();
        assert_eq!(c["shape"], c["want_shape"], "{c}");
        assert_eq!(c["ids_match"], true, "{c}");
        let (diff, scale) = (
            c["max_abs_diff"].as_f64().unwrap(),
            c["scale"].as_f64().unwrap(),
        );
        assert!(diff <= 1e-5 * scale.max(1.0), "{c}");
    }
    // The two splits' features make a fidelity row (test as the reference, train standing in for samples).
    let out = run_ok(
        radit()
            .args(["eval", "fidelity", "--kd-subset-size", "min", "--real"])
            .arg(d.join("test.npy"))
            .arg("--fake")
            .arg(d.join("train.npy")),
    );
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(report["mean"]["fd"].as_f64().unwrap().is_finite());
    // A module that is not TorchScript is named.
    std::fs::write(d.join("bad.pt"), b"not a module").unwrap();
    fails_with_usage(
        radit()
            .args(["eval", "features", "--store"])
            .arg(&store)
            .args(["--input-size", "32", "--device", "cpu", "--net"])
            .arg(d.join("bad.pt"))
            .arg("--out")
            .arg(d.join("x.npy")),
        "bad.pt",
    );
}

/// DINOv3 (Table 9's network) natively: RoPE on the patch tokens, register tokens, its processor's order
/// (rescale, an antialiased bilinear resize in fp32, ImageNet's mean and std); the features equal transformers'
/// `pooler_output` of the same snapshot on the same images to 1e-5.
#[test]
fn dinov3_features_match_transformers_with_its_processor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 24, "40x48", 8, &[]);
    let twin = repo().join("tests/python/dinov3_twin.py");
    let snapshot = d.join("dinov3");
    run_ok(python().arg(&twin).arg("make").arg(&snapshot).arg("5"));
    let out = d.join("dinov3.npy");
    let report = run_ok(
        radit()
            .args(["eval", "features", "--store"])
            .arg(&store)
            .args([
                "--split", "train", "--batch", "5", "--device", "cpu", "--net",
            ])
            .arg(&snapshot)
            .arg("--out")
            .arg(&out),
    );
    let report: serde_json::Value = serde_json::from_str(stdout(&report).trim()).unwrap();
    assert_eq!(report["dim"], 64, "{report}");
    assert!(
        report["network"].as_str().unwrap().starts_with("dinov3:"),
        "{report}"
    );
    let check = run_ok(
        python()
            .arg(&twin)
            .args(["check", store.to_str().unwrap(), "train"])
            .arg(&snapshot)
            .arg(&out),
    );
    let c: serde_json::Value = serde_json::from_str(stdout(&check).trim()).unwrap();
    assert_eq!(c["shape"], c["want_shape"], "{c}");
    // The store's 16 x 16 images are upsampled to the processor's 64: 16 patch tokens with RoPE.
    assert_eq!(
        c["input"],
        serde_json::json!([c["shape"][0], 3, 64, 64]),
        "{c}"
    );
    let (diff, scale) = (
        c["max_abs_diff"].as_f64().unwrap(),
        c["scale"].as_f64().unwrap(),
    );
    assert!(diff <= 1e-5 * scale.max(1.0), "{c}");
}

/// The FID Inception (Table 10) natively: pytorch-fid's own InceptionV3 with the same (random) weights gives the
/// same pool3 features on the same 8-bit images; the export script refuses a file that is not the 2015-12-05
/// weights unless told, and a safetensors file that is not the FID network is refused, naming it.
#[test]
fn the_fid_inception_matches_pytorch_fid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 24, "40x48", 8, &[]);
    let twin = repo().join("tests/python/inception_twin.py");
    let (pth, net) = (d.join("inception.pth"), d.join("inception.safetensors"));
    run_ok(python().arg(&twin).arg("make").arg(&pth).arg("3"));
    let export = || {
        let mut cmd = python();
        cmd.arg(repo().join("scripts/export-fid-inception.py"))
            .arg(&pth)
            .arg(&net);
        cmd
    };
    let refused = export().output().unwrap();
    assert!(
        !refused.status.success() && stderr(&refused).contains("6726825d"),
        "{}",
        stderr(&refused)
    );
    run_ok(export().arg("--any-weights"));
    let out = d.join("inception.npy");
    let features = |net: &Path| {
        let mut cmd = radit();
        cmd.args(["eval", "features", "--store"])
            .arg(&store)
            .args([
                "--split", "train", "--batch", "8", "--device", "cpu", "--net",
            ])
            .arg(net)
            .arg("--out")
            .arg(&out);
        cmd
    };
    let report = run_ok(&mut features(&net));
    let report: serde_json::Value = serde_json::from_str(stdout(&report).trim()).unwrap();
    assert_eq!(report["dim"], 2048, "{report}");
    assert!(
        report["network"]
            .as_str()
            .unwrap()
            .starts_with("fid-inception:"),
        "{report}"
    );
    let check = run_ok(
        python()
            .arg(&twin)
            .args(["check", store.to_str().unwrap(), "train"])
            .arg(&pth)
            .arg(&out),
    );
    let c: serde_json::Value = serde_json::from_str(stdout(&check).trim()).unwrap();
    assert_eq!(c["shape"], c["want_shape"], "{c}");
    // Measured: 0.0 (the same libtorch kernels in the same order).
    let (diff, scale) = (
        c["max_abs_diff"].as_f64().unwrap(),
        c["scale"].as_f64().unwrap(),
    );
    assert!(diff <= 1e-5 * scale.max(1.0), "{c}");
    let other = tiny_weights(d);
    fails_with_usage(&mut features(&other), "w.safetensors");
}

#[test]
fn dinov2_features_match_transformers_with_its_processor_and_chexgenbench_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 24, "40x48", 8, &[]);
    let twin = repo().join("tests/python/dinov2_twin.py");
    // The hub's naming at its own grid, and transformers 5's naming with positions interpolated (56 -> 84).
    for (name, image_size, naming) in [("release", "84", "release"), ("v5", "56", "v5")] {
        let snapshot = d.join(name);
        run_ok(
            python()
                .arg(&twin)
                .arg("make")
                .arg(&snapshot)
                .args([image_size, naming, "7"]),
        );
        for chain in ["processor", "chexgenbench"] {
            let out = d.join(format!("{name}-{chain}.npy"));
            let report = run_ok(
                radit()
                    .args(["eval", "features", "--store"])
                    .arg(&store)
                    .args(["--split", "train", "--batch", "5", "--device", "cpu"])
                    .args(["--preprocessing", chain, "--net"])
                    .arg(&snapshot)
                    .arg("--out")
                    .arg(&out),
            );
            let report: serde_json::Value = serde_json::from_str(stdout(&report).trim()).unwrap();
            assert_eq!(report["dim"], 32, "{report}");
            let id = report["network"].as_str().unwrap();
            assert!(id.starts_with("dinov2:") && id.contains(chain), "{id}");
            let check = run_ok(
                python()
                    .arg(&twin)
                    .args(["check", store.to_str().unwrap(), "train"])
                    .arg(&snapshot)
                    .arg(chain)
                    .arg(&out),
            );
            let c: serde_json::Value = serde_json::from_str(stdout(&check).trim()).unwrap();
            assert_eq!(c["shape"], c["want_shape"], "{name} {chain}: {c}");
            let (diff, scale) = (
                c["max_abs_diff"].as_f64().unwrap(),
                c["scale"].as_f64().unwrap(),
            );
            assert!(diff <= 1e-5 * scale.max(1.0), "{name} {chain}: {c}");
        }
    }
    // A snapshot whose weights do not fit its config is refused, naming the file, as is an unknown chain.
    let broken = d.join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(d.join("release").join(f), broken.join(f)).unwrap();
    }
    std::fs::copy(
        d.join("v5").join("model.safetensors"),
        broken.join("model.safetensors"),
    )
    .unwrap();
    let features = |net: &Path, chain: &str| {
        let mut cmd = radit();
        cmd.args(["eval", "features", "--store"])
            .arg(&store)
            .args(["--device", "cpu", "--preprocessing", chain, "--net"])
            .arg(net)
            .arg("--out")
            .arg(d.join("x.npy"));
        cmd
    };
    fails_with_usage(&mut features(&broken, "processor"), "model.safetensors");
    fails_with_usage(&mut features(&d.join("release"), "pil"), "pil");
}

#[test]
fn features_of_another_network_are_refused_by_training_and_by_fidelity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 48, "40x48", 8, &[]);
    let net = feature_net(d);
    // The same module at two input sides: two different feature spaces, and the files say so.
    let features = |size: &str, out: &str| {
        run_ok(
            radit()
                .args(["eval", "features", "--split", "train", "--device", "cpu"])
                .args(["--input-size", size, "--store"])
                .arg(&store)
                .arg("--net")
                .arg(&net)
                .arg("--out")
                .arg(d.join(out)),
        );
        d.join(out)
    };
    let at32 = features("32", "at32.npy");
    let at16 = features("16", "at16.npy");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("at16.json")).unwrap()).unwrap();
    assert!(meta["network"].as_str().unwrap().ends_with("@16"), "{meta}");
    fails_with_usage(
        radit()
            .args(["eval", "fidelity", "--real"])
            .arg(&at32)
            .arg("--fake")
            .arg(&at16),
        "at16.npy",
    );
    // Training's mini-FD with the network at 32 against the reference at 16: refused at start, naming the file.
    let config = d.join("train.toml");
    common::write_train_config(
        &config,
        &format!(
            r#"
[data]
url = "{}"
[model]
preset = "tiny"
[train]
steps = 2
global_batch = 4
[validation]
every = 0
[validation.fd]
every = 1
samples = 4
steps = 1
split = "train"
reference = "{}"
net = "{}"
input_size = 32
"#,
            store.display(),
            at16.display(),
            net.display()
        ),
    );
    let err = fails_with_usage(
        radit()
            .args(["train", "--threads", "1", "--config"])
            .arg(&config),
        "at16.npy",
    );
    assert!(err.contains("radit eval features"), "{err}");
}

/// The in-training FD is matched: the first K rows of the split, each sampled with its own profile and the noise
/// of its row, against those rows' real images. It equals the FD that `radit generate` on the same rows (the
/// exported EMA, the same Euler steps and seed), `eval features` and `eval fidelity` give. (A large step and an EMA
/// equal to the weights: the zero-initialised conditioning of a fresh model would make every profile alike.)
#[test]
fn the_in_training_fd_is_generate_on_the_first_k_rows_against_those_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 48, "40x48", 8, &[]);
    let net = feature_net(d);
    let config = d.join("train.toml");
    common::write_train_config(
        &config,
        &format!(
            r#"
[data]
url = "{}"
[model]
preset = "tiny"
[engine]
ema_decay = 0.0
[engine.adam]
lr = 0.01
[train]
steps = 2
global_batch = 4
[checkpoint]
url = "{}"
every = 2
[validation]
every = 0
[validation.fd]
every = 2
samples = 10
steps = 3
seed = 5
split = "train"
net = "{}"
input_size = 32
"#,
            store.display(),
            d.join("ckpt").display(),
            net.display()
        ),
    );
    let out = run_ok(
        radit()
            .args(["train", "--threads", "1", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1"),
    );
    let log = stderr(&out);
    let line = log
        .lines()
        .find(|l| l.contains("mini-FD") && !l.contains("reference"))
        .unwrap_or_else(|| panic!("no mini-FD line in: {log}"));
    let trained: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fd="))
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    let w = d.join("ema.safetensors");
    run_ok(
        radit()
            .arg("export")
            .arg(d.join("ckpt"))
            .arg("--out")
            .arg(&w),
    );
    let gen_dir = d.join("gen");
    run_ok(&mut generate_cmd(
        &w,
        &store,
        &gen_dir,
        &[
            "--split", "train", "--limit", "10", "--seed", "5", "--solver", "euler", "--steps", "3",
        ],
    ));
    let features = |source: &[&str], name: &str| tiny_features(&net, source, &d.join(name));
    let fake = features(&["--samples", gen_dir.to_str().unwrap()], "fake.npy");
    let ids: String = std::fs::read_to_string(d.join("fake.ids.txt")).unwrap();
    std::fs::write(d.join("first.ids"), &ids).unwrap();
    let real = features(
        &[
            "--store",
            store.to_str().unwrap(),
            "--split",
            "train",
            "--ids",
            d.join("first.ids").to_str().unwrap(),
        ],
        "real.npy",
    );
    let row = run_ok(
        radit()
            .args([
                "eval",
                "fidelity",
                "--kd-subset-size",
                "min",
                "--k",
                "3",
                "--real",
            ])
            .arg(&real)
            .arg("--fake")
            .arg(&fake),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&row)).unwrap();
    let offline = report["draws"][0]["fd"]
        .as_f64()
        .unwrap_or_else(|| panic!("{report}"));
    eprintln!("in training {trained}, offline {offline}");
    // The offline samples went through 16-bit PNGs, the in-training ones did not: 5e-6 apart when measured;
    // the same run sampling the all-missing profile instead is 1.5e-4 apart.
    assert!(
        (trained - offline).abs() <= 2e-5 * offline.abs(),
        "in training {trained}, offline {offline}"
    );
}

/// The reader study round trip: `prepare` writes N real and N generated images as 8-bit PNGs (round(v / 257))
/// under opaque names, a shuffled sheet per presentation and a sealed key; three simulated readers fill the sheets;
/// `score` agrees with scipy's binomial test and scikit-learn's Cohen's kappa; a changed key, an unanswered row and
/// a second study in the same folder are refused, naming the file.
#[test]
fn a_reader_study_is_prepared_filled_in_and_scored_as_scipy_and_scikit_learn_score_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 48, "40x48", 8, &[]);
    let w = tiny_weights(d);
    let samples = d.join("gen");
    run_ok(&mut generate_cmd(
        &w,
        &store,
        &samples,
        &[
            "--split", "train", "--limit", "9", "--solver", "euler", "--steps", "2",
        ],
    ));
    let study = d.join("study");
    let prepare = |out: &Path| {
        let mut cmd = radit();
        cmd.args([
            "eval",
            "reader-study",
            "prepare",
            "--split",
            "train",
            "--count",
            "8",
            "--seed",
            "3",
        ])
        .arg("--store")
        .arg(&store)
        .arg("--samples")
        .arg(&samples)
        .arg("--out")
        .arg(out);
        cmd
    };
    run_ok(&mut prepare(&study));
    let key_text = std::fs::read_to_string(study.join("sealed/key.csv")).unwrap();
    let key: Vec<(String, bool, String)> = key_text
        .lines()
        .skip(1)
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (c[0].to_string(), c[1] == "synthetic", c[2].to_string())
        })
        .collect();
    assert_eq!(key.len(), 16);
    assert_eq!(key.iter().filter(|k| k.1).count(), 8);
    // Opaque names: numbered in a shuffled order, so real and synthetic are mixed along the numbers.
    assert!(
        key.iter()
            .all(|k| k.0.starts_with("image-") && k.0.ends_with(".png"))
    );
    assert!(
        key[..8].iter().any(|k| k.1) && key[..8].iter().any(|k| !k.1),
        "{key_text}"
    );
    // A real image is the store's, each level v as round(v / 257).
    let reader = radit_sharding::reader::StoreReader::open(
        radit_sharding::store::Storage::open(store.to_str().unwrap()).unwrap(),
    )
    .unwrap();
    let train = reader
        .read_split(radit_sharding::split::Split::Train)
        .unwrap();
    let real = key.iter().find(|k| !k.1).unwrap();
    let id = real.2.strip_prefix("train:").unwrap();
    let row = train.image_ids.iter().position(|i| i == id).unwrap();
    let want: Vec<u8> = train.images[row * 256..(row + 1) * 256]
        .iter()
        .map(|&v| (f64::from(v) / 257.0).round() as u8)
        .collect();
    let decoder = png::Decoder::new(std::io::Cursor::new(
        std::fs::read(study.join("images").join(&real.0)).unwrap(),
    ));
    let mut png_reader = decoder.read_info().unwrap();
    let mut buf = vec![0; png_reader.output_buffer_size().unwrap()];
    let info = png_reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.bit_depth), (16, png::BitDepth::Eight));
    assert_eq!(&buf[..256], &want[..]);
    // Each presentation lists every image once, in its own order.
    let order = |p: u32| -> Vec<String> {
        std::fs::read_to_string(study.join(format!("presentation-{p}.csv")))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(3).unwrap().to_string())
            .collect()
    };
    let (one, two) = (order(1), order(2));
    let mut sorted = one.clone();
    sorted.sort();
    assert_eq!(sorted, key.iter().map(|k| k.0.clone()).collect::<Vec<_>>());
    assert_ne!(one, two);

    // Three readers: one right but for two images in the first presentation, one contrary to itself across the
    // presentations on every third image, one who says real to everything.
    let truth: BTreeMap<&str, bool> = key.iter().map(|k| (k.0.as_str(), k.1)).collect();
    let mut sheets = Vec::new();
    for (reader, rule) in [("alice", 0u8), ("bob", 1), ("carol", 2)] {
        for (p, names) in [(1u32, &one), (2, &two)] {
            let mut text = String::from("reader,presentation,position,image,answer\n");
            for (i, name) in names.iter().enumerate() {
                let t = truth[name.as_str()];
                let n: usize = name[6..9].parse().unwrap();
                let said = match rule {
                    0 => t ^ (p == 1 && n <= 2),
                    1 => t ^ (n.is_multiple_of(3) && p == 2) ^ n.is_multiple_of(5),
                    _ => false,
                };
                text += &format!(
                    "{reader},{p},{},{name},{}\n",
                    i + 1,
                    if said { "synthetic" } else { "Real" }
                );
            }
            let path = d.join(format!("{reader}-{p}.csv"));
            std::fs::write(&path, text).unwrap();
            sheets.push(path);
        }
    }
    let json = d.join("score.json");
    let out = run_ok(
        radit()
            .args(["eval", "reader-study", "score", "--study"])
            .arg(&study)
            .args(&sheets)
            .arg("--json")
            .arg(&json),
    );
    assert!(
        stdout(&out).contains("pairwise Cohen's kappa"),
        "{}",
        stdout(&out)
    );
    let ours: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let twin = run_ok(
        python()
            .arg(repo().join("tests/python/reader_study_twin.py"))
            .arg(&study)
            .args(&sheets),
    );
    let theirs: serde_json::Value = serde_json::from_str(&stdout(&twin)).unwrap();
    let close =
        |a: &serde_json::Value, b: &serde_json::Value, what: &str| match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => assert!(
                (x - y).abs() <= 1e-12 * y.abs().max(1.0),
                "{what}: {x} vs {y}"
            ),
            _ => assert!(a.is_null() && b.is_null(), "{what}: {a} vs {b}"),
        };
    for r in ours["readers"].as_array().unwrap() {
        let name = r["reader"].as_str().unwrap();
        let t = &theirs["readers"][name];
        for key in ["correct", "answered"] {
            assert_eq!(r["overall"][key], t["overall"][key], "{name} {key}");
        }
        close(&r["overall"]["p_value"], &t["overall"]["p_value"], name);
        for p in ["1", "2"] {
            assert_eq!(
                r["presentations"][p]["correct"],
                t["presentations"][p]["correct"]
            );
            close(
                &r["presentations"][p]["p_value"],
                &t["presentations"][p]["p_value"],
                name,
            );
        }
        close(
            &r["intra_rater"]["percent"],
            &t["intra_rater"]["percent"],
            name,
        );
        close(&r["intra_rater"]["kappa"], &t["intra_rater"]["kappa"], name);
    }
    let pairs = ours["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 6);
    for (a, b) in pairs.iter().zip(theirs["pairs"].as_array().unwrap()) {
        assert_eq!(a["readers"], b["readers"]);
        close(&a["kappa"], &b["kappa"], "pair");
    }
    assert_eq!(ours["readers"][0]["overall"]["correct"], 30);

    // An unanswered row, a changed key and a second study in the same folder: exit 2, naming the file.
    let blank = d.join("blank.csv");
    std::fs::write(
        &blank,
        std::fs::read_to_string(&sheets[0])
            .unwrap()
            .replacen(",synthetic\n", ",\n", 1)
            .replacen(",Real\n", ",\n", 1),
    )
    .unwrap();
    let score = |sheet: &Path| {
        let mut cmd = radit();
        cmd.args(["eval", "reader-study", "score", "--study"])
            .arg(&study)
            .arg(sheet);
        cmd
    };
    let err = fails_with_usage(&mut score(&blank), "blank.csv");
    assert!(err.contains("no answer"), "{err}");
    std::fs::write(
        study.join("sealed/key.csv"),
        key_text.replacen("real", "synthetic", 1),
    )
    .unwrap();
    fails_with_usage(&mut score(&sheets[0]), "key.csv");
    fails_with_usage(&mut prepare(&study), "already holds a reader study");
}

/// The Rad-DINO perceptual distance against the design note's formula on transformers' model (the twin): the
/// distance per sample and its gradient with respect to the second image agree to fp32 relative 1e-5.
#[test]
fn the_perceptual_distance_and_its_gradient_match_the_transformers_twin() {
    use radit_models::features::{LayerReduce, PerceptualDistance};
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, out) = (
        dir.path().join("net"),
        dir.path().join("perceptual.safetensors"),
    );
    let twin = repo().join("tests/python/dinov2_twin.py");
    run_ok(
        python()
            .arg(&twin)
            .arg("make")
            .arg(&snapshot)
            .args(["84", "release", "7"]),
    );
    run_ok(
        python()
            .arg(&twin)
            .arg("perceptual")
            .arg(&snapshot)
            .arg(&out),
    );
    let want = common::read_tensors(&out);
    let d = PerceptualDistance::load(&snapshot, LayerReduce::Sum, radit_models::tch::Device::Cpu)
        .unwrap();
    let y = want["y"].copy().set_requires_grad(true);
    let got = d.distance(&want["x"], &y).unwrap();
    let err = common::relative_error(&got, &want["distance"]);
    assert!(
        err <= 1e-5,
        "distance differs by {err:e}: {got} vs {}",
        want["distance"]
    );
    let grad = radit_models::tch::Tensor::run_backward(
        &[&got.sum(radit_models::tch::Kind::Float)],
        &[&y],
        false,
        false,
    );
    let err = common::relative_error(&grad[0], &want["grad_y"]);
    assert!(err <= 1e-5, "gradient differs by {err:e}");
    // The same image is at distance 0; a wrong shape is an error naming both.
    let zero = d.distance(&want["x"], &want["x"]).unwrap();
    assert_eq!(zero.abs().max().double_value(&[]), 0.0);
    let e = d
        .distance(&want["x"], &want["x"].narrow(2, 0, 8))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("expected two [batch, 1, H, W] of one shape"),
        "{e}"
    );
    let mean =
        PerceptualDistance::load(&snapshot, LayerReduce::Mean, radit_models::tch::Device::Cpu)
            .unwrap()
            .distance(&want["x"], &want["y"])
            .unwrap();
    assert!(
        common::relative_error(&(mean * 2.0), &want["distance"]) <= 1e-5,
        "two layers, averaged"
    );
}

/// The attention-pooling metadata predictor against the design note's formula on transformers' model (the twin):
/// every head's outputs and the per-task pooled embeddings agree to fp32 relative 1e-5, with every parameter of
/// the head random (its LayerNorm included).
#[test]
fn the_attention_pooling_predictor_matches_the_transformers_twin() {
    use radit_models::predictor::{Predictor, PredictorConfig, Variant};
    use radit_models::tch::{Device, Kind, nn::VarStore};
    let dir = tempfile::tempdir().unwrap();
    let (snapshot, weights, out) = (
        dir.path().join("net"),
        dir.path().join("predictor.safetensors"),
        dir.path().join("predictor-twin.safetensors"),
    );
    let twin = repo().join("tests/python/dinov2_twin.py");
    run_ok(
        python()
            .arg(&twin)
            .arg("make")
            .arg(&snapshot)
            .args(["84", "release", "7"]),
    );
    let mut cfg = PredictorConfig::new(Variant::AttentionPool, Some(snapshot.clone()), 40);
    cfg.layers = vec![2, 1];
    let vs = VarStore::new(Device::Cpu);
    let net = Predictor::new(&vs.root(), &cfg).unwrap();
    radit_models::tch::manual_seed(11);
    radit_models::tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let noise = v.randn_like() * 0.2;
            let _ = v.g_add_(&noise);
        }
    });
    let arch = radit_models::network::Architecture::Predictor(cfg);
    arch.save_trained(&vs.variables().into_iter().collect(), &[], &weights)
        .unwrap();
    run_ok(
        python()
            .arg(&twin)
            .arg("predictor")
            .arg(&snapshot)
            .arg(&weights)
            .arg(&out),
    );
    let want = common::read_tensors(&out);
    let got = net.predict(&want["x"], None).unwrap();
    let err = common::relative_error(&got.outputs, &want["outputs"]);
    assert!(err <= 1e-5, "outputs differ by {err:e}");
    let e = got.embeddings.unwrap();
    let err = common::relative_error(&e, &want["embeddings"]);
    assert!(err <= 1e-5, "embeddings differ by {err:e}");
    assert_eq!(got.outputs.kind(), Kind::Float);
}

/// The ResNet predictor's trunk against torchvision's own ResNet in eval mode (Bottleneck, one block per stage,
/// every batch norm's affine and running statistics random): torchvision's state dict loads strictly and the
/// pooled features agree to fp32 relative 1e-5.
#[test]
fn the_resnet_trunk_loads_torchvision_weights_and_matches_its_features() {
    use radit_models::predictor::resnet::ResNet;
    use radit_models::tch::{Device, nn::VarStore};
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        python()
            .arg(repo().join("tests/python/resnet_twin.py"))
            .arg("make")
            .arg(dir.path())
            .arg("1,1,1,1"),
    );
    let vs = VarStore::new(Device::Cpu);
    let mut net = ResNet::new(&vs.root(), [1, 1, 1, 1], 64);
    net.load(&dir.path().join("resnet.safetensors")).unwrap();
    let x = common::read_tensors(&dir.path().join("x.safetensors"));
    let want = common::read_tensors(&dir.path().join("features.safetensors"));
    let got = radit_models::tch::no_grad(|| net.forward(&x["x"]));
    let err = common::relative_error(&got, &want["features"]);
    assert!(err <= 1e-5, "features differ by {err:e}");
    assert_eq!(net.features, 2048);
}

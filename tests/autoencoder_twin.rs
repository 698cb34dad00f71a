//! The FLUX.2 autoencoder against its PyTorch twin (tests/python/flux2_ae_twin.py, written from latents.md): the
//! full-size parameter count, and on a tiny config of the same topology the encoder mean, the decoded image and every
//! gradient agree to fp32 relative error 1e-5; the twin's weights load under both namings users have (the original
//! release's and diffusers'); loading is strict (a missing tensor, a wrong shape and a stray tensor are named, and
//! nothing is changed); `radit vae info` checks a weights file. The decoder fine-tune (LoRA branches, the RGB head
//! in full, the merge into a plain decoder) agrees with the twin's peft-style LoRA on outputs and gradients.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{fails_with_usage, python, radit, read_tensors, relative_error, repo, run_ok, stdout};
use radit_models::autoencoder::{self, AeConfig, Autoencoder};
use radit_models::tch::{Device, Tensor, nn::VarStore};

fn twin(args: &[&str], dir: Option<&Path>) -> std::process::Output {
    let mut cmd = python();
    cmd.arg(repo().join("tests/python/flux2_ae_twin.py"))
        .args(args);
    if let Some(d) = dir {
        cmd.arg(d);
    }
    run_ok(&mut cmd)
}

/// The tiny autoencoder with the weights of `file` under `dir`.
fn loaded(dir: &Path, file: &str) -> (VarStore, Autoencoder) {
    let vs = VarStore::new(Device::Cpu);
    let ae = Autoencoder::new(&vs.root(), &AeConfig::tiny().into()).unwrap();
    autoencoder::load(&vs, &AeConfig::tiny().into(), &dir.join(file)).unwrap();
    (vs, ae)
}

fn snapshot(vs: &VarStore) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

#[test]
fn the_full_size_count_matches_the_twin_and_the_closed_form() {
    let out = twin(&["count"], None);
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (e, d, q) = AeConfig::flux2().parameter_counts();
    assert_eq!(counts["encoder"], e);
    assert_eq!(counts["decoder"], d);
    assert_eq!(counts["total"], 84_046_115);
    assert_eq!(e + d + q, 84_046_115);
}

#[test]
fn encoder_mean_decoder_output_and_gradients_match_the_twin_under_both_namings() {
    let dir = tempfile::tempdir().unwrap();
    twin(&["reference"], Some(dir.path()));
    let io = read_tensors(&dir.path().join("io.safetensors"));
    let (vs, ae) = loaded(dir.path(), "weights_bfl.safetensors");

    let x = io["x"].detach().set_requires_grad(true);
    let mean = ae.encode_mean(&x).unwrap();
    let decoded = ae.decode(&io["z"]).unwrap();
    for (name, got) in [("mean", &mean), ("decoded", &decoded)] {
        let err = relative_error(got, &io[name]);
        assert!(err <= 1e-5, "{name}: relative error {err:e}");
    }
    let loss = mean.square().mean(None) + decoded.square().mean(None);
    loss.backward();
    let mut checked = 0;
    for (name, var) in vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.requires_grad())
    {
        let want = &io[&format!("grad.{name}")];
        let got = var.grad();
        // The attention's key bias has no effect (a constant added to every score of a query), so its gradient is
        // round-off in both: compared absolutely.
        if want.norm().double_value(&[]) < 1e-6 {
            let diff = (&got - want).norm().double_value(&[]);
            assert!(
                diff < 1e-6,
                "grad of {name}: {diff:e} from the twin's near-zero gradient"
            );
        } else {
            let err = relative_error(&got, want);
            assert!(err <= 1e-5, "grad of {name}: relative error {err:e}");
        }
        checked += 1;
    }
    let err = relative_error(&x.grad(), &io["grad.x"]);
    assert!(err <= 1e-5, "grad of x: relative error {err:e}");
    assert_eq!(checked, vs.trainable_variables().len());

    // The same weights in diffusers' naming (linear attention weights, decoder levels counted the other way).
    let (other, _) = loaded(dir.path(), "weights_diffusers.safetensors");
    let (a, b) = (snapshot(&vs), snapshot(&other));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs between the namings");
    }
}

/// The decoder fine-tune against the twin's peft-style LoRA: on the twin's tiny weights (frozen), with LoRA updates
/// moved off zero and the RGB head changed, the reconstruction through the frozen encoder's mean, the L1 loss's
/// gradient of every trained tensor, and the merged plain decoder's reconstruction agree to fp32 relative 1e-5.
#[test]
fn the_decoder_finetune_its_gradients_and_its_merge_match_the_twins_lora() {
    use radit_models::autoencoder::finetune::{DecoderFinetune, FinetuneConfig, save_merged};
    use radit_models::lora::LoraConfig;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    twin(&["reference"], Some(d));
    let cfg = FinetuneConfig {
        base: d.join("weights_bfl.safetensors"),
        image_size: 16,
        lora: Some(LoraConfig {
            rank: 2,
            alpha: 3.0,
            targets: vec![
                "decoder.conv_in".into(),
                "decoder.mid.attn_1.*".into(),
                "decoder.up.*.block.1.conv2".into(),
                "decoder.up.1.upsample.conv".into(),
            ],
        }),
        full: vec!["decoder.norm_out".into(), "decoder.conv_out".into()],
        grey: Default::default(),
    };
    radit_models::tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let ft = DecoderFinetune::new(&vs.root(), &cfg).unwrap();
    // Off the starting point, so every branch matters.
    radit_models::tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            let _ = t.g_add_(&(Tensor::randn_like(&t) * 0.1));
        }
    });
    let trained = snapshot(&vs);
    let list: Vec<(&str, &Tensor)> = trained.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&list, d.join("lora.safetensors")).unwrap();
    std::fs::write(d.join("lora.json"), format!("{{\"scale\": {}}}", 3.0 / 2.0)).unwrap();
    twin(&["lora"], Some(d));
    let want = read_tensors(&d.join("lora_out.safetensors"));
    let x = &read_tensors(&d.join("io.safetensors"))["x"];
    let rec = ft.reconstruct(x);
    let err = relative_error(&rec, &want["reconstruction"]);
    assert!(err <= 1e-5, "reconstruction: relative error {err:e}");
    let loss = (&rec - x).abs().mean(None);
    loss.backward();
    assert_eq!(trained.len(), 2 * 8 + 4);
    for (name, var) in vs.variables() {
        let err = relative_error(&var.grad(), &want[&format!("grad.{name}")]);
        assert!(err <= 1e-5, "grad of {name}: relative error {err:e}");
    }
    let merged = d.join("merged.safetensors");
    save_merged(&cfg, &trained, &[], &merged).unwrap();
    let (_vs, plain) = loaded(d, "merged.safetensors");
    let again =
        radit_models::tch::no_grad(|| plain.decode(&plain.encode_mean(x).unwrap())).unwrap();
    let err = relative_error(&again, &want["merged_reconstruction"]);
    assert!(err <= 1e-5, "merged reconstruction: relative error {err:e}");
}

#[test]
fn loading_is_strict_and_names_what_does_not_match() {
    let dir = tempfile::tempdir().unwrap();
    twin(&["reference"], Some(dir.path()));
    let good = || read_tensors(&dir.path().join("weights_bfl.safetensors"));
    let write = |name: &str, tensors: &BTreeMap<String, Tensor>| {
        let path = dir.path().join(name);
        let list: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&list, &path).unwrap();
        path
    };
    let mut missing = good();
    missing.remove("decoder.up.1.upsample.conv.weight");
    let mut misshapen = good();
    misshapen.insert(
        "encoder.conv_in.weight".into(),
        Tensor::zeros([16, 3, 1, 1], (radit_models::tch::Kind::Float, Device::Cpu)),
    );
    let mut stray = good();
    stray.insert(
        "encoder.extra.weight".into(),
        Tensor::ones([1], (radit_models::tch::Kind::Float, Device::Cpu)),
    );
    let cases = [
        (
            write("missing.safetensors", &missing),
            "decoder.up.1.upsample.conv.weight",
        ),
        (
            write("misshapen.safetensors", &misshapen),
            "encoder.conv_in.weight has shape [16, 3, 1, 1]",
        ),
        (write("stray.safetensors", &stray), "encoder.extra.weight"),
    ];
    let vs = VarStore::new(Device::Cpu);
    let _ae = Autoencoder::new(&vs.root(), &AeConfig::tiny().into()).unwrap();
    let before = snapshot(&vs);
    for (path, needle) in &cases {
        let e = autoencoder::load(&vs, &AeConfig::tiny().into(), path)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{needle}: {e}");
        assert!(
            e.contains(path.file_name().unwrap().to_str().unwrap()),
            "{e}"
        );
        for (name, t) in snapshot(&vs) {
            assert!(t.equal(&before[&name]), "{name} changed by a refused load");
        }
    }

    // Through the binary: a good file under either naming is accepted, a bad one is bad input (exit 2).
    for file in ["weights_bfl.safetensors", "weights_diffusers.safetensors"] {
        let out = run_ok(
            radit()
                .args(["vae", "info", "tiny", "--image-size", "16", "--weights"])
                .arg(dir.path().join(file)),
        );
        assert!(stdout(&out).contains("latent 4x8x8"), "{}", stdout(&out));
    }
    fails_with_usage(
        radit()
            .args(["vae", "info", "tiny", "--weights"])
            .arg(&cases[0].0),
        "decoder.up.1.upsample.conv.weight",
    );
}

/// The 16-bit PNG at `path` as samples.
fn png_samples(path: &Path) -> Vec<u16> {
    let (img, _) = radit_sharding::image::decode_png(&std::fs::read(path).unwrap()).unwrap();
    img.pixels
}

#[test]
fn radit_decode_turns_latents_into_the_twins_images_and_undoes_the_stores_standardisation() {
    let dir = tempfile::tempdir().unwrap();
    twin(&["reference"], Some(dir.path()));
    let io = read_tensors(&dir.path().join("io.safetensors"));
    let latents = dir.path().join("latents.safetensors");
    Tensor::write_safetensors(&[("latents", &io["z"])], &latents).unwrap();
    let decode = |out: &Path, extra: &[&str]| {
        run_ok(
            radit()
                .args([
                    "decode",
                    "--autoencoder",
                    "tiny",
                    "--device",
                    "cpu",
                    "--decode-batch",
                    "1",
                ])
                .args(extra)
                .arg("--latents")
                .arg(&latents)
                .arg("--decoder")
                .arg(dir.path().join("weights_diffusers.safetensors"))
                .arg("--out")
                .arg(out),
        )
    };
    let plain = dir.path().join("plain");
    let out = decode(&plain, &[]);
    assert!(
        stdout(&out).contains("decoded 2 latents (as they are)"),
        "{}",
        stdout(&out)
    );
    assert!(plain.join("contact_sheet.png").exists());
    for i in 0..2 {
        let want = radit_jobs::generate::to_u16(&io["decoded"].get(i)).unwrap();
        let got = png_samples(&plain.join(format!("decoded_{i:04}.png")));
        let worst = radit_dicom::fixture::max_difference(&got, &want).expect("16x16 images");
        assert!(
            worst <= 1,
            "image {i}: {worst} levels from the twin's decoding"
        );
    }

    // A store whose training latents carry channel statistics: the latents are de-standardised before decoding.
    let store = common::tiny_store(dir.path(), 12, "16x16", 4, &[]);
    run_ok(
        python()
            .arg(repo().join("tests/python/write_latents.py"))
            .arg("--store")
            .arg(&store)
            .args(["--channels", "4", "--size", "8"]),
    );
    let reader = radit_sharding::reader::StoreReader::open(
        radit_sharding::store::Storage::open_existing(store.to_str().unwrap()).unwrap(),
    )
    .unwrap();
    let latents = reader
        .latents(radit_sharding::split::Split::Train)
        .unwrap()
        .unwrap();
    let (mean, std) = (latents.channel_mean, latents.channel_std);
    let scaled = dir.path().join("scaled");
    decode(&scaled, &["--store", store.to_str().unwrap()]);
    let (_vs, ae) = loaded(dir.path(), "weights_bfl.safetensors");
    let shape = [1, 4, 1, 1];
    let z = &io["z"] * Tensor::from_slice(&std).view(shape) + Tensor::from_slice(&mean).view(shape);
    let want = radit_models::tch::no_grad(|| ae.decode(&z)).unwrap();
    for i in 0..2 {
        let want = radit_jobs::generate::to_u16(&want.get(i)).unwrap();
        let got = png_samples(&scaled.join(format!("decoded_{i:04}.png")));
        let worst = radit_dicom::fixture::max_difference(&got, &want).expect("16x16 images");
        assert!(
            worst <= 1,
            "image {i}: {worst} levels from decoding the de-standardised latents"
        );
    }

    // Latents of another width than the decoder's are bad input, named.
    let wrong = dir.path().join("wrong.safetensors");
    Tensor::write_safetensors(
        &[(
            "latents",
            &Tensor::zeros([1, 3, 8, 8], radit_models::tch::kind::FLOAT_CPU),
        )],
        &wrong,
    )
    .unwrap();
    fails_with_usage(
        radit()
            .args([
                "decode",
                "--autoencoder",
                "tiny",
                "--device",
                "cpu",
                "--latents",
            ])
            .arg(&wrong)
            .arg("--decoder")
            .arg(dir.path().join("weights_bfl.safetensors"))
            .arg("--out")
            .arg(dir.path().join("bad")),
        "[batch, 4, H, W]",
    );
}

#[test]
fn radit_sample_on_a_latent_preset_decodes_its_samples_with_a_given_decoder() {
    let dir = tempfile::tempdir().unwrap();
    twin(&["reference"], Some(dir.path()));
    let weights = dir.path().join("tiny-latent.safetensors");
    run_ok(
        radit()
            .args(["model", "init", "tiny-latent", "--out"])
            .arg(&weights),
    );
    let out = dir.path().join("samples");
    let sample = |decoder: &str, weights: &Path| {
        let mut cmd = radit();
        cmd.args([
            "sample", "-n", "2", "--solver", "euler", "--steps", "2", "--device", "cpu",
        ])
        .args(["--autoencoder", "tiny", "--weights"])
        .arg(weights)
        .arg("--decoder")
        .arg(dir.path().join(decoder))
        .arg("--out")
        .arg(&out);
        cmd
    };
    run_ok(&mut sample("weights_bfl.safetensors", &weights));
    for i in 0..2 {
        let pixels = png_samples(&out.join(format!("decoded_{i:04}.png")));
        assert_eq!(
            pixels.len(),
            16 * 16,
            "tiny-latent's 4x8x8 latents decode to 16x16"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("samples.json")).unwrap()).unwrap();
    let files = report["files"].to_string();
    assert!(
        files.contains("latents.safetensors") && files.contains("decoded_0001.png"),
        "{files}"
    );

    // A pixel model has nothing to decode.
    let pixel = dir.path().join("tiny.safetensors");
    run_ok(radit().args(["model", "init", "tiny", "--out"]).arg(&pixel));
    fails_with_usage(
        &mut sample("weights_bfl.safetensors", &pixel),
        "--decoder is for latent models",
    );
}

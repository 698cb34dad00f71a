//! `radit model info|init` and `radit sample` (generation and counterfactual editing) end to end.

mod common;

use std::path::Path;

use common::{radit, run_ok, stderr, stdout};

fn decode(path: &Path) -> (png::OutputInfo, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info, buf)
}

#[test]
fn model_info_prints_the_spec_sizes() {
    for (preset, params) in [
        ("b-pixel", 307_539_520u64),
        ("b-latent", 307_277_248),
        ("xl-latent", 1_370_482_816),
    ] {
        let out = run_ok(radit().args(["model", "info", preset, "--world", "32", "--json"]));
        let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(v["parameters"].as_u64(), Some(params), "{preset}");
        assert_eq!(v["tokens_per_sample"].as_u64(), Some(1024));
        assert!(v["fsdp_bytes_per_gpu"].as_f64() < v["ddp_bytes_per_gpu"].as_f64());
    }
    let text = stdout(&run_ok(radit().args(["model", "info", "xl-latent"])));
    assert!(
        text.contains("1370482816") && text.contains("2.014 G forward"),
        "{text}"
    );
    let out = radit().args(["model", "info", "xxl"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown model preset `xxl`"));
}

#[test]
fn sample_writes_16_bit_pngs_a_contact_sheet_and_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("tiny.safetensors");
    run_ok(
        radit()
            .args(["model", "init", "tiny", "--seed", "1", "--out"])
            .arg(&weights),
    );
    let out_dir = tmp.path().join("samples");
    let out = run_ok(
        radit()
            .args(["sample", "--weights"])
            .arg(&weights)
            .arg("--out")
            .arg(&out_dir)
            .args([
                "-n",
                "5",
                "--batch",
                "2",
                "--set",
                "sex=Female,view=PA,cardiomegaly=positive",
            ])
            .args(["--age", "63", "--solver", "euler", "--steps", "4"]),
    );
    assert!(
        stdout(&out).contains("cardiomegaly=positive,sex=Female,view=PA,age=63"),
        "{}",
        stdout(&out)
    );
    for i in 0..5 {
        let (info, data) = decode(&out_dir.join(format!("sample_{i:04}.png")));
        assert_eq!((info.width, info.height), (16, 16));
        assert_eq!(info.bit_depth, png::BitDepth::Sixteen);
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        assert!(data.iter().any(|&b| b != data[0]), "sample {i} is constant");
    }
    let (sheet, _) = decode(&out_dir.join("contact_sheet.png"));
    assert_eq!(sheet.bit_depth, png::BitDepth::Eight);
    // 5 tiles of 16 in 3 columns, enlarged 11x (176) to fill 512, under a two-line title (24) and over three
    // caption lines (32) per row, with 4-pixel gaps.
    assert_eq!(
        (sheet.width, sheet.height),
        (3 * 176 + 4 * 4, 24 + 2 * (176 + 32) + 3 * 4)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("samples.json")).unwrap()).unwrap();
    assert_eq!(report["files"].as_array().unwrap().len(), 5);
    assert_eq!(
        report["solves"].as_array().unwrap().len(),
        3,
        "5 samples in batches of 2"
    );

    // Sample i depends on (seed, i) only: one batch of 5 gives the same images.
    let again = tmp.path().join("again");
    run_ok(
        radit()
            .args(["sample", "--weights"])
            .arg(&weights)
            .arg("--out")
            .arg(&again)
            .args([
                "-n",
                "5",
                "--batch",
                "5",
                "--set",
                "sex=Female,view=PA,cardiomegaly=positive",
            ])
            .args(["--age", "63", "--solver", "euler", "--steps", "4"]),
    );
    for i in 0..5 {
        let name = format!("sample_{i:04}.png");
        assert_eq!(
            decode(&out_dir.join(&name)).1,
            decode(&again.join(&name)).1,
            "{name}"
        );
    }
}

#[test]
fn sample_edits_images_counterfactually() {
    let tmp = tempfile::tempdir().unwrap();
    // Weights from the PyTorch twin with every layer active, so the metadata changes the velocity.
    let weights_dir = tmp.path().join("twin");
    let mut twin = common::python();
    twin.arg(common::repo().join("tests/python/radit_twin.py"))
        .args(["export", "--preset", "tiny", "--perturb", "--out"])
        .arg(&weights_dir);
    run_ok(&mut twin);
    let (_, images) = common::synth(&tmp.path().join("data"), 2, "40x48", &[]);
    let table = std::fs::read_to_string(tmp.path().join("data/table.csv")).unwrap();
    let path_column = table
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "path")
        .unwrap();
    let inputs: Vec<_> = table
        .lines()
        .skip(1)
        .map(|l| images.join(l.split(',').nth(path_column).unwrap()))
        .collect();
    assert_eq!(inputs.len(), 2);
    // `radit sample --edit` of the inputs from (cardiomegaly negative, male, 40) to `set` at `age`, into `out`.
    let edit = |out: &Path, set: &str, age: &str| {
        run_ok(
            radit()
                .args(["sample", "--weights"])
                .arg(weights_dir.join("weights.safetensors"))
                .arg("--out")
                .arg(out)
                .arg("--edit")
                .args(&inputs)
                .args([
                    "--from",
                    "cardiomegaly=negative,sex=Male",
                    "--from-age",
                    "40",
                ])
                .args(["--set", set, "--age", age]),
        )
    };
    let out_dir = tmp.path().join("edits");
    let out = edit(&out_dir, "cardiomegaly=positive,sex=Male", "70");
    assert!(
        stdout(&out).contains("edited 2 image(s)"),
        "{}",
        stdout(&out)
    );
    for i in 0..2 {
        let (info, original) = decode(&out_dir.join(format!("original_{i:04}.png")));
        let (_, edited) = decode(&out_dir.join(format!("edited_{i:04}.png")));
        assert_eq!(
            (info.width, info.height, info.bit_depth),
            (16, 16, png::BitDepth::Sixteen)
        );
        assert_ne!(original, edited, "the edit changed image {i}");
    }
    // An edit to the image's own metadata gives the image back (abduction and prediction under the same
    // conditioning cancel), which a swap of --from and --set, or either one ignored, would break.
    let same = tmp.path().join("same");
    edit(&same, "cardiomegaly=negative,sex=Male", "40");
    for i in 0..2 {
        let (_, original) = decode(&same.join(format!("original_{i:04}.png")));
        let (_, edited) = decode(&same.join(format!("edited_{i:04}.png")));
        let levels = |b: &[u8]| -> Vec<u16> {
            b.chunks(2)
                .map(|p| u16::from_be_bytes([p[0], p[1]]))
                .collect()
        };
        let worst = levels(&original)
            .iter()
            .zip(&levels(&edited))
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        eprintln!("identity edit {i}: at most {worst} levels off");
        assert!(
            worst <= 2,
            "the identity edit moved image {i} by {worst} levels"
        );
    }
    let (sheet, _) = decode(&out_dir.join("contact_sheet.png"));
    assert_eq!(
        (sheet.width, sheet.height),
        (3 * 176 + 4 * 4, 24 + 2 * (176 + 32) + 3 * 4),
        "rows of (original, edited, difference)"
    );

    // Wrong names are user errors naming the variable; nothing is written.
    let out = radit()
        .args(["sample", "--weights"])
        .arg(weights_dir.join("weights.safetensors"))
        .arg("--out")
        .arg(tmp.path().join("bad"))
        .args(["--set", "heart=big"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown variable `heart`"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("bad").exists());
    // A preset that disagrees with the file's own config is refused.
    let out = radit()
        .args(["sample", "--preset", "b-pixel", "--weights"])
        .arg(weights_dir.join("weights.safetensors"))
        .arg("--out")
        .arg(tmp.path().join("bad"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not the `b-pixel` preset"),
        "{}",
        stderr(&out)
    );
}

/// `radit decode` of latents that are not square (its help allows any [N, C, H, W]) writes images of that shape,
/// and latents of another rank are named with their file: exit 2, never a panic.
#[test]
fn decode_writes_non_square_images_and_names_latents_of_the_wrong_rank() {
    use radit_models::tch::{Kind, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let ae = dir.path().join("ae.safetensors");
    run_ok(radit().args(["vae", "init", "tiny", "--out"]).arg(&ae));
    let latents = dir.path().join("wide.safetensors");
    let z = Tensor::randn(
        [1, 4, 16, 32],
        (Kind::Float, radit_models::tch::Device::Cpu),
    );
    Tensor::write_safetensors(&[("latents", &z)], &latents).unwrap();
    let out = dir.path().join("decoded");
    let run = |latents: &Path| {
        radit()
            .args(["decode", "--device", "cpu", "--latents"])
            .arg(latents)
            .arg("--decoder")
            .arg(&ae)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let done = run(&latents);
    assert!(done.status.success(), "{}", stderr(&done));
    let (info, _) = decode(&out.join("decoded_0000.png"));
    assert_eq!(
        (info.width, info.height),
        (64, 32),
        "the tiny decoder's 2x, wide"
    );
    assert!(out.join("contact_sheet.png").exists());

    let flat = dir.path().join("flat.safetensors");
    Tensor::write_safetensors(&[("latents", &z.get(0))], &flat).unwrap();
    let failed = run(&flat);
    let err = stderr(&failed);
    assert_eq!(failed.status.code(), Some(2), "{err}");
    assert!(
        err.contains("flat.safetensors") && err.contains("[N, C, H, W]"),
        "{err}"
    );
}

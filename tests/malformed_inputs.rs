//! No input ever panics: every subcommand that reads a file is given malformed files of each kind it accepts (empty,
//! truncated, not its format, wrong shapes, wrong dtypes, missing keys, another model's file) and must exit 2 with a
//! message that names the file, never 101 (`shard --verify`: 1, its verdict). All cases run, then every miss is
//! reported at once. Non-square latents are not malformed: `radit decode` writes them (tests/sample_cli.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{radit, run_ok, stderr};
use radit_models::tch::{Kind, Tensor};

/// The malformed files, written once.
struct Inputs {
    dir: PathBuf,
}

impl Inputs {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    common::read_tensors(path).into_iter().collect()
}

fn write_tensors(path: &Path, list: &[(String, Tensor)]) -> PathBuf {
    Tensor::write_safetensors(list, path).unwrap();
    path.to_path_buf()
}

fn make_inputs(dir: &Path) -> Inputs {
    let i = Inputs {
        dir: dir.to_path_buf(),
    };
    let tiny = i.path("tiny.safetensors");
    run_ok(radit().args(["model", "init", "tiny", "--out"]).arg(&tiny));
    let good = std::fs::read(&tiny).unwrap();
    i.write("empty.safetensors", b"");
    i.write(
        "garbage.safetensors",
        b"\x89PNG this is not a safetensors file at all",
    );
    i.write("truncated.safetensors", &good[..good.len() / 2]);
    // A header length that claims far more than the file holds.
    let mut huge = (1u64 << 40).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    i.write("huge_header.safetensors", &huge);
    let list = tensors(&tiny);
    let (first, _) = &list[0];
    let missing: Vec<_> = list[1..]
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    write_tensors(&i.path("missing_key.safetensors"), &missing);
    let reshaped: Vec<_> = list
        .iter()
        .map(|(n, t)| {
            let t = if n == first {
                t.flatten(0, -1).narrow(0, 0, 1)
            } else {
                t.shallow_clone()
            };
            (n.clone(), t)
        })
        .collect();
    write_tensors(&i.path("wrong_shape.safetensors"), &reshaped);
    let ints: Vec<_> = list
        .iter()
        .map(|(n, t)| (n.clone(), t.to_kind(Kind::Int)))
        .collect();
    write_tensors(&i.path("wrong_dtype.safetensors"), &ints);
    // Another model's file: the random DINOv2 snapshot's weights.
    let dino = i.path("dino");
    run_ok(radit().args(["eval", "random-dinov2", "--out"]).arg(&dino));
    std::fs::copy(dino.join("model.safetensors"), i.path("dinov2.safetensors")).unwrap();
    // Latents: non-square (which decode writes), wrong rank, wrong dtype, the wrong key.
    let z = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, radit_models::tch::Device::Cpu));
    write_tensors(
        &i.path("latents_rank3.safetensors"),
        &[("latents".into(), z(&[4, 8, 8]))],
    );
    write_tensors(
        &i.path("latents_int.safetensors"),
        &[("latents".into(), z(&[1, 32, 8, 8]).to_kind(Kind::Int))],
    );
    write_tensors(
        &i.path("latents_key.safetensors"),
        &[("samples".into(), z(&[1, 32, 8, 8]))],
    );
    write_tensors(
        &i.path("latents_channels.safetensors"),
        &[("latents".into(), z(&[1, 5, 8, 8]))],
    );
    // Feature files (.npy): one matrix each, or not.
    let npy = |name: &str, t: Tensor| t.write_npy(i.path(name)).unwrap();
    npy("features_1d.npy", z(&[16]));
    npy("features_8.npy", z(&[16, 8]));
    npy("features_9.npy", z(&[16, 9]));
    npy("features_int.npy", z(&[16, 8]).to_kind(Kind::Int));
    i.write("empty.npy", b"");
    i.write(
        "truncated.npy",
        &std::fs::read(i.path("features_8.npy")).unwrap()[..100],
    );
    // A tiny autoencoder, a tiny store and an SCM trained on it for two steps: the good inputs beside the bad.
    run_ok(
        radit()
            .args(["vae", "init", "tiny", "--out"])
            .arg(i.path("vae.safetensors")),
    );
    let store = common::tiny_store(&i.path("data"), 16, "40x48", 8, &[]);
    std::fs::rename(&store, i.path("store")).unwrap();
    run_ok(
        radit()
            .args(["scm", "train", "--steps", "2", "--store"])
            .arg(i.path("store"))
            .arg("--out")
            .arg(i.path("scm.safetensors")),
    );
    // Text inputs.
    i.write("empty.toml", b"");
    i.write("garbage.toml", b"\x00\x01\x02 [[[ not toml");
    i.write("wrong_type.toml", b"[train]\nsteps = \"many\"\n");
    i.write("unknown_section.toml", b"[trian]\nsteps = 3\n");
    i.write("empty.csv", b"");
    i.write("garbage.csv", b"\xff\xfe\x00\x00binary");
    i.write("wrong_columns.csv", b"a,b,c\n1,2,3\n");
    i.write("truncated.png", &{
        let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
        b.extend_from_slice(&[0, 0, 0, 13]);
        b
    });
    i.write("empty.png", b"");
    std::fs::create_dir_all(i.path("not_a_store")).unwrap();
    std::fs::create_dir_all(i.path("bad_store")).unwrap();
    i.write("bad_store/zarr.json", b"{ not json");
    std::fs::create_dir_all(i.path("bad_checkpoint")).unwrap();
    i.write("bad_checkpoint/latest", b"\x00\x00garbage");
    i
}

/// One command and the input it must name.
struct Case {
    what: String,
    cmd: Command,
    names: String,
    /// 2 (bad input), or 1 for `shard --verify`, whose verdict on a store is its result (README: exit codes).
    code: i32,
}

fn case(what: &str, names: &Path, build: impl FnOnce(&mut Command)) -> Case {
    let mut cmd = radit();
    build(&mut cmd);
    Case {
        what: what.to_string(),
        cmd,
        names: names.file_name().unwrap().to_string_lossy().into_owned(),
        code: 2,
    }
}

/// Runs every case (two at a time) and returns a line for each that did not exit 2 naming its input.
fn misses(cases: Vec<Case>) -> Vec<String> {
    let mut out = Vec::new();
    let mut cases = cases.into_iter().peekable();
    while cases.peek().is_some() {
        let batch: Vec<Case> = cases.by_ref().take(2).collect();
        let handles: Vec<_> = batch
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let o = c.cmd.output().expect("radit starts");
                    let err = format!("{}{}", common::stdout(&o), stderr(&o));
                    let code = o.status.code();
                    let named = err.contains(&c.names);
                    if code != Some(c.code) || !named || err.contains("panicked") {
                        Some(format!(
                            "{}: exit {code:?}, names {}: {named}\n    {}",
                            c.what,
                            c.names,
                            err.trim().lines().collect::<Vec<_>>().join("\n    ")
                        ))
                    } else {
                        None
                    }
                })
            })
            .collect();
        out.extend(handles.into_iter().filter_map(|h| h.join().unwrap()));
    }
    out
}

#[test]
fn every_subcommand_refuses_malformed_inputs_by_name_and_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let i = make_inputs(tmp.path());
    let out = tmp.path().join("out");
    let mut cases = Vec::new();
    let weights_files = [
        "empty.safetensors",
        "garbage.safetensors",
        "truncated.safetensors",
        "huge_header.safetensors",
        "missing_key.safetensors",
        "wrong_shape.safetensors",
        "wrong_dtype.safetensors",
        "dinov2.safetensors",
    ];
    for f in weights_files {
        let p = i.path(f);
        cases.push(case(&format!("sample --weights {f}"), &p, |c| {
            c.args([
                "sample", "--preset", "tiny", "-n", "1", "--steps", "2", "--solver", "euler",
            ])
            .arg("--weights")
            .arg(&p)
            .arg("--out")
            .arg(out.join(format!("sample-{f}")));
        }));
        cases.push(case(&format!("vae info --weights {f}"), &p, |c| {
            c.args(["vae", "info", "--weights"]).arg(&p);
        }));
        cases.push(case(&format!("decode --decoder {f}"), &p, |c| {
            c.args(["decode", "--latents"])
                .arg(i.path("latents_channels.safetensors"))
                .arg("--decoder")
                .arg(&p)
                .arg("--out")
                .arg(out.join(format!("decode-{f}")));
        }));
        cases.push(case(&format!("scm sample --model {f}"), &p, |c| {
            c.args(["scm", "sample", "-n", "2", "--model"]).arg(&p);
        }));
        cases.push(case(&format!("predictors eval --weights {f}"), &p, |c| {
            c.args(["predictors", "eval", "--device", "cpu", "--weights"])
                .arg(&p)
                .arg("--edits")
                .arg(i.path("bad-edits"))
                .arg("--out")
                .arg(out.join(format!("predict-{f}")));
        }));
        cases.push(case(&format!("eval fidelity --real {f}"), &p, |c| {
            c.args(["eval", "fidelity", "--real"])
                .arg(&p)
                .arg("--fake")
                .arg(i.path("features_8.npy"));
        }));
    }
    for f in [
        "empty.safetensors",
        "truncated.safetensors",
        "latents_rank3.safetensors",
        "latents_int.safetensors",
        "latents_key.safetensors",
        "latents_channels.safetensors",
    ] {
        let p = i.path(f);
        cases.push(case(&format!("decode --latents {f}"), &p, |c| {
            c.args(["decode", "--decoder"])
                .arg(i.path("vae.safetensors"))
                .arg("--latents")
                .arg(&p)
                .arg("--out")
                .arg(out.join(format!("latents-{f}")));
        }));
    }
    for f in [
        "features_1d.npy",
        "features_9.npy",
        "features_int.npy",
        "empty.npy",
        "truncated.npy",
        "garbage.safetensors",
    ] {
        let p = i.path(f);
        cases.push(case(&format!("eval fidelity --fake {f}"), &p, |c| {
            c.args(["eval", "fidelity", "--real"])
                .arg(i.path("features_8.npy"))
                .arg("--fake")
                .arg(&p);
        }));
    }
    for f in [
        "empty.toml",
        "garbage.toml",
        "wrong_type.toml",
        "unknown_section.toml",
    ] {
        let p = i.path(f);
        for sub in [
            &["train", "--config"][..],
            &["scm", "train", "--config"],
            &["encode", "--config"],
            &["generate", "--config"],
            &["eval", "features", "--config"],
            &["data", "batches", "--config"],
            &["predictors", "train", "--config"],
            &["edit", "--config"],
            &["run"],
        ] {
            cases.push(case(&format!("{} {f}", sub.join(" ")), &p, |c| {
                c.args(sub).arg(&p);
            }));
        }
    }
    for f in ["empty.csv", "garbage.csv", "wrong_columns.csv"] {
        let p = i.path(f);
        cases.push(case(&format!("shard --table {f}"), &p, |c| {
            c.args(["shard", "--no-progress", "--table"])
                .arg(&p)
                .arg("--images")
                .arg(i.path("not_a_store"))
                .arg("--out")
                .arg(out.join(format!("shard-{f}")));
        }));
        cases.push(case(&format!("scm counterfactual --from {f}"), &p, |c| {
            c.args(["scm", "counterfactual", "--model"])
                .arg(i.path("scm.safetensors"))
                .arg("--from")
                .arg(&p)
                .args(["--do", "sex=Female"]);
        }));
    }
    // A predictor's inputs: another model's weights, an edits table that is not one, an unfinished edit directory.
    let tiny = i.path("tiny.safetensors");
    cases.push(case(
        "predictors eval --weights tiny.safetensors",
        &tiny,
        |c| {
            c.args(["predictors", "eval", "--device", "cpu", "--weights"])
                .arg(&tiny)
                .arg("--edits")
                .arg(i.path("bad-edits"))
                .arg("--out")
                .arg(out.join("predict-tiny"));
        },
    ));
    let bad_edits = i.path("bad-edits");
    std::fs::create_dir_all(&bad_edits).unwrap();
    std::fs::write(bad_edits.join("edits.csv"), "file,nothing\na.png,1\n").unwrap();
    let predictor = i.path("predictor.safetensors");
    {
        use radit_models::predictor::{Predictor, PredictorConfig, Variant};
        let snapshot = i.path("rad-dino");
        radit_models::features::write_random_snapshot(&snapshot, 1).unwrap();
        let cfg = PredictorConfig::new(Variant::Linear, Some(snapshot), 16);
        let vs = radit_models::tch::nn::VarStore::new(radit_models::tch::Device::Cpu);
        Predictor::new(&vs.root(), &cfg).unwrap();
        radit_models::network::Architecture::Predictor(cfg)
            .save_trained(&vs.variables().into_iter().collect(), &[], &predictor)
            .unwrap();
    }
    let table = bad_edits.join("edits.csv");
    cases.push(case(
        "predictors eval --edits (a table with no profile)",
        &table,
        |c| {
            c.args(["predictors", "eval", "--device", "cpu", "--weights"])
                .arg(&predictor)
                .arg("--edits")
                .arg(&bad_edits)
                .arg("--out")
                .arg(out.join("predict-bad-edits"));
        },
    ));
    let manifest = bad_edits.join("generate.json");
    cases.push(case("eval identity --edits (unfinished)", &manifest, |c| {
        c.args(["eval", "identity", "--device", "cpu", "--edits"])
            .arg(&bad_edits)
            .arg("--perceptual-net")
            .arg(i.path("rad-dino"))
            .arg("--store")
            .arg(i.path("not_a_store"))
            .arg("--out")
            .arg(out.join("identity-bad"));
    }));
    for f in ["truncated.png", "empty.png"] {
        let p = i.path(f);
        cases.push(case(&format!("sample --edit {f}"), &p, |c| {
            c.args(["sample", "--weights"])
                .arg(i.path("tiny.safetensors"))
                .args([
                    "--steps",
                    "2",
                    "--solver",
                    "euler",
                    "--set",
                    "sex=Female",
                    "--edit",
                ])
                .arg(&p)
                .arg("--out")
                .arg(out.join(format!("edit-{f}")));
        }));
    }
    for f in ["not_a_store", "bad_store"] {
        let p = i.path(f);
        let s = p.to_str().unwrap().to_string();
        cases.push(case(&format!("data bench {f}"), &p, |c| {
            c.args(["data", "bench", &s, "--steps", "1"]);
        }));
        let mut verify = case(&format!("shard --verify {f}"), &p, |c| {
            c.args(["shard", "--verify", &s]);
        });
        verify.code = 1;
        cases.push(verify);
        cases.push(case(&format!("encode --store {f}"), &p, |c| {
            c.args(["encode", "--store", &s, "--weights"])
                .arg(i.path("vae.safetensors"));
        }));
        cases.push(case(&format!("generate --profiles {f}"), &p, |c| {
            c.args(["generate", "--weights"])
                .arg(i.path("tiny.safetensors"))
                .args(["--profiles", &s, "--out"])
                .arg(out.join(format!("generate-{f}")));
        }));
        cases.push(case(&format!("eval features --store {f}"), &p, |c| {
            c.args(["eval", "features", "--store", &s, "--net"])
                .arg(i.path("dino"))
                .arg("--out")
                .arg(out.join(format!("features-{f}.safetensors")));
        }));
    }
    for f in ["not_a_store", "bad_checkpoint"] {
        let p = i.path(f);
        cases.push(case(&format!("export {f}"), &p, |c| {
            c.arg("export")
                .arg(&p)
                .arg("--out")
                .arg(out.join(format!("export-{f}.safetensors")));
        }));
    }
    for f in ["tiny.safetensors", "garbage.safetensors"] {
        let p = i.path(f);
        cases.push(case(&format!("eval features --net {f}"), &p, |c| {
            c.args(["eval", "features", "--store"])
                .arg(i.path("not_a_store"))
                .arg("--net")
                .arg(&p)
                .arg("--out")
                .arg(out.join(format!("net-{f}.safetensors")));
        }));
    }
    let n = cases.len();
    let missed = misses(cases);
    assert!(
        missed.is_empty(),
        "{} of {n} cases did not exit 2 naming their input:\n{}",
        missed.len(),
        missed.join("\n")
    );
}

//! The Flow SCM: parity with its PyTorch twin (tests/python/scm_twin.py, written from scm.md) on every velocity,
//! loss term and gradient; `radit scm train` on a synthetic store with a known mechanism (P(consolidation |
//! pneumonia) = 0.8, 0.1 without) recovers it in samples and under do(pneumonia); abduct-then-predict returns the
//! observed profiles; do(X = observed) changes nothing; a resumed run ends where an uninterrupted one does; bad input
//! is named.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use radit_models::scm::infer::{self, Intervention, Missing, Value};
use radit_models::scm::{Graph, Profiles, Scm, ScmConfig};
use radit_models::tch::{self, Kind, Tensor, nn};

#[test]
fn every_velocity_loss_term_and_gradient_matches_the_pytorch_twin() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("twin");
    run_ok(
        python()
            .arg(repo().join("tests/python/scm_twin.py"))
            .arg("export")
            .arg(&out)
            .arg("3"),
    );
    let graph = Graph::default_graph();
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let scm = Scm::new(&vs.root(), &ScmConfig::preset("tiny").unwrap(), &graph).unwrap();
    let weights = read_tensors(&out.join("weights.safetensors"));
    radit_models::model::load_named(&vs, &weights, &out).unwrap();
    let inputs = read_tensors(&out.join("inputs.safetensors"));
    let want = read_tensors(&out.join("reference.safetensors"));
    let profiles = Profiles {
        labels: inputs["labels"].shallow_clone(),
        age: inputs["age"].shallow_clone(),
    };
    let noise: Vec<Tensor> = graph
        .variables
        .iter()
        .map(|v| inputs[&format!("noise.{}", v.name)].shallow_clone())
        .collect();
    let (loss, terms) = scm.loss(&profiles, &noise, &inputs["t"]);
    // Each velocity, through the model's own parts.
    let embeds: Vec<Tensor> = (0..19).map(|j| scm.embed(j, &profiles)).collect();
    for (i, v) in graph.variables.iter().enumerate() {
        let (x1, _) = scm.target(i, &profiles);
        let t = inputs["t"].select(1, i as i64);
        let xt = &noise[i] * (1.0 - t.unsqueeze(1)) + &x1 * t.unsqueeze(1);
        let got = scm.velocity(i, &xt, &t, &scm.condition(i, &embeds));
        let e = relative_error(&got, &want[&format!("v.{}", v.name)]);
        assert!(e < 1e-5, "velocity of {}: {e:e}", v.name);
        let e = relative_error(&terms[i].reshape([1]), &want[&format!("term.{}", v.name)]);
        assert!(e < 1e-5, "loss term of {}: {e:e}", v.name);
    }
    assert!(relative_error(&loss.reshape([1]), &want["loss"]) < 1e-5);
    loss.backward();
    for (name, p) in vs.variables() {
        if !p.requires_grad() {
            continue; // the fixed Fourier features
        }
        let g = p.grad();
        let g = if g.defined() { g } else { p.zeros_like() };
        let e = relative_error(&g, &want[&format!("grad.{name}")]);
        assert!(e < 1e-5, "gradient of {name}: {e:e}");
    }
}

/// A synthetic store whose pneumonia is positive with probability 0.3 and whose consolidation is positive with
/// probability 0.8 given pneumonia, 0.1 without (every other variable as `radit synth` draws it).
fn mechanism_store(dir: &Path, images: u64) -> PathBuf {
    let (table, pngs) = synth(&dir.join("synth"), images, "24x24", &[]);
    run_ok(
        python()
            .arg("-c")
            .arg(
                r#"
import csv, random, sys
random.seed(5)
rows = list(csv.DictReader(open(sys.argv[1])))
for r in rows:
    p = random.random() < 0.3
    r["pneumonia"] = "1" if p else "0"
    r["consolidation"] = "1" if random.random() < (0.8 if p else 0.1) else "0"
w = csv.DictWriter(open(sys.argv[1], "w", newline=""), fieldnames=list(rows[0].keys()))
w.writeheader(); w.writerows(rows)
"#,
            )
            .arg(&table),
    );
    shard_into(dir, &table, &pngs)
}

fn scm_train(
    store: &Path,
    out: &Path,
    steps: u64,
    checkpoint: Option<&Path>,
) -> std::process::Command {
    let mut cmd = radit();
    cmd.args([
        "scm", "train", "--preset", "tiny", "--batch", "128", "--lr", "3e-3", "--ema", "0.9",
    ])
    .args([
        "--log-every",
        "50",
        "--seed",
        "2",
        "--threads",
        "1",
        "--steps",
        &steps.to_string(),
    ])
    .arg("--store")
    .arg(store)
    .arg("--out")
    .arg(out);
    if let Some(c) = checkpoint {
        cmd.args(["--checkpoint-every", "100", "--checkpoint-dir"])
            .arg(c);
    }
    cmd
}

/// P(consolidation = positive | pneumonia = `given`) among `p`'s rows.
fn conditional(p: &Profiles, given: i64) -> f64 {
    let vocab = radit_sharding::schema::Vocabulary::current();
    let (pn, co) = (
        vocab.label_index("pneumonia").unwrap() as i64,
        vocab.label_index("consolidation").unwrap() as i64,
    );
    let pneumonia = p.labels.select(1, pn).eq(given);
    let positive = p.labels.select(1, co).eq(2).logical_and(&pneumonia);
    positive.sum(Kind::Float).double_value(&[])
        / pneumonia.sum(Kind::Float).double_value(&[]).max(1.0)
}

#[test]
fn a_trained_scm_recovers_a_known_mechanism_and_its_counterfactuals_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = mechanism_store(d, 1200);
    let model = d.join("scm.safetensors");
    let trained = run_ok(&mut scm_train(&store, &model, 400, None));
    let logs: Vec<serde_json::Value> = stdout(&trained)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (first, last) = (
        logs[0]["loss"].as_f64().unwrap(),
        logs.last().unwrap()["loss"].as_f64().unwrap(),
    );
    assert!(last < first, "the loss goes down: {first} -> {last}");
    let loaded = radit_models::scm::load(&model, tch::Device::Cpu).unwrap();
    let scm = &loaded.scm;
    let solver = infer::default_solver();

    // Samples: the mechanism within 0.1, and the marginal of pneumonia within 0.1 (total variation).
    let samples = infer::sample(scm, 2000, 7, &[], solver).unwrap();
    let (given_pos, given_neg) = (conditional(&samples, 2), conditional(&samples, 1));
    eprintln!("P(consolidation | pneumonia): {given_pos:.3} (0.8), without: {given_neg:.3} (0.1)");
    assert!((given_pos - 0.8).abs() < 0.1, "{given_pos}");
    assert!((given_neg - 0.1).abs() < 0.1, "{given_neg}");
    let pn = scm.graph.index("pneumonia").unwrap();
    let rate = samples
        .labels
        .select(1, pn as i64)
        .eq(2)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    eprintln!(
        "P(pneumonia): {rate:.3} (0.3; total-variation distance {:.3})",
        (rate - 0.3).abs()
    );
    assert!((rate - 0.3).abs() < 0.1, "{rate}");
    // `radit scm check`: the same fit as total-variation distances against the store's profiles.
    let check = run_ok(
        radit()
            .args(["scm", "check", "-n", "2000", "--seed", "7", "--model"])
            .arg(&model)
            .arg("--store")
            .arg(&store),
    );
    let report: serde_json::Value = serde_json::from_str(&stdout(&check)).unwrap();
    let of = |name: &str| {
        report["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["variable"] == name)
            .unwrap()
            .clone()
    };
    eprintln!("consolidation: {}", of("consolidation"));
    assert!(of("pneumonia")["marginal_tv"].as_f64().unwrap() < 0.1);
    let consolidation = of("consolidation");
    assert_eq!(consolidation["configurations"], 2, "{consolidation}");
    assert!(
        consolidation["conditional_tv_max"].as_f64().unwrap() < 0.1,
        "{consolidation}"
    );
    // do(pneumonia = positive): consolidation follows the mechanism; pneumonia's parents do not move.
    let positive = [Intervention {
        variable: pn,
        value: Value::Class(2),
    }];
    let done = infer::sample(scm, 1000, 8, &positive, solver).unwrap();
    assert!((conditional(&done, 2) - 0.8).abs() < 0.1);

    // Abduct-then-predict without intervention returns every observed categorical exactly and age to 1e-3.
    let observed = infer::sample(scm, 64, 9, &[], solver).unwrap();
    let back = infer::reconstruct(scm, &observed, solver).unwrap();
    assert!(back.labels.equal(&observed.labels), "a categorical changed");
    let age_error = (&back.age - &observed.age).abs().max().double_value(&[]);
    assert!(age_error < 1e-3, "age moved by {age_error}");
    // do(X = observed) is the identity: here X = sex, every row's own sex, one row at a time.
    let sex = scm.graph.index("sex").unwrap();
    let sexes = Vec::<i64>::try_from(observed.labels.select(1, sex as i64)).unwrap();
    for (r, &s) in sexes.iter().enumerate().take(8) {
        let one = Profiles {
            labels: observed.labels.narrow(0, r as i64, 1),
            age: observed.age.narrow(0, r as i64, 1),
        };
        let same = [Intervention {
            variable: sex,
            value: Value::Class(s as u8),
        }];
        let cf = infer::counterfactual(scm, &one, &same, Missing::Keep, solver).unwrap();
        assert!(
            cf.labels.equal(&one.labels),
            "row {r}: do(sex = observed) changed the profile"
        );
    }
    // A real intervention changes only the intervened variable's descendants.
    let female = [Intervention {
        variable: sex,
        value: Value::Class(2),
    }];
    let cf = infer::counterfactual(scm, &observed, &female, Missing::Keep, solver).unwrap();
    let below = scm.graph.descendants(&[sex]);
    for (i, v) in scm.graph.variables.iter().enumerate() {
        if i == sex || below[i] {
            continue;
        }
        if let radit_models::scm::graph::Kind::Categorical { label, .. } = v.kind {
            assert!(
                cf.labels
                    .select(1, label as i64)
                    .equal(&observed.labels.select(1, label as i64)),
                "{} is not below sex but changed",
                v.name
            );
        }
    }
    assert!(cf.labels.select(1, sex as i64).eq(2).all().int64_value(&[]) == 1);
    // Per-row values in one batch (`radit edit`'s): every row's own sex is the identity, and one value for all is
    // the plain counterfactual's.
    let own: Vec<Value> = sexes.iter().map(|&s| Value::Class(s as u8)).collect();
    let each =
        infer::counterfactual_each(scm, &observed, sex, &own, Missing::Keep, solver).unwrap();
    assert!(
        each.labels.equal(&observed.labels),
        "do(sex = own) changed a profile"
    );
    let all_female = vec![Value::Class(2); sexes.len()];
    let each = infer::counterfactual_each(scm, &observed, sex, &all_female, Missing::Keep, solver)
        .unwrap();
    assert!(
        each.labels.equal(&cf.labels),
        "per-row values differ from the plain counterfactual"
    );

    // The CLI: intervene, and a counterfactual that keeps a missing value missing unless asked to resample.
    let out = run_ok(
        radit()
            .args(["scm", "intervene", "--model"])
            .arg(&model)
            .args(["-n", "20", "--do", "pneumonia=positive", "--format", "json"]),
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(rows.iter().all(|r| r["pneumonia"] == "positive"));
    let cf = |extra: &[&str]| {
        let out = run_ok(
            radit()
                .args(["scm", "counterfactual", "--model"])
                .arg(&model)
                .args([
                    "--from",
                    "pneumonia=negative,sex=Male,age=40",
                    "--do",
                    "pneumonia=positive",
                ])
                .args(["--format", "json"])
                .args(extra),
        );
        let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
        rows[0].clone()
    };
    let kept = cf(&[]);
    assert_eq!(kept["pneumonia"], "positive");
    assert!(
        kept.get("consolidation").is_none(),
        "missing stays missing: {kept}"
    );
    assert_eq!(
        (&kept["sex"], &kept["age"]),
        (&serde_json::json!("Male"), &serde_json::json!("40.00"))
    );
    let resampled = cf(&["--resample-missing"]);
    assert!(resampled.get("consolidation").is_some(), "{resampled}");

    // An image edited to the SCM's counterfactual profile: do(pneumonia = positive) with consolidation observed
    // negative; the SCM predicts consolidation again, and RadiT (random tiny weights here) edits to that profile.
    let weights = d.join("radit.safetensors");
    run_ok(
        radit()
            .args(["model", "init", "tiny", "--out"])
            .arg(&weights),
    );
    let image = std::fs::read_dir(d.join("synth/images"))
        .unwrap()
        .flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .next()
        .unwrap();
    let edit = run_ok(
        radit()
            .args([
                "sample",
                "--device",
                "cpu",
                "--solver",
                "euler",
                "--steps",
                "4",
                "--weights",
            ])
            .arg(&weights)
            .arg("--out")
            .arg(d.join("edited"))
            .arg("--edit")
            .arg(&image)
            .args([
                "--from",
                "pneumonia=negative,consolidation=negative,sex=Male",
                "--from-age",
                "40",
            ])
            .args(["--do", "pneumonia=positive", "--scm"])
            .arg(&model),
    );
    let said = stdout(&edit);
    assert!(
        said.contains("to [") && said.contains("pneumonia=positive"),
        "{said}"
    );
    assert!(d.join("edited/edited_0000.png").exists());

    // Bad input, named.
    let bad = |args: &[&str], needle: &str| {
        fails_with_usage(
            radit()
                .args(["scm"])
                .args(args)
                .args(["--model", model.to_str().unwrap()]),
            needle,
        );
    };
    bad(&["intervene", "--do", "smoker=yes"], "smoker");
    bad(&["intervene", "--do", "sex=Unknown"], "Unknown");
    bad(
        &[
            "counterfactual",
            "--from",
            "sex=Male",
            "--do",
            "pneumonia=maybe",
        ],
        "maybe",
    );
    bad(
        &[
            "counterfactual",
            "--from",
            "height=180",
            "--do",
            "sex=Female",
        ],
        "height",
    );
}

#[test]
fn a_resumed_training_ends_where_an_uninterrupted_one_does_and_bad_graphs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 64, "40x48", 8, &[]);
    let straight = d.join("straight.safetensors");
    run_ok(&mut scm_train(
        &store,
        &straight,
        200,
        Some(&d.join("ck-straight")),
    ));
    // 100 steps (checkpoint at 100), then the same command to 200 resumes from it.
    let resumed = d.join("resumed.safetensors");
    run_ok(&mut scm_train(&store, &resumed, 100, Some(&d.join("ck"))));
    let second = run_ok(&mut scm_train(&store, &resumed, 200, Some(&d.join("ck"))));
    assert!(
        stderr(&second).contains("\"resumed_from\":100"),
        "{}",
        stderr(&second)
    );
    let (a, b) = (read_tensors(&straight), read_tensors(&resumed));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after resuming");
    }
    // A cyclic graph and a variable the vocabulary lacks: exit 2, naming the file and the problem.
    let graph = d.join("graph.toml");
    std::fs::write(
        &graph,
        "[parents]\npneumonia = [\"consolidation\"]\nconsolidation = [\"pneumonia\"]\n",
    )
    .unwrap();
    let err = fails_with_usage(
        radit().args(["scm", "graph", "--graph"]).arg(&graph),
        "cycle",
    );
    assert!(err.contains("graph.toml"), "{err}");
    std::fs::write(&graph, "[parents]\nsmoker = [\"age\"]\n").unwrap();
    fails_with_usage(
        &mut {
            let mut c = scm_train(&store, &d.join("x.safetensors"), 1, None);
            c.arg("--graph").arg(&graph);
            c
        },
        "smoker",
    );
}

#[test]
fn an_scm_job_on_two_ranks_learns_what_one_process_learns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 64, "40x48", 8, &[]);
    let one = d.join("one.safetensors");
    run_ok(&mut scm_train(&store, &one, 40, None));
    let two = d.join("two.safetensors");
    let job = write_job(
        d,
        &format!(
            r#"
[job]
name = "scm"
kind = "scm"
run_dir = "run"

[scm]
store = "{}"
out = "{}"
steps = 40
batch = 128
lr = 3e-3
ema = 0.9
seed = 2
log_every = 50
checkpoint_dir = "{}"
checkpoint_every = 20
model = {{ embed_dim = 16, fourier = 16, width = 32, blocks = 2 }}

[resources]
cpu_ranks = 2
threads_per_rank = 1

[launcher]
kind = "local"
"#,
            store.display(),
            two.display(),
            d.join("ck").display()
        ),
    );
    let run = run_ok(
        radit()
            .arg("run")
            .arg(&job)
            .env("RADIT_NO_PROGRESS_BAR", "1"),
    );
    assert!(stderr(&run).contains("step 40/40"), "{}", stderr(&run));
    // Each rank draws its half of the same global batch, noise and times: the same model up to summation order.
    let (a, b) = (read_tensors(&one), read_tensors(&two));
    for (name, t) in &a {
        let e = relative_error(&b[name], t);
        assert!(e < 1e-5, "{name}: {e:e}");
    }
}

#[test]
fn sigterm_checkpoints_the_scm_and_exits_75_and_the_next_run_resumes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = tiny_store(d, 64, "40x48", 8, &[]);
    let out = d.join("scm.safetensors");
    let ck = d.join("ck");
    let mut cmd = scm_train(&store, &out, 1_000_000, None);
    cmd.args([
        "--log-every",
        "5",
        "--checkpoint-every",
        "1000000",
        "--checkpoint-dir",
    ])
    .arg(&ck)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // Wait for a logged step, then ask it to stop as Slurm does before the time limit.
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("\"step\":5"), "{first}");
    // SAFETY: kill(2) on the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(75), "stopped for a requeue");
    assert!(!out.exists(), "no model from a stopped run");
    let metadata =
        radit_models::model::read_metadata(&ck.join("scm-checkpoint.safetensors")).unwrap();
    let step: u64 = metadata["radit.scm.step"].parse().unwrap();
    assert!(step >= 5, "{step}");
    // The same command to a few more steps resumes where it stopped and writes the model.
    let mut again = scm_train(&store, &out, step + 3, None);
    again.args(["--checkpoint-dir"]).arg(&ck);
    let done = run_ok(&mut again);
    assert!(
        stderr(&done).contains(&format!("\"resumed_from\":{step}")),
        "{}",
        stderr(&done)
    );
    assert!(out.exists());
}

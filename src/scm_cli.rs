//! `radit scm ...`: thin argument parsing over radit_models::scm (the Flow SCM of the 19 metadata variables).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use radit_jobs::journal::RankError;
use radit_jobs::scm_fit::{ScmTrainConfig, train};
use radit_models::scm::infer::{self, Missing};
use radit_models::scm::{Graph, ScmConfig, io};

#[derive(Subcommand)]
pub enum ScmCommand {
    /// Train the SCM on a store's profiles (labels and age of its training split; no image is read): one process,
    /// or the ranks of an mpirun / srun step (data-parallel), resumable from --checkpoint-dir.
    Train(TrainArgs),
    /// Draw N profiles by ancestral sampling (dopri5 1e-6), optionally under interventions (--do).
    Sample(SampleArgs),
    /// Draw N profiles under do(...): the intervened variables are set, cut from their parents, and everything
    /// downstream follows (the same as `sample --do`).
    Intervene(SampleArgs),
    /// Counterfactual profiles: abduct each observed variable's noise, apply --do, predict the descendants only.
    Counterfactual(CounterfactualArgs),
    /// How well the SCM's samples match a store's profiles: the total-variation distance of each marginal and of
    /// each variable given its parents' configurations (JSON).
    Check(CheckArgs),
    /// The graph (the built-in one, or --graph FILE validated): variables, parents and the topological order;
    /// --toml prints the built-in graph file to start your own from.
    Graph(GraphArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// A TOML file with an [scm] section; or the flags below.
    #[arg(long, conflicts_with_all = ["store", "out"])]
    config: Option<PathBuf>,
    /// The store whose training split's profiles to learn.
    #[arg(long, required_unless_present = "config")]
    store: Option<String>,
    /// The trained model (EMA weights, graph, config, vocabulary) as safetensors.
    #[arg(long, required_unless_present = "config")]
    out: Option<PathBuf>,
    /// A graph file (default: the paper's; `radit scm graph --toml` prints it).
    #[arg(long)]
    graph: Option<PathBuf>,
    /// paper (d = 256, width 512, 3 blocks) or tiny.
    #[arg(long, default_value = "paper")]
    preset: String,
    /// Keep the missing class in the flow space (trained like a class) instead of masking missing targets.
    #[arg(long)]
    null_as_class: bool,
    #[arg(long, default_value_t = 50_000)]
    steps: u64,
    /// Profiles per step (all ranks together).
    #[arg(long, default_value_t = 4096)]
    batch: u64,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.999)]
    ema: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 100)]
    log_every: u64,
    /// Checkpoint here every --checkpoint-every steps and at a stop; a rerun resumes from it (default: OUT's name
    /// with .ckpt, beside it).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    #[command(flatten)]
    rank: crate::rank_args::RankArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Csv,
    Json,
}

#[derive(Args)]
pub struct SampleArgs {
    /// The SCM (`radit scm train`'s output).
    #[arg(long)]
    model: PathBuf,
    #[arg(short, long, default_value_t = 16)]
    n: i64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Interventions: name=value pairs, e.g. sex=Female,age=63.
    #[arg(long = "do")]
    interventions: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    run: InferenceArgs,
}

/// Where profiles go.
#[derive(Args)]
pub struct OutputArgs {
    #[arg(long, value_enum, default_value = "csv")]
    format: Format,
    /// Write here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How the SCM's ODEs are solved, and where.
#[derive(Args)]
pub struct InferenceArgs {
    /// The ODE solver (dopri5 at the paper's 1e-6 for the SCM by default).
    #[command(flatten)]
    solver: crate::model_cli::SolverArgs,
    /// cpu, cuda or cuda:N (default: the GPU when there is one).
    #[arg(long)]
    device: Option<String>,
}

impl InferenceArgs {
    fn load(
        &self,
        model: &std::path::Path,
    ) -> anyhow::Result<(radit_models::scm::LoadedScm, radit_models::sampler::Solver)> {
        let device = crate::rank_args::device_or_gpu(self.device.as_deref())?;
        Ok((
            radit_models::scm::load(model, device)?,
            self.solver.solver(1e-6)?,
        ))
    }
}

#[derive(Args)]
pub struct CounterfactualArgs {
    #[arg(long)]
    model: PathBuf,
    /// The observed profile(s): a CSV file (one column per variable, class names, age in years; other columns
    /// ignored) or one profile inline, name=value pairs.
    #[arg(long)]
    from: String,
    /// The interventions: name=value pairs.
    #[arg(long = "do")]
    interventions: String,
    /// Predict a descendant whose observed value is missing from fresh noise (default: keep it missing).
    #[arg(long)]
    resample_missing: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    run: InferenceArgs,
}

#[derive(Args)]
pub struct CheckArgs {
    #[arg(long)]
    model: PathBuf,
    /// The store whose profiles to compare with (its training split by default).
    #[arg(long)]
    store: String,
    #[arg(long, default_value = "train")]
    split: String,
    /// Samples drawn from the SCM.
    #[arg(short, long, default_value_t = 5000)]
    n: i64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Parent configurations with fewer rows on either side are left out of the conditionals.
    #[arg(long, default_value_t = 30.0)]
    min_count: f64,
    #[command(flatten)]
    run: InferenceArgs,
}

#[derive(Args)]
pub struct GraphArgs {
    #[arg(long)]
    graph: Option<PathBuf>,
    /// Print the built-in graph file.
    #[arg(long)]
    toml: bool,
}

pub fn run_scm(cmd: ScmCommand) -> anyhow::Result<u8> {
    match cmd {
        ScmCommand::Train(a) => run_train(a),
        ScmCommand::Sample(a) | ScmCommand::Intervene(a) => run_sample(a),
        ScmCommand::Counterfactual(a) => run_counterfactual(a),
        ScmCommand::Check(a) => run_check(a),
        ScmCommand::Graph(a) => run_graph(a),
    }
}

fn run_train(a: TrainArgs) -> anyhow::Result<u8> {
    let cfg = match &a.config {
        Some(file) => ScmTrainConfig::load(file)?,
        None => {
            let (Some(store), Some(out)) = (&a.store, &a.out) else {
                crate::exit::bail_usage!("give --config, or --store and --out");
            };
            let cfg = ScmTrainConfig {
                graph: a.graph.clone(),
                model: ScmConfig {
                    null_as_class: a.null_as_class,
                    ..ScmConfig::preset(&a.preset)?
                },
                steps: a.steps,
                batch: a.batch,
                lr: a.lr,
                ema: a.ema,
                seed: a.seed,
                log_every: a.log_every,
                checkpoint_dir: a.checkpoint_dir.clone(),
                checkpoint_every: a.checkpoint_every,
                ..ScmTrainConfig::new(store, out)
            };
            cfg.validate().map_err(RankError::Config)?;
            cfg
        }
    };
    let world = crate::rank_args::launcher_world();
    let device = a.rank.device_for(Some(cfg.flops_per_step(world)))?;
    eprintln!(
        "radit: checkpoints in {} (a rerun resumes from them)",
        cfg.checkpoints().display()
    );
    let done = crate::rank_args::run_rank(
        device,
        |comm, handles| {
            let comm = comm.as_ref();
            train(&cfg, comm, device, handles, |log| {
                if comm.rank() == 0 {
                    println!("{}", serde_json::to_string(log).unwrap_or_default());
                }
            })
        },
        RankError::repeats,
    )?;
    let (summary, rank) = (done.summary, done.rank);
    if rank == 0 && !summary.stopped_for_requeue {
        eprintln!(
            "radit: the SCM is in {} (step {}, loss {:.4})",
            cfg.out.display(),
            summary.final_step,
            summary.final_loss
        );
    } else if rank == 0 {
        eprintln!(
            "radit: stopped at step {}; the checkpoint in {} resumes it",
            summary.final_step,
            cfg.checkpoints().display()
        );
    }
    Ok(crate::exit::done_or_requeue(summary.stopped_for_requeue))
}

fn emit(p: &radit_models::scm::Profiles, output: &OutputArgs) -> anyhow::Result<()> {
    let out = output.out.as_ref();
    let text = match output.format {
        Format::Csv => io::to_csv(p),
        Format::Json => format!("{:#}\n", io::to_json(p)),
    };
    match out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
        }
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn run_sample(a: SampleArgs) -> anyhow::Result<u8> {
    crate::exit::ensure_usage!(a.n > 0, "-n must be positive");
    let (loaded, solver) = a.run.load(&a.model)?;
    let interventions = match &a.interventions {
        Some(text) => infer::parse_interventions(&loaded.scm, text)?,
        None => Vec::new(),
    };
    let p = infer::sample(&loaded.scm, a.n, a.seed, &interventions, solver)?;
    emit(&p, &a.output)?;
    Ok(0)
}

fn run_counterfactual(a: CounterfactualArgs) -> anyhow::Result<u8> {
    let (loaded, solver) = a.run.load(&a.model)?;
    let interventions = infer::parse_interventions(&loaded.scm, &a.interventions)?;
    let observed = if std::path::Path::new(&a.from).is_file() {
        io::read_csv(std::path::Path::new(&a.from))?
    } else {
        io::parse_inline(&a.from)?
    };
    let missing = if a.resample_missing {
        Missing::Resample { seed: a.seed }
    } else {
        Missing::Keep
    };
    let cf = infer::counterfactual(&loaded.scm, &observed, &interventions, missing, solver)?;
    emit(&cf, &a.output)?;
    Ok(0)
}

fn run_check(a: CheckArgs) -> anyhow::Result<u8> {
    crate::exit::ensure_usage!(a.n > 1, "-n must be at least 2");
    let split = a
        .split
        .parse()
        .map_err(|e| crate::exit::usage!("--split: {e}"))?;
    let (loaded, solver) = a.run.load(&a.model)?;
    let (labels, age) = radit_jobs::scm_fit::read_profiles(&a.store, split)?;
    crate::exit::ensure_usage!(
        !age.is_empty(),
        "{}: the {} split is empty",
        a.store,
        a.split
    );
    let n = age.len() as i64;
    let labels: Vec<i64> = labels.iter().map(|&c| i64::from(c)).collect();
    let data = radit_models::scm::Profiles {
        labels: radit_models::tch::Tensor::from_slice(&labels).view([n, -1]),
        age: radit_models::tch::Tensor::from_slice(&age),
    };
    let samples = infer::sample(&loaded.scm, a.n, a.seed, &[], solver)?;
    let fit = radit_models::scm::check::fit(&loaded.scm.graph, &data, &samples, a.min_count);
    println!(
        "{:#}",
        serde_json::json!({ "profiles": n, "samples": a.n, "min_count": a.min_count, "variables": fit })
    );
    Ok(0)
}

fn run_graph(a: GraphArgs) -> anyhow::Result<u8> {
    if a.toml {
        print!("{}", radit_models::scm::graph::DEFAULT_GRAPH);
        return Ok(0);
    }
    let graph = match &a.graph {
        Some(path) => Graph::load(path)?,
        None => Graph::default_graph(),
    };
    let name = |i: usize| graph.variables[i].name.as_str();
    println!(
        "order: {}",
        graph
            .order
            .iter()
            .map(|&i| name(i))
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    for &i in &graph.order {
        let parents: Vec<&str> = graph.parents[i].iter().map(|&p| name(p)).collect();
        println!(
            "{} ({} classes) <- {}",
            name(i),
            graph.variables[i].classes(),
            if parents.is_empty() {
                "(root)".to_string()
            } else {
                parents.join(", ")
            }
        );
    }
    Ok(0)
}

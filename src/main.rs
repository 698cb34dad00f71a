//! `radit`: train rectified-flow chest X-ray generators at supercomputer scale.
//!
//! A thin CLI: each subcommand parses its arguments into a typed config and calls one crate.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::io::Write;

use radit_run::quickstart::Said;
use radit_sharding::audit::{self, AuditRequest};
use radit_sharding::ingest::RunOptions;
use radit_sharding::layout::{Compression, StoreLayout};
use radit_sharding::loader::{DataConfig, ModelInput, Pass};
use radit_sharding::manifest::IngestSettings;
use radit_sharding::reader::StoreReader;
use radit_sharding::schema::{EncodingConfig, UncertainPolicy};
use radit_sharding::split::Split;
use radit_sharding::split::SplitConfig;
use radit_sharding::store::Storage;
use radit_sharding::synth::{SynthConfig, generate, parse_sizes};
use radit_sharding::table::TableConfig;
use radit_sharding::throughput;

mod data_cli;
mod edit_cli;
mod encode_cli;
mod eval_cli;
mod generate_cli;
mod model_cli;
mod predictors_cli;
mod rank_args;
mod run_cli;
mod scm_cli;
mod train_cli;

mod exit;
mod harmonise_cli;

#[derive(Parser)]
#[command(name = "radit", version, args_override_self = true)]
#[command(about = "Train rectified-flow chest X-ray generators at supercomputer scale")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic synthetic CXR-like dataset: table.csv + 16-bit PNGs.
    Synth(SynthArgs),
    /// A public dataset as released -> the harmonised table `radit shard` reads, with an audit report.
    #[command(subcommand)]
    Harmonise(harmonise_cli::HarmoniseCommand),
    /// DICOM releases: survey their headers before ingesting.
    #[command(subcommand)]
    Dicom(harmonise_cli::DicomCommand),
    /// Ingest a harmonised table and its images into a Zarr v3 store (or verify a store).
    Shard(ShardArgs),
    /// The embedded default job: synthesise a small dataset, shard it locally, verify it, train on 2 CPU ranks
    /// with `radit run` (checkpoints, restarts), and draw samples with a contact sheet.
    Quickstart(QuickstartArgs),
    /// Inspect the training data: its order, and how fast the loader reads it.
    #[command(subcommand)]
    Data(DataCommand),
    /// The RadiT model: size and cost of a preset, fresh weights, step-time benchmark.
    #[command(subcommand)]
    Model(model_cli::ModelCommand),
    /// The FLUX.2 autoencoder that makes the latent presets' latents: sizes, and a strict check of a weights file.
    #[command(subcommand)]
    Vae(model_cli::VaeCommand),
    /// Decode a latent model's samples (`radit sample`'s latents.safetensors) with the autoencoder's decoder into
    /// 16-bit PNGs and a contact sheet.
    Decode(model_cli::DecodeArgs),
    /// Encode a store's images to `<split>/latents` with the autoencoder's encoder (one process, or the ranks of
    /// a `[job] kind = "encode"` job under `radit run`): resumable shard by shard, channel statistics, manifest last.
    Encode(encode_cli::EncodeArgs),
    /// Matched conditional sampling at scale: one sample per row of a reference split with that row's 19
    /// variables (dopri5 1e-5 by default), as 16-bit PNGs and samples.csv; one process, or the ranks of a
    /// `[job] kind = "generate"` job under `radit run`, resumable unit by unit.
    Generate(generate_cli::GenerateArgs),
    /// The Flow SCM of the 19 metadata variables: train it on a store's profiles, sample profiles, intervene
    /// (do(sex=Female)), and derive counterfactual profiles.
    #[command(subcommand)]
    Scm(scm_cli::ScmCommand),
    /// Evaluation: the paper's fidelity metrics on feature files.
    #[command(subcommand)]
    Eval(eval_cli::EvalCommand),
    /// Counterfactual editing at scale: N patients of a split drawn with a seed, each edited per intervention
    /// (sex, race, age, view, dataset, a finding) through the Flow SCM's counterfactual profile, abducted and
    /// solved forward (dopri5 1e-5); 16-bit PNGs and edits.csv; one process, or the ranks of a `[job] kind =
    /// "edit"` job under `radit run`, resumable unit by unit. --from-noise: the baseline of random samples.
    Edit(edit_cli::EditArgs),
    /// Metadata predictors (Table 15): train one on a store, and score one on a split, samples or edits.
    #[command(subcommand)]
    Predictors(predictors_cli::PredictorsCommand),
    /// Generate images for given metadata, or edit images counterfactually (--edit); writes 16-bit PNGs and an
    /// 8-bit contact sheet.
    Sample(model_cli::SampleArgs),
    /// Run a job spec end to end: coordinator, ranks (local, mpirun or Slurm), restarts, requeue, samples.
    Run(run_cli::RunArgs),
    /// The coordinator on its own: a scale benchmark with simulated ranks.
    #[command(subcommand)]
    Coordinator(run_cli::CoordinatorCommand),
    /// Train RadiT on a Zarr store: one rank here, or many under mpirun/srun (--config run.toml).
    Train(train_cli::TrainArgs),
    /// Write the newest checkpoint's EMA (or raw) weights as one safetensors file PyTorch can load.
    Export(train_cli::ExportArgs),
    /// The FSDP engine on synthetic inputs: step time, throughput, MFU, communication, checkpoint cost.
    #[command(subcommand)]
    Engine(train_cli::EngineCommand),
    /// Print which libtorch this binary loaded and which devices it sees.
    Info,
    /// Checks of this installation that need real processes (e.g. collectives under mpirun).
    #[command(subcommand, hide = true)]
    Selftest(train_cli::SelftestCommand),
}

#[derive(Args)]
struct SynthArgs {
    /// Output directory (gets table.csv and images/).
    #[arg(long)]
    out: PathBuf,
    /// Number of ordinary images.
    #[arg(long, default_value_t = 256)]
    images: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image sizes WIDTHxHEIGHT, comma-separated; the first is the most common.
    #[arg(long, default_value = "512x512,640x560,480x600,1024x1200")]
    sizes: String,
    /// Append rows with realistic defects (listed in defects.json).
    #[arg(long)]
    defects: bool,
    /// Write an explicit (mostly empty) split column.
    #[arg(long)]
    split_column: bool,
}

#[derive(Args)]
struct ShardArgs {
    /// Re-check the store at this URL against its manifest instead of ingesting.
    #[arg(long, value_name = "URL", conflicts_with_all = ["table", "images", "out"])]
    verify: Option<String>,
    /// Harmonised metadata table (CSV).
    #[arg(long, required_unless_present = "verify")]
    table: Option<PathBuf>,
    /// Root directory the table's `path` column is relative to.
    #[arg(long, required_unless_present = "verify")]
    images: Option<PathBuf>,
    /// Output store: a path, file:///abs/dir or s3://bucket/prefix (AWS_* environment variables apply).
    #[arg(long, required_unless_present_any = ["verify", "ceiling"])]
    out: Option<String>,
    /// Measure the ceiling ingest is compared against instead of ingesting: read, decode, preprocess and compress
    /// every image of the table with these settings and threads, and nothing else (no checks beyond parsing the
    /// table, no labels, journal, hashing or writes).
    #[arg(long, conflicts_with_all = ["verify", "out"])]
    ceiling: bool,
    /// Side of the square output images.
    #[arg(long, default_value_t = 512)]
    image_size: u32,
    /// Images per shard object.
    #[arg(long, default_value_t = 64)]
    shard_images: u32,
    /// zstd[:LEVEL] or blosc-zstd[:LEVEL].
    #[arg(long, default_value = "zstd:3")]
    compression: Compression,
    /// Uncertain (-1) finding labels: u-ignore (missing), u-ones (positive) or u-zeros (negative).
    #[arg(long, default_value = "u-ignore")]
    uncertain: UncertainPolicy,
    /// Plausible age range in years; ages outside become missing.
    #[arg(long, default_value_t = 0.0)]
    age_min: f32,
    #[arg(long, default_value_t = 100.0)]
    age_max: f32,
    /// Accept only AP, PA and Lateral as views (no LL, postero-anterior, ...).
    #[arg(long)]
    strict_views: bool,
    /// DICOM VOI: auto (the VOI LUT, else the window, else none), window, lut or none (a min-max stretch).
    #[arg(long, default_value = "auto")]
    dicom_voi: radit_dicom::VoiChoice,
    /// Which window or VOI LUT of a DICOM file with several (0: the first).
    #[arg(long, default_value_t = 0)]
    dicom_voi_index: usize,
    /// A DICOM window that cannot be used: minmax (stretch instead, counted) or reject the image.
    #[arg(long, default_value = "minmax")]
    dicom_bad_window: radit_dicom::BadWindow,
    /// DICOM pixels marked by PixelPaddingValue (to PixelPaddingRangeLimit): ignore (part of the image) or mask
    /// (left out of the stretch and black).
    #[arg(long, default_value = "ignore")]
    dicom_padding: radit_dicom::Padding,
    /// Seed of the patient-level split hash (for patients without an explicit split).
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Exact patient counts VAL,TEST (the paper: 10000,30790): a seeded permutation of the patients without an
    /// explicit split, the first VAL to validation, the next TEST to test, the rest to train; recorded in the
    /// manifest. Default: the paper's proportions by a seeded hash.
    #[arg(long, value_name = "VAL,TEST")]
    split_patients: Option<radit_sharding::split::ExactSplit>,
    /// Decode threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Do not draw a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Push ingest progress (radit_ingest_*) to this Prometheus Pushgateway (http://host:9091) under
    /// job=radit-shard, instance=<this host>; the final state stays there when the ingest ends.
    #[arg(long, value_name = "URL")]
    pushgateway: Option<String>,
    /// Seconds between pushes.
    #[arg(long, default_value_t = 15.0)]
    push_seconds: f64,
    /// Print at most this many rejected rows (all are in manifest.json).
    #[arg(long, default_value_t = 50)]
    show_rejected: usize,
    /// Stop after committing this many shards, as if interrupted (for testing resume).
    #[arg(long, hide = true)]
    stop_after_shards: Option<u64>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print, one line per step, the image_ids that one rank sees: `step K: id id ...`.
    Batches(BatchesArgs),
    /// Measure the loader on a store: samples/s delivered, time waited, bytes read, cache hits, optionally a
    /// digest of the batches; or (--ceiling) the ceiling it is measured against: read + decompress every shard.
    Bench(BenchArgs),
    /// What the store holds per split and dataset (the paper's Appendix A): patients, images, views, sex, race,
    /// age and each finding's positive / negative / missing counts; a table here, and JSON, CSV and a PNG
    /// figure of the composition on request.
    Stats(data_cli::StatsArgs),
    /// A reference set as an id list for `generate --ids` and `eval features --ids`: a seeded subset of a split
    /// (of given datasets), or CheXGenBench's test images mapped to this store's ids.
    Select(data_cli::SelectArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum InputArg {
    U16,
    Dequantised,
    Latents,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PassArg {
    Train,
    Eval,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    slice: RankSliceArgs,
    #[arg(long, value_enum, default_value = "train")]
    pass: PassArg,
    #[arg(long, value_enum, default_value = "dequantised")]
    input: InputArg,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 64)]
    global_batch: u64,
    /// Steps to run (default: one epoch of the split, or the whole evaluation pass).
    #[arg(long)]
    steps: Option<u64>,
    /// Node-local cache directory (kept between runs: run twice for a warm cache).
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long, default_value_t = 64.0)]
    cache_gib: f64,
    /// Batches prepared ahead.
    #[arg(long, default_value_t = 4)]
    prefetch: usize,
    /// Decode threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Measure the ceiling instead of the loader: fetch and decompress every shard once, all in parallel.
    #[arg(long)]
    ceiling: bool,
    /// With --ceiling: also check each object's sha256 against the manifest, as the loader does.
    #[arg(long, requires = "ceiling")]
    verify: bool,
    /// Print a sha256 of the delivered batches (to compare runs).
    #[arg(long)]
    digest: bool,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Which store, split and rank the data commands look at.
#[derive(Args)]
struct RankSliceArgs {
    /// The store (path, file:// or s3:// URL).
    url: String,
    #[arg(long, default_value = "train")]
    split: Split,
    /// Shards mixed together by the shuffle (must match the run's loader setting).
    #[arg(long, default_value_t = radit_sharding::order::DEFAULT_WINDOW_SHARDS)]
    window_shards: u64,
    #[arg(long, default_value_t = 1)]
    world: u64,
    #[arg(long, default_value_t = 0)]
    rank: u64,
}

#[derive(Args)]
struct BatchesArgs {
    /// The store (path, file:// or s3:// URL); or give --config.
    #[arg(required_unless_present = "config")]
    url: Option<String>,
    /// A training config or a job file: the store, split, window, seed and global batch (and a job's world) are
    /// the run's, so the batches listed are the ones it trains on; the flags below override.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    split: Option<Split>,
    /// Shards mixed together by the shuffle (the run's `data.window_shards`; default 64 without --config).
    #[arg(long)]
    window_shards: Option<u64>,
    #[arg(long)]
    world: Option<u64>,
    #[arg(long, default_value_t = 0)]
    rank: u64,
    #[arg(long, required_unless_present = "config")]
    seed: Option<u64>,
    #[arg(long, required_unless_present = "config")]
    global_batch: Option<u64>,
    #[arg(long, default_value_t = 0)]
    from_step: u64,
    #[arg(long, default_value_t = 1)]
    steps: u64,
}

#[derive(Args)]
struct QuickstartArgs {
    /// Working directory for the synthetic dataset and the store.
    #[arg(long, default_value = "radit-quickstart")]
    dir: PathBuf,
    #[arg(long, default_value_t = 192)]
    images: u64,
    /// Side of the stored images (the model's input size).
    #[arg(long, default_value_t = 32)]
    image_size: u32,
    /// Training steps of the quickstart run.
    #[arg(long, default_value_t = 600)]
    steps: u64,
    /// CPU ranks.
    #[arg(long, default_value_t = 2)]
    ranks: u32,
    /// The latent path instead: random weights of the tiny autoencoder (FLUX.2's topology), an encode job on the
    /// ranks, then tiny-latent trained on those latents with its samples decoded.
    #[arg(long)]
    latent: bool,
    /// Stop after the store is verified: no job, no training (for `radit train --config
    /// examples/radit-tiny-cpu.toml` on that store).
    #[arg(long, conflicts_with = "latent")]
    no_train: bool,
}

fn main() -> ExitCode {
    radit_monitoring::init_tracing();
    // Allocation failures are caught and reported as errors (exit 2), not printed as crashes.
    radit_engine::out_of_memory::quiet_panic_hook();
    let cli = match parse_arguments() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Synth(a) => run_synth(a),
        Command::Harmonise(c) => harmonise_cli::run_harmonise(c),
        Command::Dicom(c) => harmonise_cli::run_dicom(c),
        Command::Shard(a) => run_shard(a),
        Command::Quickstart(a) => run_quickstart(a),
        Command::Data(DataCommand::Batches(a)) => run_batches(a),
        Command::Data(DataCommand::Bench(a)) => run_bench(a),
        Command::Data(DataCommand::Stats(a)) => data_cli::run_stats(a),
        Command::Data(DataCommand::Select(a)) => data_cli::run_select(a),
        Command::Model(c) => model_cli::run_model(c),
        Command::Vae(c) => model_cli::run_vae(c),
        Command::Decode(a) => model_cli::run_decode(a),
        Command::Encode(a) => encode_cli::run_encode(a),
        Command::Generate(a) => generate_cli::run_generate(a),
        Command::Scm(c) => scm_cli::run_scm(c),
        Command::Eval(c) => eval_cli::run_eval(c),
        Command::Sample(a) => model_cli::run_sample(a),
        Command::Edit(a) => edit_cli::run_edit(a),
        Command::Predictors(c) => predictors_cli::run_predictors(c),
        Command::Run(a) => run_cli::run(a),
        Command::Coordinator(c) => run_cli::run_coordinator(c),
        Command::Train(a) => train_cli::run_train(a),
        Command::Export(a) => train_cli::run_export(a),
        Command::Engine(c) => train_cli::run_engine(c),
        Command::Info => run_info(),
        Command::Selftest(c) => train_cli::run_selftest(c),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", exit::describe(&e));
            ExitCode::from(exit::code_of(&e))
        }
    }
}

/// The command line. Every option that takes a value accepts a leading minus, so that `--steps -5` reaches the
/// value's own check (clap's "invalid value ... invalid digit", or the command's range error) instead of reading as
/// an unknown flag `-5`.
fn parse_arguments() -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    fn negatives_allowed(cmd: clap::Command) -> clap::Command {
        let cmd = cmd.mut_args(|a| {
            if a.get_action().takes_values() && !a.is_positional() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        });
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        names
            .into_iter()
            .fold(cmd, |c, name| c.mut_subcommand(name, negatives_allowed))
    }
    let mut cmd = negatives_allowed(Cli::command());
    let matches = cmd
        .try_get_matches_from_mut(std::env::args_os())
        .map_err(|e| negative_named(e, &mut cmd))?;
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// A negative number where a count is expected, said as a range error rather than as the parser's "invalid
/// digit found in string".
fn negative_named(e: clap::Error, cmd: &mut clap::Command) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    match (
        e.kind(),
        text(ContextKind::InvalidArg),
        text(ContextKind::InvalidValue),
    ) {
        (ErrorKind::ValueValidation, Some(arg), Some(value))
            if value.starts_with('-') && value.parse::<f64>().is_ok() =>
        {
            let flag = arg.split_whitespace().next().unwrap_or(&arg).to_string();
            cmd.error(
                ErrorKind::ValueValidation,
                format!("{flag} {value}: must not be negative"),
            )
        }
        _ => e,
    }
}

fn run_synth(a: SynthArgs) -> anyhow::Result<u8> {
    let cfg = SynthConfig {
        images: a.images,
        seed: a.seed,
        sizes: parse_sizes(&a.sizes).map_err(|e| exit::usage!("--sizes: {e}"))?,
        defects: a.defects,
        split_column: a.split_column,
    };
    let out = generate(&a.out, &cfg).context("writing the synthetic dataset")?;
    println!(
        "wrote {} rows to {} (images under {})",
        out.rows,
        out.table.display(),
        out.images.display()
    );
    if !out.defects.is_empty() {
        println!(
            "{} defect rows, listed in {}",
            out.defects.len(),
            a.out.join("defects.json").display()
        );
    }
    Ok(0)
}

fn shard_settings(a: &ShardArgs) -> IngestSettings {
    IngestSettings {
        table: TableConfig {
            encoding: EncodingConfig {
                uncertain: a.uncertain,
                age_min: a.age_min,
                age_max: a.age_max,
                view_aliases: !a.strict_views,
            },
            split: SplitConfig {
                seed: a.split_seed,
                patients: a.split_patients,
                ..SplitConfig::default()
            },
        },
        layout: StoreLayout {
            image_size: a.image_size,
            shard_images: a.shard_images,
            compression: a.compression,
        },
        dicom: radit_dicom::DicomOptions {
            voi: a.dicom_voi,
            voi_index: a.dicom_voi_index,
            bad_window: a.dicom_bad_window,
            padding: a.dicom_padding,
        },
    }
}

fn run_shard(a: ShardArgs) -> anyhow::Result<u8> {
    if let Some(url) = &a.verify {
        return run_verify(url);
    }
    if a.ceiling {
        radit_run::shard::keep_large_allocations();
        return run_ingest_ceiling(&a);
    }
    let (Some(table), Some(images), Some(out)) = (&a.table, &a.images, &a.out) else {
        return Err(exit::usage!(
            "--table, --images and --out are required to ingest"
        ));
    };
    let end = radit_run::shard::shard(&radit_run::shard::ShardJob {
        table: table.clone(),
        images: images.clone(),
        out: out.clone(),
        settings: shard_settings(&a),
        options: RunOptions {
            threads: a.threads,
            progress: !a.no_progress,
            stop_after_shards: a.stop_after_shards,
            metrics: None,
        },
        pushgateway: a.pushgateway.clone().map(|url| (url, a.push_seconds)),
        show_rejected: a.show_rejected,
    })?;
    print!("{end}");
    if matches!(end, radit_run::shard::ShardEnd::Interrupted { .. }) {
        println!();
    }
    Ok(0)
}

fn run_ingest_ceiling(a: &ShardArgs) -> anyhow::Result<u8> {
    let (Some(table), Some(images)) = (&a.table, &a.images) else {
        return Err(exit::usage!(
            "--table and --images are required to measure the ceiling"
        ));
    };
    let c = radit_sharding::ingest::measure_ceiling(table, images, &shard_settings(a), a.threads)
        .with_context(|| format!("reading {}", table.display()))?;
    println!(
        "ceiling (read + decode + preprocess + compress every image, nothing else): {} images in {} shards, \
         {:.3} s, {:.1} images/s, {} stored bytes",
        c.images,
        c.shards,
        c.elapsed.as_secs_f64(),
        c.images_per_second(),
        c.stored_bytes
    );
    Ok(0)
}

fn run_verify(url: &str) -> anyhow::Result<u8> {
    let verified =
        radit_run::shard::verify_store(url).with_context(|| format!("verifying {url}"))?;
    println!("{verified}");
    Ok(if verified.ok() {
        0
    } else {
        exit::VERIFY_FAILED
    })
}

fn run_quickstart(a: QuickstartArgs) -> anyhow::Result<u8> {
    let q = radit_run::quickstart::Quickstart {
        dir: a.dir,
        images: a.images,
        image_size: a.image_size,
        steps: a.steps,
        ranks: a.ranks,
        latent: a.latent,
        no_train: a.no_train,
    };
    let radit = std::env::current_exe().context("locating the radit binary")?;
    let signal = run_cli::stop_signal()?;
    radit_run::quickstart::quickstart(&q, &radit, &signal, &mut |said| match said {
        Said::Stage(line) => println!("{line}"),
        Said::RunEnded(end) => eprintln!("{end}"),
    })
    .map_err(exit::unwrapped)
}

fn run_batches(a: BatchesArgs) -> anyhow::Result<u8> {
    // The run's settings (a job file's paths resolved against it), then the flags over them.
    let run = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let (train, world) = if text.lines().any(|l| l.trim() == "[job]") {
                let job = radit_run::job::Job::load(path)?;
                let Some(t) = job.train() else {
                    exit::bail_usage!(
                        "{}: not a training job: it reads no batches",
                        path.display()
                    );
                };
                ((**t).clone(), Some(u64::from(job.world)))
            } else {
                ((*radit_jobs::train::TrainConfig::load(path)?).clone(), None)
            };
            Some((train, world))
        }
        None => None,
    };
    let from_run =
        |f: &dyn Fn(&radit_jobs::train::TrainConfig) -> u64| run.as_ref().map(|(t, _)| f(t));
    let url = a
        .url
        .clone()
        .or_else(|| run.as_ref().map(|(t, _)| t.data.url.clone()))
        .ok_or_else(|| exit::usage!("give the store's URL or --config"))?;
    let reader = StoreReader::open(Storage::open_existing(&url)?)
        .with_context(|| format!("opening {url}"))?;
    let req = AuditRequest {
        split: a
            .split
            .or(run.as_ref().map(|(t, _)| t.data.split))
            .unwrap_or(Split::Train),
        seed: a
            .seed
            .or(from_run(&|t| t.train.seed))
            .ok_or_else(|| exit::usage!("--seed (or --config)"))?,
        window_shards: a
            .window_shards
            .or(from_run(&|t| t.data.window_shards))
            .unwrap_or(radit_sharding::order::DEFAULT_WINDOW_SHARDS),
        global_batch: a
            .global_batch
            .or(from_run(&|t| t.train.global_batch))
            .ok_or_else(|| exit::usage!("--global-batch (or --config)"))?,
        world: a.world.or(run.as_ref().and_then(|(_, w)| *w)).unwrap_or(1),
        rank: a.rank,
        from_step: a.from_step,
        steps: a.steps,
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in audit::batches(&reader, &req)? {
        writeln!(out, "step {}: {}", s.step, s.image_ids.join(" "))?;
    }
    out.flush()?;
    Ok(0)
}

fn run_bench(a: BenchArgs) -> anyhow::Result<u8> {
    let threads = a.threads.unwrap_or_else(num_cpus_or_one);
    if threads == 0 {
        return Err(exit::usage!("--threads must be at least 1"));
    }
    if !(a.cache_gib > 0.0 && a.cache_gib.is_finite()) {
        exit::bail_usage!(
            "--cache-gib must be a positive number (got {})",
            a.cache_gib
        );
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("starting the decode threads")?;
    let data = DataConfig {
        split: a.slice.split,
        window_shards: a.slice.window_shards,
        cache_dir: a.cache,
        cache_gib: a.cache_gib,
        prefetch: a.prefetch,
        ..DataConfig::new(&a.slice.url)
    };
    let config = data.loader_config(
        match a.pass {
            PassArg::Train => Pass::Train,
            PassArg::Eval => Pass::Eval,
        },
        a.seed,
        a.global_batch,
        a.slice.rank,
        a.slice.world,
        match a.input {
            InputArg::U16 => ModelInput::U16,
            InputArg::Dequantised => ModelInput::Dequantised,
            InputArg::Latents => ModelInput::Latents,
        },
    );
    let storage = Storage::open_existing(&a.slice.url)?;
    let read = || format!("reading {}", a.slice.url);
    let report = if a.ceiling {
        throughput::measure_ceiling(storage, &config, a.verify)
            .with_context(read)?
            .report(&a.slice.url, threads, a.verify, a.json)
    } else {
        throughput::measure_loader(storage, config, a.steps, a.digest)
            .with_context(read)?
            .report(&a.slice.url, threads, a.json)
    };
    println!("{report}");
    Ok(0)
}

fn num_cpus_or_one() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn run_info() -> anyhow::Result<u8> {
    println!("{}", radit_engine::runtime::probe());
    println!(
        "fault injection: {}",
        if cfg!(feature = "fault-injection") {
            "compiled in (a test build: RADIT_FAULT_* variables make ranks fail on purpose)"
        } else {
            "not compiled in"
        }
    );
    Ok(0)
}

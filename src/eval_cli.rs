//! `radit eval ...`: thin argument parsing over radit_eval.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use radit_eval::fidelity::{CSV_HEADER, FidelityConfig, fidelity};
use radit_eval::io::read_npy;
use radit_eval::kd::KdConfig;
use radit_jobs::features_job::{FeaturesConfig, extract};
use radit_jobs::journal::RankError;
use radit_jobs::recon_job::{ReconConfig, reconstruct};
use radit_jobs::train::validate::features_network;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// FD, KD, precision, recall, density and coverage of generated features against real ones: JSON on stdout and
    /// (with --csv) one row per (model, reference, network) appended to a table.
    Fidelity(FidelityArgs),
    /// Features of a store split's images (or of `radit generate`'s samples) through a feature network (a
    /// DINOv2-family snapshot such as Rad-DINO, or a TorchScript module with its own preprocessing): an [N, D]
    /// float32 .npy, the image ids (.ids.txt) and what they are of (.json); resumable unit by unit, cached with
    /// --cache, and distributed as a `[job] kind = "features"` job under `radit run`.
    Features(FeaturesArgs),
    /// An autoencoder's reconstructions of a store split (Table 2): each image through the encoder's mean and the
    /// decoder of any autoencoder file (FLUX.2 as released, a merged fine-tune, RadVAE), written as 16-bit PNGs
    /// in a samples directory (`eval features --samples` reads it: rFD), with PSNR and SSIM per image in recon.csv
    /// and their means in recon.json; resumable shard by shard, and distributed as a `[job] kind = "recon"` job.
    Recon(ReconArgs),
    /// How much of a patient `radit edit`'s edits keep (Table 14): per edit SSIM, the Rad-DINO perceptual distance
    /// (LPIPS-style) and its relative form over random pairs of real images, and with an attention-pooling
    /// predictor the attribute cosine over the variables not intervened on; identity.csv and identity.json in
    /// --out, and one row per (model, intervention) in --csv.
    Identity(IdentityArgs),
    /// The expert reader study (the paper's Figure 2): prepare N real and N generated images as 8-bit PNGs under
    /// opaque names with a response sheet per presentation and a sealed key, then score the filled sheets
    /// (accuracy per reader with a binomial test, intra-rater agreement, pairwise Cohen's kappa).
    #[command(subcommand)]
    ReaderStudy(ReaderStudyCommand),
    /// A small DINOv2 snapshot with random weights (config.json, model.safetensors, preprocessor_config.json), to
    /// try `eval features` and `eval fidelity` offline: its features measure nothing (use Rad-DINO for results).
    RandomDinov2 {
        /// The snapshot directory to write.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
}

#[derive(Args)]
pub struct FeaturesArgs {
    /// A TOML file with a [features] section (what `radit run` writes for a features job's ranks); or the flags.
    #[arg(long, conflicts_with_all = ["store", "samples", "net", "out"])]
    config: Option<PathBuf>,
    /// The store (a path or URL) whose split's images to embed.
    #[arg(long, conflicts_with = "samples")]
    store: Option<String>,
    /// Or the samples of a finished `radit generate` (its output directory), in samples.csv's order; their ids are
    /// the profiles' image ids (`ID#k` for the k-th sample of a profile, k > 0).
    #[arg(long)]
    samples: Option<PathBuf>,
    /// train, val or test; or any (with --ids: each id wherever it is, as CheXGenBench's reference set needs).
    #[arg(long, default_value = "test")]
    split: String,
    /// Only the store's rows with these image ids (an id list, as `radit data select` writes), in store order.
    #[arg(long, requires = "store")]
    ids: Option<PathBuf>,
    /// The network: a directory is a Hugging Face snapshot of a DINOv2 model (config.json, model.safetensors,
    /// preprocessor_config.json; Rad-DINO is one), whose CLS token after the final LayerNorm is the feature; a
    /// file is a TorchScript module, [B, 3, S, S] in [0, 1] -> [B, D].
    #[arg(long, required_unless_present = "config")]
    net: Option<PathBuf>,
    /// A TorchScript module's input side S (images are resized to it, bilinear, when they differ).
    #[arg(long)]
    input_size: Option<i64>,
    /// A DINOv2 snapshot's preprocessing: `processor` (its image processor, exactly) or `chexgenbench`
    /// (CheXGenBench's 299 x 299 8-bit step before it).
    #[arg(long, default_value = "processor")]
    preprocessing: String,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Generated files per unit of work (a store's unit is its shard); each unit is committed as a part file.
    #[arg(long, default_value_t = 256)]
    unit_images: u64,
    /// Keep the finished features here, keyed by (source, split, network, preprocessing), and answer the same
    /// request from here.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// cpu, cuda or cuda:N (default: the GPU when there is one).
    #[arg(long)]
    device: Option<String>,
    /// libtorch intra-op threads per rank (default: this process's cores shared among the node's ranks).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// The features file (.npy); .ids.txt and .json go beside it.
    #[arg(long, required_unless_present = "config")]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct ReconArgs {
    /// A TOML file with a [recon] section (what `radit run` writes for a recon job's ranks); or the flags.
    #[arg(long, conflicts_with_all = ["store", "weights", "out"])]
    config: Option<PathBuf>,
    /// The store (a path or URL) whose split's images to reconstruct.
    #[arg(long, required_unless_present = "config")]
    store: Option<String>,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Only the split's first N images.
    #[arg(long)]
    limit: Option<u64>,
    /// The autoencoder's weights (FLUX.2's release, `radit vae finetune`'s best, RadVAE's).
    #[arg(long, required_unless_present = "config")]
    weights: Option<PathBuf>,
    /// auto (what the weights file says), flux2, tiny, radvae or radvae-tiny.
    #[arg(long, default_value = "auto")]
    autoencoder: String,
    /// RGB to grey in place of the file's: mean or luma (FLUX-family decoders).
    #[arg(long)]
    grey: Option<String>,
    /// Images through the autoencoder at once.
    #[arg(long, default_value_t = 8)]
    batch: u64,
    /// Replace an output directory of other weights or images.
    #[arg(long)]
    overwrite: bool,
    /// cpu, cuda or cuda:N (default: the GPU when there is one).
    #[arg(long)]
    device: Option<String>,
    /// libtorch intra-op threads per rank (default: this process's cores shared among the node's ranks).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    /// The output directory.
    #[arg(long, required_unless_present = "config")]
    out: Option<PathBuf>,
}

impl ReconArgs {
    fn config(&self) -> anyhow::Result<ReconConfig> {
        if let Some(file) = &self.config {
            return Ok(ReconConfig::load(file)?);
        }
        let (Some(store), Some(weights), Some(out)) = (&self.store, &self.weights, &self.out)
        else {
            crate::exit::bail_usage!("give --config, or --store, --weights and --out");
        };
        let grey = match self.grey.as_deref() {
            None => None,
            Some("mean") => Some(radit_models::autoencoder::Grey::Mean),
            Some("luma") => Some(radit_models::autoencoder::Grey::Luma),
            Some(other) => crate::exit::bail_usage!("--grey {other}: mean or luma"),
        };
        let cfg = ReconConfig {
            split: self
                .split
                .parse()
                .map_err(|e| crate::exit::usage!("--split: {e}"))?,
            limit: self.limit,
            autoencoder: self.autoencoder.clone(),
            grey,
            batch: self.batch,
            overwrite: self.overwrite,
            ..ReconConfig::new(store, weights, out)
        };
        cfg.validate().map_err(RankError::Config)?;
        Ok(cfg)
    }
}

fn run_recon(a: ReconArgs) -> anyhow::Result<u8> {
    let cfg = a.config()?;
    let run = unit_job_rank(a.device.as_deref(), a.threads, |comm, device, handles| {
        reconstruct(&cfg, comm, device, handles)
    })?;
    if let Some(s) = &run.summary {
        println!("{}", serde_json::to_string(s)?);
    }
    Ok(crate::exit::done_or_requeue(run.stopped_for_requeue))
}

/// This process as one rank of a unit job on `--device` with `--threads`: the job's summary.
fn unit_job_rank<S: serde::Serialize>(
    device: Option<&str>,
    threads: Option<u16>,
    job: impl FnOnce(
        &dyn radit_engine::collective::Collective,
        radit_models::tch::Device,
        &radit_jobs::journal::RankHandles,
    ) -> Result<S, RankError>,
) -> anyhow::Result<S> {
    let device = crate::rank_args::device_or_gpu(device)?;
    if threads.is_some() {
        radit_engine::threads::apply(threads.map(usize::from), None);
    }
    let done = crate::rank_args::run_rank(
        device,
        |comm, handles| job(comm.as_ref(), device, handles),
        RankError::repeats,
    )?;
    Ok(done.summary)
}

impl FeaturesArgs {
    fn config(&self) -> anyhow::Result<FeaturesConfig> {
        if let Some(file) = &self.config {
            return Ok(FeaturesConfig::load(file)?);
        }
        let (Some(net), Some(out)) = (&self.net, &self.out) else {
            crate::exit::bail_usage!("give --config, or --net and --out");
        };
        let cfg = FeaturesConfig {
            net: net.clone(),
            input_size: self.input_size,
            preprocessing: self.preprocessing.clone(),
            store: self.store.clone(),
            split: self
                .split
                .parse()
                .map_err(|e| crate::exit::usage!("--split: {e}"))?,
            ids: self.ids.clone(),
            samples: self.samples.clone(),
            out: out.clone(),
            batch: self.batch,
            unit_images: self.unit_images,
            cache: self.cache.clone(),
        };
        cfg.validate().map_err(RankError::Config)?;
        Ok(cfg)
    }
}

#[derive(Args)]
pub struct FidelityArgs {
    /// Real (reference) features: an [N, D] float32 or float64 .npy.
    #[arg(long)]
    real: PathBuf,
    /// Generated features, of the same network.
    #[arg(long)]
    fake: PathBuf,
    /// Neighbours for precision, recall, density and coverage.
    #[arg(long, default_value_t = 5)]
    k: usize,
    #[arg(long, default_value_t = 100)]
    kd_subsets: usize,
    /// Rows per KD subset, or `min` for the smaller set's size (CheXGenBench: every subset is the full set).
    #[arg(long, default_value = "1000")]
    kd_subset_size: String,
    /// Draws of the reference set (Table 13's sensitivity test), each of --draw-size rows.
    #[arg(long, requires = "draw_size")]
    reference_draws: Option<usize>,
    #[arg(long, requires = "reference_draws")]
    draw_size: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Names for the CSV row.
    #[arg(long, default_value = "")]
    model: String,
    #[arg(long, default_value = "")]
    reference: String,
    #[arg(long, default_value = "")]
    network: String,
    /// Append the row to this CSV (the header is written when the file is new).
    #[arg(long)]
    csv: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ReaderStudyCommand {
    /// Draw the images (seeded), write them with opaque names, one shuffled sheet per presentation, and the key
    /// in sealed/ (its sha256 in study.json).
    Prepare {
        /// The store whose split gives the real images.
        #[arg(long)]
        store: String,
        #[arg(long, default_value = "test")]
        split: radit_sharding::split::Split,
        /// A finished `radit generate` output directory (of the store's image size).
        #[arg(long)]
        samples: PathBuf,
        /// Real images, and as many synthetic ones (the paper: 50).
        #[arg(long, default_value_t = 50)]
        count: u64,
        /// Presentations, each in its own shuffled order (the paper: 2).
        #[arg(long, default_value_t = 2)]
        presentations: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The study's folder (images/, presentation-P.csv, study.json, sealed/key.csv); must not hold a study.
        #[arg(long)]
        out: PathBuf,
    },
    /// Score the filled sheets of a study against its sealed key.
    Score {
        /// The study's folder.
        #[arg(long)]
        study: PathBuf,
        /// Filled sheets (reader,presentation,position,image,answer), one per reader and presentation or joined.
        #[arg(required = true)]
        responses: Vec<PathBuf>,
        /// Also write the scores as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn run_reader_study(cmd: ReaderStudyCommand) -> anyhow::Result<u8> {
    use radit_jobs::reader_study;
    match cmd {
        ReaderStudyCommand::Prepare {
            store,
            split,
            samples,
            count,
            presentations,
            seed,
            out,
        } => {
            let study = reader_study::prepare(&reader_study::PrepareConfig {
                store,
                split,
                samples,
                count,
                presentations,
                seed,
                out: out.clone(),
            })?;
            println!(
                "{} images ({count} real, {count} synthetic) in {}/images; sheets {}; key sealed in {}/sealed (sha256 {})",
                study.images,
                out.display(),
                (1..=presentations)
                    .map(reader_study::sheet_name)
                    .collect::<Vec<_>>()
                    .join(", "),
                out.display(),
                &study.key_sha256[..16]
            );
            Ok(0)
        }
        ReaderStudyCommand::Score {
            study,
            responses,
            json,
        } => {
            let score = reader_study::score(&study, &responses)?;
            print!("{}", reader_study::table(&score));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&score)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(0)
        }
    }
}

pub fn run_eval(cmd: EvalCommand) -> anyhow::Result<u8> {
    match cmd {
        EvalCommand::ReaderStudy(c) => run_reader_study(c),
        EvalCommand::Fidelity(a) => run_fidelity(a),
        EvalCommand::Features(a) => run_features(a),
        EvalCommand::Recon(a) => run_recon(a),
        EvalCommand::Identity(a) => run_identity(a),
        EvalCommand::RandomDinov2 { out, seed } => {
            radit_models::features::write_random_snapshot(&out, seed)?;
            println!(
                "wrote a random DINOv2 snapshot to {} (for trying the evaluation path: its features measure \
                 nothing; pass --net {} to `radit eval features`)",
                out.display(),
                out.display()
            );
            Ok(0)
        }
    }
}

fn run_features(a: FeaturesArgs) -> anyhow::Result<u8> {
    let cfg = a.config()?;
    let summary = unit_job_rank(a.device.as_deref(), a.threads, |comm, device, handles| {
        extract(&cfg, comm, device, handles)
    })?;
    if let Some(report) = &summary.report {
        println!("{report}");
    }
    Ok(crate::exit::done_or_requeue(summary.stopped_for_requeue))
}

/// Sets too small for the numbers to mean much: fewer rows than the feature width makes the covariance singular
/// (FD is then dominated by its rank deficit), and fewer than 1,000 leaves FD biased upwards and PRDC's k-NN
/// radii coarse.
fn small_set_warnings(sets: &[(&std::path::Path, &radit_eval::Features)]) -> Vec<String> {
    let mut said = Vec::new();
    for (path, f) in sets {
        if f.rows() <= f.dim() {
            said.push(format!(
                "{} has {} rows of {}-d features: with no more rows than dimensions the covariance is singular, \
                 so FD and the other metrics are not meaningful",
                path.display(),
                f.rows(),
                f.dim()
            ));
        } else if f.rows() < 1000 {
            said.push(format!(
                "{} has {} rows: below 1,000 FD is biased upwards and precision/recall are coarse; compare only \
                 with numbers from sets of the same size",
                path.display(),
                f.rows()
            ));
        }
    }
    said
}

fn run_fidelity(a: FidelityArgs) -> anyhow::Result<u8> {
    let subset_size = match a.kd_subset_size.as_str() {
        "min" => None,
        n => Some(n.parse::<usize>().map_err(|_| {
            crate::exit::usage!("--kd-subset-size `{n}`: a number of rows, or min")
        })?),
    };
    let cfg = FidelityConfig {
        k: a.k,
        kd: KdConfig {
            subsets: a.kd_subsets,
            subset_size,
            seed: a.seed,
        },
        draws: a.reference_draws.zip(a.draw_size),
        seed: a.seed,
    };
    // Features of different networks (or preprocessing) are not comparable: refuse what the files say apart.
    if let (Some(r), Some(f)) = (features_network(&a.real), features_network(&a.fake))
        && r != f
    {
        return Err(crate::exit::usage!(
            "{} holds features of `{r}` but {} of `{f}`: compute both with the same network and preprocessing",
            a.real.display(),
            a.fake.display()
        ));
    }
    let real = read_npy(&a.real)?;
    let fake = read_npy(&a.fake)?;
    for warning in small_set_warnings(&[(&a.real, &real), (&a.fake, &fake)]) {
        eprintln!("radit: warning: {warning}");
    }
    let started = std::time::Instant::now();
    let result = fidelity(&real, &fake, &cfg)?;
    let mut report = serde_json::to_value(&result)?;
    report["seconds"] = started.elapsed().as_secs_f64().into();
    report["config"] = serde_json::to_value(&cfg)?;
    println!("{report}");
    if let Some(path) = &a.csv {
        let new = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            writeln!(file, "{CSV_HEADER}")?;
        }
        writeln!(
            file,
            "{}",
            result.csv_row(&a.model, &a.reference, &a.network, &cfg)
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(0)
}

#[derive(Args)]
pub struct IdentityArgs {
    /// A finished `radit edit` directory.
    #[arg(long)]
    edits: PathBuf,
    /// The perceptual network: Rad-DINO's Hugging Face snapshot.
    #[arg(long)]
    perceptual_net: PathBuf,
    /// sum or mean over the network's layers.
    #[arg(long, default_value = "sum")]
    layers: String,
    /// An attention-pooling predictor file (`radit predictors train`), for the attribute cosine.
    #[arg(long)]
    predictor: Option<PathBuf>,
    /// The predictor's backbone, in place of the path its file records.
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// The store whose split's random pairs of real images normalise the distance (rLPIPS).
    #[arg(long)]
    store: String,
    #[arg(long, default_value = "test")]
    split: String,
    /// Random real pairs.
    #[arg(long, default_value_t = 5000)]
    pairs: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
    /// Append one row per (model, intervention), and the real pairs', to this table.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// The model's name in the table.
    #[arg(long, default_value = "model")]
    name: String,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// cpu, cuda or cuda:N (default: the GPU when there is one).
    #[arg(long)]
    device: Option<String>,
}

fn run_identity(a: IdentityArgs) -> anyhow::Result<u8> {
    use radit_jobs::identity::{self, IdentityEval};
    crate::exit::ensure_usage!(
        a.batch > 0 && a.pairs > 0,
        "--batch and --pairs must be at least 1"
    );
    let reduce = match a.layers.as_str() {
        "sum" => radit_models::features::LayerReduce::Sum,
        "mean" => radit_models::features::LayerReduce::Mean,
        other => crate::exit::bail_usage!("--layers {other}: sum or mean"),
    };
    let device = crate::rank_args::device_or_gpu(a.device.as_deref())?;
    let report = identity::evaluate(&IdentityEval {
        edits: a.edits.clone(),
        perceptual_net: a.perceptual_net.clone(),
        reduce,
        predictor: a.predictor.clone(),
        backbone: a.backbone.clone(),
        store: a.store.clone(),
        split: a
            .split
            .parse()
            .map_err(|e| crate::exit::usage!("--split: {e}"))?,
        pairs: a.pairs,
        seed: a.seed,
        out: a.out.clone(),
        batch: a.batch,
        device,
        precision: radit_models::model::Precision::default_on(device),
    })?;
    println!("{}", serde_json::to_string(&report)?);
    if let Some(path) = &a.csv {
        for row in identity::csv_rows(&a.name, &report) {
            radit_jobs::predict_eval::append_row(path, identity::CSV_HEADER, &row)?;
        }
    }
    Ok(0)
}

//! `radit predictors`: train a metadata predictor, and score one on a split, on samples or on edits.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use radit_jobs::predict_eval::{self, ImageSource, PredictEval};
use radit_models::model::Precision;
use radit_models::network::Architecture;

use crate::rank_args::{PrecisionArg, device_or_gpu};

#[derive(Subcommand)]
pub enum PredictorsCommand {
    /// Train a metadata predictor (`[model.predictor]`: a linear probe, an MLP adapter or attention pooling on a
    /// frozen Rad-DINO snapshot, or a ResNet-50) on a store's images, labels and age: `radit train` for such a
    /// config, data-parallel over ranks, with EMA, checkpoints and resume; its best weights (`[validation] best`)
    /// or `radit export` make the predictor file. Under `radit run` as a job of kind predictor.
    Train(crate::train_cli::TrainArgs),
    /// Score a predictor file: ROC-AUC per variable (a finding or sex: the positive class; race, view, dataset:
    /// one-vs-rest macro) and age MAE in years, against a store split's metadata (--store), the conditioning of
    /// `radit generate`'s samples (--samples) or the counterfactual profiles of `radit edit`'s edits (--edits).
    /// Writes predictions.csv and metrics.json to --out, a row of --csv, and (--embeddings) the attention
    /// pooling's per-task embeddings.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct EvalArgs {
    /// The predictor file.
    #[arg(long)]
    weights: PathBuf,
    /// The backbone (a DINO snapshot directory, or torchvision's ResNet file), in place of the path the file
    /// records.
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// A store (path or URL): its split's images against their metadata.
    #[arg(long, conflicts_with_all = ["samples", "edits"], required_unless_present_any = ["samples", "edits"])]
    store: Option<String>,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// Only the split's first N images.
    #[arg(long)]
    limit: Option<u64>,
    /// A finished `radit generate` directory: its samples against the profiles they were drawn for.
    #[arg(long, conflicts_with = "edits")]
    samples: Option<PathBuf>,
    /// A finished `radit edit` directory: the edited images against the counterfactual profiles.
    #[arg(long)]
    edits: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Append one row (the model name, the source, each variable's score) to this table.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// The model's name in the table's row.
    #[arg(long, default_value = "predictor")]
    name: String,
    /// Write the attention pooling's per-task embeddings (embeddings.npy, [N, tasks x D], predictions.csv's order).
    #[arg(long)]
    embeddings: bool,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// cpu, cuda or cuda:N (default: the GPU when there is one).
    #[arg(long)]
    device: Option<String>,
    /// The backbone's compute precision (default: bf16 on GPUs, fp32 on CPUs).
    #[arg(long, value_enum)]
    precision: Option<PrecisionArg>,
}

pub fn run_predictors(c: PredictorsCommand) -> anyhow::Result<u8> {
    match c {
        PredictorsCommand::Train(a) => crate::train_cli::run_train_of(
            a,
            |m| matches!(m, Architecture::Predictor(_)),
            "a metadata predictor ([model.predictor])",
        ),
        PredictorsCommand::Eval(a) => run_eval(a),
    }
}

fn run_eval(a: EvalArgs) -> anyhow::Result<u8> {
    crate::exit::ensure_usage!(a.batch > 0, "--batch must be at least 1");
    let source = match (&a.store, &a.samples, &a.edits) {
        (Some(store), _, _) => ImageSource::Store {
            store: store.clone(),
            split: a
                .split
                .parse()
                .map_err(|e| crate::exit::usage!("--split: {e}"))?,
            limit: a.limit,
        },
        (None, Some(dir), _) => ImageSource::Listed(dir.join(radit_jobs::journal::SAMPLES_CSV)),
        (None, None, Some(dir)) => ImageSource::Listed(dir.join(radit_jobs::edit_job::EDITS_CSV)),
        _ => crate::exit::bail_usage!("give --store, --samples or --edits"),
    };
    let device = device_or_gpu(a.device.as_deref())?;
    let precision = a
        .precision
        .map(Precision::from)
        .unwrap_or_else(|| Precision::default_on(device));
    let metrics = predict_eval::evaluate(&PredictEval {
        weights: a.weights.clone(),
        backbone: a.backbone.clone(),
        source,
        out: a.out.clone(),
        batch: a.batch,
        embeddings: a.embeddings,
        device,
        precision,
    })?;
    println!("{}", serde_json::to_string(&metrics)?);
    if let Some(path) = &a.csv {
        predict_eval::append_row(
            path,
            &predict_eval::csv_header(),
            &predict_eval::csv_row(&a.name, &metrics),
        )?;
    }
    Ok(0)
}

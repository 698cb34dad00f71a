//! `radit edit`: thin argument parsing over radit_jobs::edit_job, as one process or as a rank of `radit run`.

use std::path::PathBuf;

use clap::Args;
use radit_jobs::edit_job::{EditConfig, edit};
use radit_jobs::journal::RankError;

#[derive(Args)]
pub struct EditArgs {
    /// A TOML file with an [edit] section (what `radit run` writes for an edit job's ranks); or give --weights,
    /// --store, --scm and --out.
    #[arg(long, conflicts_with_all = ["weights", "store", "scm", "out"])]
    config: Option<PathBuf>,
    /// The flow model's weights (e.g. `radit export` of a run's EMA).
    #[arg(long, required_unless_present = "config")]
    weights: Option<PathBuf>,
    /// The architecture, for weights without radit's metadata.
    #[arg(long)]
    preset: Option<String>,
    /// The store whose split's patients are edited (a latent model edits its latents: run `radit encode` first).
    #[arg(long, required_unless_present = "config")]
    store: Option<String>,
    /// train, val or test.
    #[arg(long, default_value = "test")]
    split: String,
    /// The Flow SCM (`radit scm train`'s file): the counterfactual profiles.
    #[arg(long, required_unless_present = "config")]
    scm: Option<PathBuf>,
    /// Patients drawn with --seed, one image each.
    #[arg(long, default_value_t = 5000)]
    patients: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The variables intervened on, comma-separated (default: sex, race, age, view, dataset, pleural_effusion).
    #[arg(long, value_delimiter = ',')]
    interventions: Vec<String>,
    /// Edit random samples of a fixed noise per patient instead of the patients' images (the baseline rows).
    #[arg(long)]
    from_noise: bool,
    /// The ODE solver (dopri5 at the paper's 1e-5 by default).
    #[command(flatten)]
    solver: crate::model_cli::SolverArgs,
    /// For a latent model: the decoder's weights (its standardisation undone with the store's statistics).
    #[arg(long)]
    decoder: Option<PathBuf>,
    /// The output directory: images/edited/<variable>/*.png, images/original/*.png, edits.csv.
    #[arg(long, required_unless_present = "config")]
    out: Option<PathBuf>,
    /// Images solved at once (one unit of work).
    #[arg(long, default_value_t = 16)]
    batch: u64,
    /// fp32 or bf16 (default: bf16 on GPUs, fp32 on CPUs).
    #[arg(long, value_enum)]
    precision: Option<crate::rank_args::PrecisionArg>,
    /// Replace edits of another model, SCM, store or setting in --out.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    rank: crate::rank_args::RankArgs,
}

impl EditArgs {
    fn config(&self) -> anyhow::Result<EditConfig> {
        if let Some(file) = &self.config {
            return Ok(EditConfig::load(file)?);
        }
        let (Some(weights), Some(store), Some(scm), Some(out)) =
            (&self.weights, &self.store, &self.scm, &self.out)
        else {
            crate::exit::bail_usage!("give --config, or --weights, --store, --scm and --out");
        };
        let split = self
            .split
            .parse()
            .map_err(|e| crate::exit::usage!("--split: {e}"))?;
        let defaults = EditConfig::new(weights, store, scm, out);
        let cfg = EditConfig {
            preset: self.preset.clone(),
            split,
            patients: self.patients,
            seed: self.seed,
            interventions: if self.interventions.is_empty() {
                defaults.interventions.clone()
            } else {
                self.interventions
                    .iter()
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect()
            },
            from_noise: self.from_noise,
            solver: self.solver.solver(1e-5)?,
            decoder: self
                .decoder
                .as_ref()
                .map(|w| radit_models::autoencoder::DecoderConfig {
                    weights: w.clone(),
                    autoencoder: radit_models::autoencoder::AUTO.into(),
                    batch: 4,
                }),
            batch: self.batch,
            precision: self.precision.map(Into::into),
            overwrite: self.overwrite,
            ..defaults
        };
        cfg.validate().map_err(RankError::Config)?;
        Ok(cfg)
    }
}

pub fn run_edit(a: EditArgs) -> anyhow::Result<u8> {
    let cfg = a.config()?;
    let device = a.rank.device()?;
    let done = crate::rank_args::run_rank(
        device,
        |comm, handles| edit(&cfg, comm.as_ref(), device, handles),
        RankError::repeats,
    )?;
    let (summary, rank) = (done.summary, done.rank);
    if rank == 0 && summary.finished {
        println!(
            "radit: {} holds the edits (images/, edits.csv); {} written here ({:.1} model evaluations per image, \
             {:.2} images/s; {:.2} s in the model's solves, {:.2} s in the SCM), {} units resumed",
            cfg.out.display(),
            summary.edits_written,
            summary.nfe_per_image,
            summary.images_per_second,
            summary.solve_seconds,
            summary.scm_seconds,
            summary.units_resumed
        );
    }
    Ok(crate::exit::done_or_requeue(summary.stopped_for_requeue))
}

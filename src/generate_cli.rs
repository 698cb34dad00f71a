//! `radit generate`: thin argument parsing over radit_jobs::generate_job, as one process or as a rank of
//! `radit run`.

use std::path::PathBuf;

use clap::Args;
use radit_jobs::generate_job::{GenerateConfig, generate};
use radit_jobs::journal::RankError;

#[derive(Args)]
pub struct GenerateArgs {
    /// A TOML file with a [generate] section (what `radit run` writes for a generate job's ranks); or give
    /// --weights, --profiles and --out.
    #[arg(long, conflicts_with_all = ["weights", "profiles", "out"])]
    config: Option<PathBuf>,
    /// The model's weights (e.g. `radit export` of a run's EMA).
    #[arg(long, required_unless_present = "config")]
    weights: Option<PathBuf>,
    /// The architecture, for weights without radit's metadata.
    #[arg(long)]
    preset: Option<String>,
    /// The store whose split gives the profiles: one sample per row, with that row's 19 variables.
    #[arg(long, required_unless_present = "config")]
    profiles: Option<String>,
    /// train, val or test; or any (with --ids: each id wherever it is, as CheXGenBench's reference set needs).
    #[arg(long, default_value = "test")]
    split: String,
    /// Only these image ids (an id list, as `radit data select` writes: one per line, # comments).
    #[arg(long)]
    ids: Option<PathBuf>,
    /// At most this many profiles.
    #[arg(long)]
    limit: Option<u64>,
    #[arg(long, default_value_t = 1)]
    per_profile: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The ODE solver (dopri5 at the paper's 1e-5 by default).
    #[command(flatten)]
    solver: crate::model_cli::SolverArgs,
    /// The output directory: images/*.png (16-bit), samples.csv, generate.json.
    #[arg(long, required_unless_present = "config")]
    out: Option<PathBuf>,
    /// Samples solved at once.
    #[arg(long, default_value_t = 16)]
    batch: u64,
    /// Profiles per unit of work (one journal record).
    #[arg(long, default_value_t = 64)]
    unit_profiles: u64,
    /// fp32 or bf16 (default: bf16 on GPUs, fp32 on CPUs).
    #[arg(long, value_enum)]
    precision: Option<crate::rank_args::PrecisionArg>,
    /// Replace samples of other weights, profiles, seed or solver in --out.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    rank: crate::rank_args::RankArgs,
}

impl GenerateArgs {
    fn config(&self) -> anyhow::Result<GenerateConfig> {
        if let Some(file) = &self.config {
            return Ok(GenerateConfig::load(file)?);
        }
        let (Some(weights), Some(profiles), Some(out)) = (&self.weights, &self.profiles, &self.out)
        else {
            crate::exit::bail_usage!("give --config, or --weights, --profiles and --out");
        };
        let split = self
            .split
            .parse()
            .map_err(|e| crate::exit::usage!("--split: {e}"))?;
        let solver = self.solver.solver(1e-5)?;
        let cfg = GenerateConfig {
            preset: self.preset.clone(),
            split,
            ids: self.ids.clone(),
            limit: self.limit,
            per_profile: self.per_profile,
            seed: self.seed,
            solver,
            batch: self.batch,
            unit_profiles: self.unit_profiles,
            precision: self.precision.map(Into::into),
            overwrite: self.overwrite,
            ..GenerateConfig::new(weights, profiles, out)
        };
        cfg.validate().map_err(RankError::Config)?;
        Ok(cfg)
    }
}

pub fn run_generate(a: GenerateArgs) -> anyhow::Result<u8> {
    let cfg = a.config()?;
    let device = a.rank.device()?;
    let done = crate::rank_args::run_rank(
        device,
        |comm, handles| generate(&cfg, comm.as_ref(), device, handles),
        RankError::repeats,
    )?;
    let (summary, rank) = (done.summary, done.rank);
    if rank == 0 && summary.finished {
        println!(
            "radit: {} holds the samples (images/, samples.csv); {} written here, {} units resumed",
            cfg.out.display(),
            summary.samples_written,
            summary.units_resumed
        );
    }
    Ok(crate::exit::done_or_requeue(summary.stopped_for_requeue))
}

//! `radit encode`: thin argument parsing over radit_jobs::encode, as one process or as a rank of `radit run`.

use std::path::PathBuf;

use clap::Args;
use radit_jobs::encode::{EncodeConfig, encode};
use radit_jobs::journal::RankError;

#[derive(Args)]
pub struct EncodeArgs {
    /// A TOML file with an [encode] section (what `radit run` writes for an encode job's ranks); or give --store
    /// and --weights.
    #[arg(long, conflicts_with_all = ["store", "weights"])]
    config: Option<PathBuf>,
    /// The store to add `<split>/latents` to (a finished `radit shard` output).
    #[arg(long, required_unless_present = "config")]
    store: Option<String>,
    /// The autoencoder's safetensors (the original release's naming or diffusers').
    #[arg(long, required_unless_present = "config")]
    weights: Option<PathBuf>,
    /// auto (what the weights file says it is; FLUX.2's release says nothing and is flux2), flux2 or tiny.
    #[arg(long, default_value = "auto")]
    autoencoder: String,
    /// The image side the encoder is meant for (default 512 for flux2).
    #[arg(long)]
    image_size: Option<u32>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: i64,
    /// fp32 or bf16 (default: bf16 on GPUs, fp32 on CPUs).
    #[arg(long, value_enum)]
    precision: Option<crate::rank_args::PrecisionArg>,
    /// Replace latents (or an unfinished encode) made by another encoder.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    rank: crate::rank_args::RankArgs,
}

impl EncodeArgs {
    fn config(&self) -> anyhow::Result<EncodeConfig> {
        if let Some(file) = &self.config {
            return Ok(EncodeConfig::load(file)?);
        }
        let (Some(store), Some(weights)) = (&self.store, &self.weights) else {
            crate::exit::bail_usage!("give --config, or --store and --weights");
        };
        let cfg = EncodeConfig {
            autoencoder: self.autoencoder.clone(),
            image_size: self.image_size,
            batch: self.batch,
            precision: self.precision.map(Into::into),
            overwrite: self.overwrite,
            ..EncodeConfig::new(store, weights)
        };
        cfg.validate().map_err(RankError::Config)?;
        Ok(cfg)
    }
}

pub fn run_encode(a: EncodeArgs) -> anyhow::Result<u8> {
    let cfg = a.config()?;
    let device = a.rank.device()?;
    let done = crate::rank_args::run_rank(
        device,
        |comm, handles| encode(&cfg, comm.as_ref(), device, handles),
        RankError::repeats,
    )?;
    let (summary, rank) = (done.summary, done.rank);
    if rank == 0 && summary.finished {
        println!(
            "radit: {} now holds <split>/latents ({} images encoded here, {} shards resumed)",
            cfg.store, summary.images_encoded, summary.shards_resumed
        );
    }
    Ok(crate::exit::done_or_requeue(summary.stopped_for_requeue))
}

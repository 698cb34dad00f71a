//! The samples a finished run leaves in its run directory: the final EMA weights as safetensors, and `[samples]
//! count` images drawn from them with a contact sheet, as `radit export` and `radit sample` would write them.

use std::path::PathBuf;

use radit_engine::checkpoint::{self, CheckpointError};
use radit_jobs::generate::{
    Conditions, Sampler, WrittenSamples, read_latents, write_decoded, write_samples,
};
use radit_models::autoencoder::LatentDecoder;
use radit_models::model::{ModelError, Precision, save_named_weights};
use radit_models::sampler::Solver;
use radit_models::tch::Device;

use crate::job::{Job, RankDevice};

#[derive(Debug, thiserror::Error)]
pub enum SamplesError {
    #[error("reading the final checkpoint")]
    Checkpoint(#[from] CheckpointError),
    #[error("drawing the samples")]
    Model(#[from] ModelError),
}

/// What [`draw_final_samples`] wrote.
#[derive(Debug)]
pub struct FinalSamples {
    pub weights: PathBuf,
    pub dir: PathBuf,
    pub written: WrittenSamples,
}

/// Exports the final EMA weights to `run_dir/final-ema.safetensors` and draws `[samples] count` samples from
/// them (Euler, `[samples] steps`) into `run_dir/samples`. `None` when the job asks for no samples.
pub fn draw_final_samples(job: &Job) -> Result<Option<FinalSamples>, SamplesError> {
    let s = &job.spec.samples;
    let Some(train) = job.train() else {
        return Ok(None);
    };
    let (Some(ckpt), true) = (&train.checkpoint, s.count > 0) else {
        return Ok(None);
    };
    let (model, step, named) = checkpoint::read_weights(&ckpt.url, true)?;
    let weights = job.run_dir.join("final-ema.safetensors");
    save_named_weights(&named, &model, &weights)?;
    let device = match job.device {
        // The supervisor's node has the job's GPUs when it runs inside the allocation; else the CPU.
        RankDevice::Cuda if radit_models::tch::Cuda::is_available() => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let precision = match device {
        Device::Cpu => Precision::Fp32,
        _ => Precision::Bf16,
    };
    let sampler = Sampler::from_named(&model, &named, device, precision)?;
    let dir = job.run_dir.join("samples");
    // As `radit sample --solver euler --steps N` draws them (seed 0, batches of 8, an unshifted grid).
    let solver = Solver::Euler {
        steps: s.steps,
        shift: 1.0,
    };
    let mut written = write_samples(
        &sampler,
        &Conditions::missing(),
        s.count,
        8,
        0,
        solver,
        &dir,
    )?;
    // A latent model's samples become images through the decoder, as `radit sample --decoder` makes them.
    if let Some(d) = &s.decoder {
        let latents = read_latents(&written.files[0])?;
        let stats = radit_models::autoencoder::store_statistics(&train.data.url)?;
        let decoder = LatentDecoder::load(d, Some(stats), device)?;
        let (files, sheet) = write_decoded(&decoder, &latents, &dir)?;
        written.files.extend(files);
        written.contact_sheet = sheet;
    }
    tracing::info!(step, count = s.count, dir = %dir.display(), "final samples");
    Ok(Some(FinalSamples {
        weights,
        dir,
        written,
    }))
}

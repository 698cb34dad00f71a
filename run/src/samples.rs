//! The samples a finished run leaves in its run directory: the final EMA weights as safetensors, and `[samples]
//! count` images drawn from them with a contact sheet, as `radit export` and `radit sample` would write them.

use std::path::PathBuf;

use radit_engine::checkpoint::{self, CheckpointError};
use radit_jobs::generate::{Sampler, WrittenSamples};
use radit_jobs::reference_samples::{Drawing, read_references, write_reference_samples};
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
/// them (Euler, `[samples] steps`) into `run_dir/samples`, one per row of the validation split with its
/// conditions (see [`radit_jobs::reference_samples`]). `None` when the job asks for no samples.
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
    // As `radit sample --solver euler --steps N` draws them (seed 0, an unshifted grid), one per row of the
    // validation split (then test, train), each beside the row's real image and captioned with its conditions.
    let solver = Solver::Euler {
        steps: s.steps,
        shift: 1.0,
    };
    let decoder = match &s.decoder {
        Some(d) => {
            let stats = radit_models::autoencoder::store_statistics(&train.data.url)?;
            Some(LatentDecoder::load(d, Some(stats), device)?)
        }
        None => None,
    };
    let references = read_references(&train.data.url, s.count as usize)?;
    let how = Drawing {
        sampler: &sampler,
        decoder: decoder.as_ref(),
        seed: 0,
        solver,
        title: format!(
            "{} step {step}, final EMA{}",
            job.spec.job.name,
            match &s.decoder {
                Some(d) if radit_models::autoencoder::is_random(&d.weights) => {
                    " (decoded by a RANDOM autoencoder: the images are noise whatever the model learnt)"
                }
                _ => "",
            }
        ),
    };
    let written = write_reference_samples(&how, &references, &dir)?;
    tracing::info!(step, count = s.count, dir = %dir.display(), "final samples");
    Ok(Some(FinalSamples {
        weights,
        dir,
        written,
    }))
}

//! The samples a training run draws from its own EMA weights: preview sheets ([`crate::train::preview`]) and the
//! in-training FD ([`crate::train::validate::MiniFd`]). One [`EmaSampling`] per run loads the latent decoders and the
//! store's latent statistics once; at a step that needs samples, one gather of the EMA weights builds the
//! [`EmaSamples`] both draw from.

use radit_engine::training::TrainingEngine;
use radit_models::autoencoder::{DecoderConfig, LatentDecoder};
use radit_models::model::ModelError;
use radit_models::network::Architecture;
use radit_models::sampler::Solver;
use tch::Tensor;

use crate::generate::{Conditions, Sampler};
use crate::train::TrainError;

/// What a run's EMA sampling keeps from start to end (shared by the samples drawn at each step).
#[derive(Clone)]
pub struct EmaSampling(std::rc::Rc<Loaded>);

struct Loaded {
    model: Architecture,
    /// The run's time shift (the Euler solver's).
    shift: f64,
    /// Each decoder the run's sheets or FD name, loaded once.
    decoders: Vec<(DecoderConfig, LatentDecoder)>,
}

impl EmaSampling {
    /// Loads `decoders` (those this rank uses) with the training latents' statistics of `store`, read once.
    pub fn open(
        model: &Architecture,
        shift: f64,
        decoders: &[&DecoderConfig],
        store: &str,
        device: tch::Device,
    ) -> Result<Self, ModelError> {
        let mut loaded: Vec<(DecoderConfig, LatentDecoder)> = Vec::new();
        if !decoders.is_empty() {
            let stats = radit_models::autoencoder::store_statistics(store)?;
            for &d in decoders {
                if !loaded.iter().any(|(c, _)| c == d) {
                    loaded.push((
                        d.clone(),
                        LatentDecoder::load(d, Some(stats.clone()), device)?,
                    ));
                }
            }
        }
        Ok(Self(std::rc::Rc::new(Loaded {
            model: model.clone(),
            shift,
            decoders: loaded,
        })))
    }

    /// The EMA weights of `engine`, gathered, as a sampler. Collective.
    pub fn samples(&self, engine: &dyn TrainingEngine) -> Result<EmaSamples, TrainError> {
        let weights = engine.gather_named(true)?;
        let sampler = Sampler::from_named(
            &self.0.model,
            &weights,
            engine.device(),
            engine.config().precision,
        )?;
        Ok(EmaSamples {
            sampling: self.clone(),
            sampler,
        })
    }

    /// `samples` through `decoder` (one of those given to [`EmaSampling::open`]).
    pub fn decode(&self, decoder: &DecoderConfig, samples: &Tensor) -> Result<Tensor, ModelError> {
        let (_, d) = self
            .0
            .decoders
            .iter()
            .find(|(c, _)| c == decoder)
            .ok_or_else(|| ModelError::BadInput {
                input: "decoder",
                reason: format!("{} was not loaded for this rank", decoder.weights.display()),
            })?;
        d.decode(samples)
    }
}

/// One gather of the EMA weights, to draw from.
pub struct EmaSamples {
    sampling: EmaSampling,
    sampler: Sampler,
}

impl EmaSamples {
    /// One sample per `conditions[i]` with the noise of index `indices[i]` of the stream `seed` (a sample depends
    /// only on those), `steps` Euler steps at the run's shift, on the CPU; decoded when `decoder` is given.
    pub fn draw_for(
        &self,
        conditions: &[&Conditions],
        indices: &[u64],
        seed: u64,
        steps: usize,
        decoder: Option<&DecoderConfig>,
    ) -> Result<Tensor, ModelError> {
        let solver = Solver::Euler {
            steps,
            shift: self.sampling.0.shift,
        };
        let (samples, _) =
            tch::no_grad(|| self.sampler.generate_for(conditions, indices, seed, solver))?;
        match decoder {
            Some(d) => self.sampling.decode(d, &samples),
            None => Ok(samples),
        }
    }
}

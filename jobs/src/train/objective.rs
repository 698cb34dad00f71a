//! What a run minimises, which the network's role decides; the loop around it is the same. A velocity network
//! (RadiT, RadUNet) learns the rectified-flow velocity; an autoencoder (RadVAE) learns to reconstruct its input
//! (`radit_models::reconstruction`); a metadata predictor learns the image's labels and age
//! (`radit_models::predictor`). Each says what the loader must deliver, computes one step's gradients on this
//! rank's batch, and scores a validation batch with the evaluated weights.

use std::collections::BTreeMap;
use std::path::Path;

use radit_sharding::loader::{Batch, ModelInput};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::generate::Sampler;
use crate::train::{MicroBatch, TrainError, ValidatedConfig, to_tensors};
use radit_engine::training::TrainingEngine;
use radit_models::block::ModelInputs;
use radit_models::flow::{FlowConfig, fill_normal, interpolate, shift_time};
use radit_models::model::{ModelError, Precision, load_named};
use radit_models::network::{Architecture, Role};
use radit_models::reconstruction::ReconstructionLoss;
use radit_models::staged::{StageInputs, StagedModel, run_stages};

/// The validation noise's stream (apart from training's).
const VALIDATION_NOISE_STREAM: u64 = 0x7a1;

/// One step's batch on the device, as the objective takes it.
pub struct StepInputs {
    /// The data (images or latents) `[n, C, H, W]`.
    pub x1: Tensor,
    pub labels: Tensor,
    pub age: Tensor,
    /// One key per sample (see `unet::dropout::keys`).
    pub keys: Tensor,
    /// The samples' global indices.
    pub indices: Vec<u64>,
    pub shape: Vec<i64>,
    pub seed: u64,
    /// The step before this one (0 for the first): what the draws are keyed by.
    pub step: u64,
}

/// The objective of a run.
pub enum Objective {
    Flow(FlowConfig),
    Reconstruction(Box<ReconstructionLoss>, EvaluatorNet),
    /// Cross-entropy per present label and the squared error of a present age, summed per sample.
    Prediction(EvaluatorNet),
}

/// The network that scores validation batches, built at the first validation and given each later one's weights:
/// building it again would read a frozen backbone's or a fine-tune's base file each time.
#[derive(Default)]
pub struct EvaluatorNet(std::sync::Mutex<Option<(VarStore, Box<dyn StagedModel>)>>);

/// What the loader delivers for `model`: a velocity network's inputs (dequantised pixels or standardised
/// latents); an autoencoder's images as stored (each 16-bit level at the centre of its bin, as `radit encode`
/// reads them), so a reconstruction's target does not change from step to step.
pub fn model_input(model: &Architecture) -> ModelInput {
    match (model.role(), model.in_channels()) {
        (Role::Autoencoder | Role::Predictor, _) => ModelInput::U16,
        (Role::Velocity, 1) => ModelInput::Dequantised,
        (Role::Velocity, _) => ModelInput::Latents,
    }
}

impl Objective {
    /// The run's objective, its networks loaded onto `device` (the perceptual network, frozen).
    pub fn open(cfg: &ValidatedConfig, device: Device) -> Result<Self, TrainError> {
        Ok(match (&cfg.reconstruction, cfg.model().role()) {
            (Some(r), Role::Autoencoder) => Self::Reconstruction(
                Box::new(ReconstructionLoss::open(r, device)?),
                EvaluatorNet::default(),
            ),
            (_, Role::Predictor) => Self::Prediction(EvaluatorNet::default()),
            _ => Self::Flow(cfg.flow),
        })
    }

    /// One step's batch as tensors on `device`: the conditions dropped first where the flow drops them, and the
    /// per-sample keys of dropout and of an autoencoder's latent sampling (keyed by global sample, so any world
    /// size draws the same).
    pub fn inputs(
        &self,
        batch: &mut Batch,
        (seed, step): (u64, u64),
        device: Device,
    ) -> Result<StepInputs, TrainError> {
        if let Self::Flow(flow) = self {
            flow.drop_conditions(
                seed,
                step,
                &batch.indices,
                &mut batch.labels,
                &mut batch.age,
            );
        }
        let (x1, labels, age) = to_tensors(batch, device)?;
        Ok(StepInputs {
            x1,
            labels,
            age,
            keys: radit_models::unet::dropout::keys(seed, step, &batch.indices),
            indices: batch.indices.clone(),
            shape: batch.sample_shape.iter().map(|&v| v as i64).collect(),
            seed,
            step,
        })
    }

    /// This rank's share of one step: forward and backward of each of `micro` micro-batches, gradients scaled by
    /// `scale`. Returns the sum of the micro-batches' losses.
    pub fn gradients(
        &self,
        engine: &mut dyn TrainingEngine,
        at: &StepInputs,
        micro: i64,
        scale: f64,
    ) -> Result<f64, TrainError> {
        let device = engine.device();
        let StepInputs {
            x1,
            labels,
            age,
            keys,
            ..
        } = at;
        let per = x1.size()[0] / micro;
        let mut loss_sum = 0.0;
        match self {
            Self::Flow(flow) => {
                let draw = flow.draw(at.seed, at.step, &at.indices, &at.shape);
                let (x0, t) = (draw.x0.to_device(device), draw.t.to_device(device));
                for k in 0..micro {
                    let s = |v: &Tensor| v.narrow(0, k * per, per);
                    let (x1, x0, t, labels, age, keys) =
                        (s(x1), s(&x0), s(&t), s(labels), s(age), s(keys));
                    let mb = MicroBatch {
                        x1: &x1,
                        x0: &x0,
                        t: &t,
                        labels: &labels,
                        age: &age,
                        keys: Some(&keys),
                    };
                    loss_sum += mb.forward_backward(engine, scale)?;
                }
            }
            Self::Reconstruction(..) | Self::Prediction(_) => {
                for k in 0..micro {
                    let s = |v: &Tensor| v.narrow(0, k * per, per);
                    let (x, labels, age, keys) = (s(x1), s(labels), s(age), s(keys));
                    let t = age.zeros_like();
                    let inputs = ModelInputs {
                        x: &x,
                        t: &t,
                        labels: &labels,
                        age: &age,
                    };
                    // The loss closure cannot return an error: the first one is kept and returned after the step.
                    let mut failed = None;
                    let local = engine.forward_backward(
                        &inputs,
                        Some(&keys),
                        &mut |outputs| match self.batch_loss(&x, (&labels, &age), outputs) {
                            Ok(l) => l,
                            Err(e) => {
                                failed.get_or_insert(e);
                                Tensor::full([], f64::NAN, (Kind::Float, device))
                            }
                        },
                        scale,
                    )?;
                    if let Some(e) = failed {
                        return Err(e.into());
                    }
                    loss_sum += local;
                }
            }
        }
        Ok(loss_sum)
    }

    /// One micro-batch's loss of a network that reads images (an autoencoder's, a predictor's).
    fn batch_loss(
        &self,
        x: &Tensor,
        (labels, age): (&Tensor, &Tensor),
        outputs: &[Tensor],
    ) -> Result<Tensor, ModelError> {
        Ok(self
            .per_sample(x, (labels, age), outputs)?
            .mean(Kind::Float))
    }

    /// Per-sample losses `[n]` of a network that reads images.
    fn per_sample(
        &self,
        x: &Tensor,
        (labels, age): (&Tensor, &Tensor),
        outputs: &[Tensor],
    ) -> Result<Tensor, ModelError> {
        match self {
            Self::Reconstruction(loss, _) => loss.per_sample(x, outputs),
            Self::Prediction(_) => {
                let predicted = outputs.first().ok_or_else(|| ModelError::BadInput {
                    input: "predictions",
                    reason: "the predictor returned nothing".into(),
                })?;
                radit_models::predictor::per_sample_loss(predicted, labels, age)
            }
            Self::Flow(_) => Err(ModelError::BadInput {
                input: "objective",
                reason: "the rectified flow scores velocities, not a network's outputs".into(),
            }),
        }
    }

    /// The evaluated weights (gathered, fp32, by name) as a network that scores validation batches.
    pub fn evaluator(
        &self,
        model: &Architecture,
        weights: &BTreeMap<String, Tensor>,
        device: Device,
        precision: Precision,
    ) -> Result<Evaluator<'_>, ModelError> {
        Ok(match self {
            Self::Flow(flow) => Evaluator::Flow {
                sampler: Sampler::from_named(model, weights, device, precision)?,
                shift: flow.shift,
            },
            Self::Reconstruction(_, cache) | Self::Prediction(cache) => {
                let mut built = cache
                    .0
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if built.is_none() {
                    let vs = VarStore::new(device);
                    let net = model.build_staged(&vs.root())?;
                    *built = Some((vs, net));
                }
                if let Some((vs, net)) = built.as_mut() {
                    load_named(vs, weights, Path::new("<gathered weights>"))?;
                    net.set_precision(precision);
                }
                Evaluator::Images {
                    built,
                    objective: self,
                }
            }
        })
    }
}

/// A network with the evaluated weights, scoring one validation batch at a time.
pub enum Evaluator<'a> {
    Flow {
        sampler: Sampler,
        shift: f64,
    },
    /// An autoencoder or a predictor, scored on its training loss.
    Images {
        built: std::sync::MutexGuard<'a, Option<(VarStore, Box<dyn StagedModel>)>>,
        objective: &'a Objective,
    },
}

impl Evaluator<'_> {
    /// Per-sample losses `[n]` (on the CPU) of a validation batch, no gradients. Flow: the mean over a fixed grid
    /// of `times` t values (midpoints, shifted as training shifts them) with noise per (seed, grid point, row), so
    /// the number is the same on any world size. Reconstruction: the training loss of the latent's mean (no
    /// sampling). Prediction: the training loss.
    pub fn losses(
        &self,
        batch: &Batch,
        (seed, times): (u64, u64),
        device: Device,
    ) -> Result<Vec<f32>, TrainError> {
        let (x1, labels, age) = to_tensors(batch, device)?;
        let n = batch.len() as i64;
        let losses = match self {
            Self::Flow { sampler, shift } => {
                let [c, h, w] = batch.sample_shape.map(|v| v as i64);
                let per = (c * h * w) as usize;
                let mut sum = Tensor::zeros([n], (Kind::Float, device));
                for j in 0..times {
                    let t = shift_time((j as f64 + 0.5) / times as f64, *shift);
                    let mut noise = vec![0f32; per * batch.len()];
                    for (out, &i) in noise.chunks_mut(per).zip(&batch.indices) {
                        fill_normal(&[seed, j, i, VALIDATION_NOISE_STREAM], out);
                    }
                    let x0 = Tensor::from_slice(&noise)
                        .view([n, c, h, w])
                        .to_device(device);
                    let tt = Tensor::full([n], t, (Kind::Float, device));
                    let v = tch::no_grad(|| {
                        sampler
                            .model
                            .velocity(&interpolate(&x1, &x0, &tt), &tt, &labels, &age)
                    })?;
                    sum += (v.to_kind(Kind::Float) - (&x1 - &x0)).square().mean_dim(
                        [1, 2, 3].as_slice(),
                        false,
                        Kind::Float,
                    );
                }
                sum / times as f64
            }
            Self::Images { built, objective } => {
                let Some((_, net)) = built.as_ref() else {
                    return Err(ModelError::BadInput {
                        input: "validation",
                        reason: "the evaluator's network was not built".into(),
                    }
                    .into());
                };
                let t = age.zeros_like();
                let at = StageInputs {
                    inputs: ModelInputs {
                        x: &x1,
                        t: &t,
                        labels: &labels,
                        age: &age,
                    },
                    keys: None,
                };
                tch::no_grad(|| {
                    let outputs = run_stages(net.as_ref(), &at)?;
                    objective.per_sample(&x1, (&labels, &age), &outputs)
                })?
            }
        };
        Ok(Vec::<f32>::try_from(losses.to_device(Device::Cpu)).map_err(ModelError::from)?)
    }
}

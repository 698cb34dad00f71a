//! The networks radit trains and uses, and their maths: no ranks, no sharding, no job. The engine wraps a
//! [`block::BlockModel`] from outside; the jobs crate runs the loops.
//!
//! - [`model`]: RadiT, its presets and costs, weights as safetensors with PyTorch names.
//! - [`block`]: what a model made of a prologue, blocks and a head exposes, for the engine to shard and schedule;
//!   [`precision`] and [`error`], which both sides share.
//! - [`autoencoder`]: the autoencoders that make latents and decode them (FLUX.2's, RadVAE (Scratch)), and the
//!   fine-tune of FLUX.2's decoder (RadVAE (LoRA)) with [`lora`] updates.
//! - [`features`]: feature networks for evaluation (DINOv2, a TorchScript module) with their preprocessing.
//! - [`flow`]: the rectified-flow objective and its per-sample noise and time draws; [`reconstruction`]: an
//!   autoencoder's (L1, KL and the Rad-DINO perceptual distance).
//! - [`sampler`]: Euler and torchdiffeq-exact dopri5, forward and reverse; counterfactual editing.
//! - [`scm`]: the Flow SCM over the metadata variables (graph, model, inference, checks, files).
//! - [`network`]: which network (RadiT, RadUNet or RadVAE) as one config, and the velocity every sampler calls;
//!   [`staged`]: a model as stages, for the data-parallel engine (any model, skip connections included).
//! - [`predictor`]: the metadata predictors (Rad-DINO probes and attention pooling, ResNet-50) that score
//!   conditioning and edits.
//! - [`unet`]: RadUNet, EDM2's magnitude-preserving U-Net as the paper's baseline, with its closed-form counts, and
//!   RadVAE (Scratch), the autoencoder of the same blocks.
//!
//! ```no_run
//! use radit_models::{flow, model::{RadiT, RadiTConfig}, sampler};
//! use radit_models::tch::{Device, Kind, Tensor, nn::VarStore};
//! let vs = VarStore::new(Device::Cpu);
//! let model = RadiT::new(&vs.root(), &RadiTConfig::preset("tiny")?)?;
//! let x1 = Tensor::zeros([2, 1, 16, 16], (Kind::Float, Device::Cpu));
//! let draw = flow::FlowConfig::default().draw(0, 0, &[0, 1], &[1, 16, 16]);
//! let labels = Tensor::zeros([2, 18], (Kind::Int64, Device::Cpu));
//! let age = Tensor::from_slice(&[0.63f32, f32::NAN]);
//! let loss = flow::loss(&model, &x1, &draw.x0, &draw.t, &labels, &age)?;
//! let (images, stats) = sampler::generate(&model, &draw.x0, &labels, &age, sampler::Solver::default())?;
//! # Ok::<(), radit_models::model::ModelError>(())
//! ```

pub use tch;

pub mod autoencoder;
pub mod block;
pub mod error;
pub mod features;
pub mod flow;
pub mod lora;
pub mod model;
pub mod network;
pub mod precision;
pub mod predictor;
pub mod reconstruction;
pub mod sampler;
pub mod scm;
pub mod staged;
pub mod unet;

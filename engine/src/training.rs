//! The one interface of a training engine, which the trainer, checkpoints and sampling use, and the engine a
//! job's settings and network pick: the sharded engine ([`Fsdp`], zero3 or zero2) for a chain of blocks, the
//! data-parallel one ([`DataParallel`], ddp) for any network.

use std::collections::BTreeMap;

use tch::{Device, Tensor};

use crate::collective::Collective;
use crate::data_parallel::DataParallel;
use crate::fsdp::{
    EngineConfig, EngineError, Fsdp, GroupLayout, Initial, ShardState, ShardingMode, StepReport,
};
use radit_models::block::ModelInputs;
use radit_models::network::Architecture;

/// A training engine: forward and backward of micro-batches, an optimiser step, and the state checkpoints keep.
/// Every method that communicates is collective.
pub trait TrainingEngine: Send {
    /// One micro-batch; `keys` (one per sample) turns on the model's dropout where it has any. `loss` gets the
    /// model's output first, then whatever else its last stage hands the objective (an autoencoder's latent
    /// moments). Returns this rank's loss.
    fn forward_backward(
        &mut self,
        inputs: &ModelInputs,
        keys: Option<&Tensor>,
        loss: &mut dyn FnMut(&[Tensor]) -> Tensor,
        scale: f64,
    ) -> Result<f64, EngineError>;
    fn optimizer_step(&mut self, local_loss_sum: f64, lr: f64) -> Result<StepReport, EngineError>;
    /// The full named weights (fp32, CPU): raw, or the EMA.
    fn gather_named(&self, ema: bool) -> Result<BTreeMap<String, Tensor>, EngineError>;
    /// This rank's slices for a checkpoint (views: read them before the next step).
    fn shard_views(&self) -> Vec<ShardState>;
    fn load_shard_states(
        &mut self,
        states: &[ShardState],
        adam_steps: u64,
    ) -> Result<(), EngineError>;
    fn layouts(&self) -> Vec<&GroupLayout>;
    fn adam_steps(&self) -> u64;
    fn collective(&self) -> &dyn Collective;
    fn device(&self) -> Device;
    fn config(&self) -> &EngineConfig;
}

macro_rules! delegate {
    ($engine:ty, $with_keys:expr) => {
        impl TrainingEngine for $engine {
            fn forward_backward(
                &mut self,
                inputs: &ModelInputs,
                keys: Option<&Tensor>,
                loss: &mut dyn FnMut(&[Tensor]) -> Tensor,
                scale: f64,
            ) -> Result<f64, EngineError> {
                ($with_keys)(self, inputs, keys, loss, scale)
            }
            fn optimizer_step(
                &mut self,
                local_loss_sum: f64,
                lr: f64,
            ) -> Result<StepReport, EngineError> {
                <$engine>::optimizer_step(self, local_loss_sum, lr)
            }
            fn gather_named(&self, ema: bool) -> Result<BTreeMap<String, Tensor>, EngineError> {
                <$engine>::gather_named(self, ema)
            }
            fn shard_views(&self) -> Vec<ShardState> {
                <$engine>::shard_views(self)
            }
            fn load_shard_states(
                &mut self,
                states: &[ShardState],
                adam_steps: u64,
            ) -> Result<(), EngineError> {
                <$engine>::load_shard_states(self, states, adam_steps)
            }
            fn layouts(&self) -> Vec<&GroupLayout> {
                <$engine>::layouts(self)
            }
            fn adam_steps(&self) -> u64 {
                <$engine>::adam_steps(self)
            }
            fn collective(&self) -> &dyn Collective {
                <$engine>::collective(self)
            }
            fn device(&self) -> Device {
                <$engine>::device(self)
            }
            fn config(&self) -> &EngineConfig {
                <$engine>::config(self)
            }
        }
    };
}

// RadiT, the only chain the sharded engine trains, has no dropout: the keys have nothing to key.
delegate!(Fsdp, |e: &mut Fsdp,
                 inputs: &ModelInputs,
                 _keys: Option<&Tensor>,
                 loss: &mut dyn FnMut(&[Tensor]) -> Tensor,
                 scale| {
    e.forward_backward(inputs, |v| loss(std::slice::from_ref(v)), scale)
});
delegate!(DataParallel, |e: &mut DataParallel,
                         inputs: &ModelInputs,
                         keys: Option<&Tensor>,
                         loss: &mut dyn FnMut(&[Tensor]) -> Tensor,
                         scale| {
    e.forward_backward(inputs, keys, |v| loss(v), scale)
});

/// The engine `cfg.mode` names, for `network`: zero3 and zero2 shard a chain of blocks (RadiT); ddp trains any
/// network. A U-Net under a sharded mode is a configuration error that says so.
pub fn build(
    network: &Architecture,
    cfg: EngineConfig,
    comm: Box<dyn Collective>,
    device: Device,
    initial: Initial,
) -> Result<Box<dyn TrainingEngine>, EngineError> {
    Ok(match (cfg.mode, network) {
        (ShardingMode::Ddp, _) => Box::new(DataParallel::new(
            |p| network.build_staged(p),
            cfg,
            comm,
            device,
            initial,
        )?),
        (_, Architecture::RadiT(c)) => Box::new(Fsdp::new(
            radit_models::model::RadiT::builder(c),
            cfg,
            comm,
            device,
            initial,
        )?),
        (mode, other) => {
            return Err(radit_protocol::ConfigError::new(
                "engine.mode",
                format!(
                    "{mode:?} shards a chain of blocks; {} has skip connections: set engine.mode = \"ddp\"",
                    other.name()
                ),
            )
            .into());
        }
    })
}

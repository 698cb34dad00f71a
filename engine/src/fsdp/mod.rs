//! The FSDP engine: applied to a [`BlockModel`] (RadiT) from outside (the model knows nothing about ranks, the
//! engine nothing about the model's names or its loss, which the caller passes as a closure).
//!
//! Parameters are split into flat groups, one per transformer block plus one for everything else ("rest"), each
//! laid out in name order and padded to a multiple of the world size. Rank r owns the contiguous slice r of every
//! group in fp32 (master weights, gradient accumulator, Adam m and v, EMA). Before a block runs, its full weights
//! are all-gathered in the compute dtype into the model's parameter tensors, and freed after; the backward
//! regathers each block, recomputes its forward from the saved block input (per-block activation checkpointing),
//! and reduce-scatters its gradients in fp32, averaged over ranks and micro-batches. Adam and the EMA touch only
//! the local slice. `ShardingMode::Zero2` keeps the gathered weights from a block's forward to its backward.
//!
//! Every method that communicates is collective: all ranks call it in the same order.

mod layout;
pub(crate) mod optim;

pub use layout::{GroupLayout, group_layouts};
pub use optim::{AdamConfig, LrSchedule};
pub use radit_models::block::{BlockModel, ModelInputs, RestParts};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn, nn::VarStore};

use crate::collective::{Collective, CollectiveError};
use radit_models::model::{ModelError, Precision};

/// What can go wrong in a training step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("libtorch")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    InvalidConfig(#[from] radit_protocol::ConfigError),
    #[error("state does not fit this engine: {0}")]
    StateMismatch(String),
    /// The device (or the host, for CPU ranks) cannot hold this rank's training state, or an allocation failed.
    #[error("the device's memory")]
    Allocation(#[from] crate::out_of_memory::AllocationFailed),
}

/// Bytes of training state per parameter that a rank keeps for its shard: the fp32 master, its gradient, Adam's
/// m and v, and the EMA.
const STATE_BYTES_PER_PARAMETER: u64 = 20;

/// Refuses training state that cannot fit before allocating it: past the host's available memory a CPU rank is
/// not refused by malloc but killed by the kernel's OOM killer part-way through, with no message. `free` is what
/// the device (or this rank's share of the host) has left; the built model's own fp32 weights (`4 x parameters`)
/// are freed group by group as the shards are made, so they count as available.
pub fn check_state_fits(
    parameters: u64,
    world: u64,
    free: Option<u64>,
) -> Result<(), crate::out_of_memory::AllocationFailed> {
    let need = STATE_BYTES_PER_PARAMETER * parameters / world.max(1);
    let Some(free) = free else { return Ok(()) };
    let have = free + 4 * parameters;
    if need <= have {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(crate::out_of_memory::AllocationFailed {
        message: format!(
            "this rank's training state needs at least {:.1} GiB ({STATE_BYTES_PER_PARAMETER} bytes per parameter \
             for {parameters} parameters over {world} rank(s)) and {:.1} GiB is free for it",
            gib(need),
            gib(have)
        ),
    })
}

/// What this rank can use for its state: a GPU's free memory, or the host's available memory shared among the
/// ranks on this node.
pub(crate) fn free_for_state(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(_) => crate::runtime::device_memory(device).map(|(used, total)| total - used),
        _ => {
            let local = crate::placement::local_placement(|k| std::env::var(k).ok())
                .local_size
                .unwrap_or(1)
                .max(1) as u64;
            crate::out_of_memory::host_available_bytes().map(|b| b / local)
        }
    }
}

/// When gathered weights are freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardingMode {
    /// Gather before each use, free after (forward, then again for the backward): least memory.
    #[default]
    Zero3,
    /// Keep each block's gathered weights from its forward to its backward: one gather per step, more memory.
    Zero2,
    /// No sharding: every rank holds the whole state and gradients are all-reduced
    /// ([`crate::data_parallel::DataParallel`]). Trains any model, skip connections included (RadUNet).
    Ddp,
}

/// The engine's knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    #[serde(default)]
    pub mode: ShardingMode,
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub adam: AdamConfig,
    /// Global gradient-norm clip (over all shards); 0 disables.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    #[serde(default = "default_ema")]
    pub ema_decay: f64,
}

fn default_clip() -> f64 {
    1.0
}

fn default_ema() -> f64 {
    0.9999
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            mode: ShardingMode::Zero3,
            precision: Precision::Fp32,
            adam: AdamConfig::default(),
            grad_clip: 1.0,
            ema_decay: 0.9999,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), radit_protocol::ConfigError> {
        let bad = |field: &str, reason: String| {
            Err(radit_protocol::ConfigError {
                field: format!("engine.{field}"),
                reason,
            })
        };
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return bad("grad_clip", format!("must be >= 0, got {}", self.grad_clip));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad(
                "ema_decay",
                format!("must be in [0, 1), got {}", self.ema_decay),
            );
        }
        self.adam.validate()
    }
}

/// A group's weights being gathered: the buffers stay alive until the gather is waited for.
struct Gathering {
    group: usize,
    full: Tensor,
    _local: Tensor,
    flight: crate::collective::InFlight,
}

/// A group's reduce-scatter in flight: the flat gradients it reads stay alive until it is waited for.
struct Reducing {
    group: usize,
    _flat: Tensor,
    /// The accumulator itself on the first micro-batch, else a slice to add to it.
    into: Tensor,
    first: bool,
    scale: f64,
    flight: crate::collective::InFlight,
}

/// One rank's slice of one flat group, with its optimiser state.
struct Shard {
    layout: GroupLayout,
    /// The model's parameter tensors of this group, in layout order.
    params: Vec<Tensor>,
    master: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    ema: Tensor,
    /// The rows of this group's force-normalised weights, seen from this slice.
    norm: Option<crate::weight_norm::RowNorm>,
}

/// The named per-rank state a checkpoint stores for one group.
pub struct ShardState {
    pub group: String,
    pub master: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    pub ema: Tensor,
}

/// What one optimiser step did, identical on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepReport {
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// The step was skipped (non-finite loss or gradient on some rank); nothing changed.
    pub skipped: bool,
}

/// A block model trained with sharded parameters, gradients, Adam state and EMA.
pub struct Fsdp {
    _vs: VarStore,
    model: Box<dyn BlockModel>,
    comm: Box<dyn Collective>,
    cfg: EngineConfig,
    device: Device,
    /// Index 0 is "rest", then one per block.
    shards: Vec<Shard>,
    /// Optimiser steps taken (skipped steps excluded): Adam's bias-correction counter.
    adam_steps: u64,
    micro_batches: u64,
}

impl Fsdp {
    /// Builds the model and keeps only this rank's slice of every group (the model's own copies are freed).
    /// With [`Initial::Seed`] rank 0 draws DiT's initialisation and broadcasts it, so every rank starts from the
    /// same weights whatever else uses libtorch's global generator; [`Initial::Weights`] starts from given weights.
    /// `build` makes the model's parameters under the root it is given (once, on every rank; the engine then
    /// shards them).
    pub fn new(
        build: impl FnOnce(&nn::Path) -> Result<Box<dyn BlockModel>, ModelError>,
        cfg: EngineConfig,
        comm: Box<dyn Collective>,
        device: Device,
        initial: Initial,
    ) -> Result<Self, EngineError> {
        cfg.validate()?;
        if cfg.mode == ShardingMode::Ddp {
            return Err(radit_protocol::ConfigError::new(
                "engine.mode",
                "ddp is the data-parallel engine (DataParallel), not a sharding of this one",
            )
            .into());
        }
        if device == Device::Cpu {
            crate::runtime::retain_large_cpu_buffers();
        }
        let vs = VarStore::new(device);
        let mut model = seeded(initial, || build(&vs.root()))?;
        model.set_precision(cfg.precision);
        let vars = vs.variables();
        let parameters: i64 = vars.values().map(Tensor::numel).map(|n| n as i64).sum();
        check_state_fits(
            parameters as u64,
            comm.world() as u64,
            free_for_state(device),
        )?;
        if let Initial::Weights(weights) = initial {
            copy_weights(&vars, weights)?;
        }
        let (rank, world) = (comm.rank() as i64, comm.world() as i64);
        let mut shards = Vec::new();
        let depth = model.depth() as i64;
        for layout in group_layouts(&vars, depth, world, |n| model.block_of(n).map(|i| i as i64)) {
            let params: Vec<Tensor> = layout
                .names
                .iter()
                .map(|n| vars[n].shallow_clone())
                .collect();
            let mut flat = tch::no_grad(|| layout.flatten(&params, Kind::Float));
            if matches!(initial, Initial::Seed(_)) {
                comm.broadcast(&mut flat, 0)?;
            }
            let mut master = flat.narrow(0, rank * layout.shard, layout.shard).copy();
            for p in &params {
                free(p);
            }
            // Forced weight normalisation from the start (a collective: every rank has the group's rows).
            let norm =
                crate::weight_norm::RowNorm::new(&layout, rank * layout.shard, layout.shard, |n| {
                    model.normalized_rows(n)
                });
            if let Some(norm) = &norm {
                norm.apply(&mut master, Some(comm.as_ref()))?;
            }
            shards.push(Shard {
                norm,
                grad: master.zeros_like(),
                m: master.zeros_like(),
                v: master.zeros_like(),
                ema: master.copy(),
                master,
                params,
                layout,
            });
        }
        Ok(Self {
            _vs: vs,
            model,
            comm,
            cfg,
            device,
            shards,
            adam_steps: 0,
            micro_batches: 0,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn collective(&self) -> &dyn Collective {
        self.comm.as_ref()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn adam_steps(&self) -> u64 {
        self.adam_steps
    }

    /// Starts gathering group `g`'s full weights (compute dtype); on GPUs this runs on the communication stream
    /// and overlaps whatever compute is issued before [`Fsdp::finish_gather`].
    fn start_gather(&self, g: usize) -> Result<Gathering, EngineError> {
        let s = &self.shards[g];
        let kind = self.cfg.precision.compute_kind();
        if self.aliases_master() {
            // One rank in fp32: the shard is the whole group already, so the parameters view it (no copy).
            return Ok(Gathering {
                group: g,
                full: s.master.shallow_clone(),
                _local: Tensor::new(),
                flight: crate::collective::InFlight::Done,
            });
        }
        let local = s.master.to_kind(kind);
        let mut full = Tensor::empty([s.layout.padded], (kind, self.device));
        let flight = self.comm.start_all_gather(&local, &mut full)?;
        Ok(Gathering {
            group: g,
            full,
            _local: local,
            flight,
        })
    }

    /// Whether parameters are views of the fp32 master shards: a world of one computing in fp32, where gathering
    /// would only copy the shard. The master is not written between a forward and its backward, so the views hold.
    fn aliases_master(&self) -> bool {
        self.comm.world() == 1 && self.cfg.precision.compute_kind() == Kind::Float
    }

    /// Waits for a started gather and points the model's parameter tensors at the gathered weights.
    fn finish_gather(&self, x: Gathering) -> Result<(), EngineError> {
        self.comm.wait(x.flight)?;
        let s = &self.shards[x.group];
        s.layout.point(&s.params, &x.full);
        Ok(())
    }

    fn gather(&self, g: usize) -> Result<(), EngineError> {
        let x = self.start_gather(g)?;
        self.finish_gather(x)
    }

    fn release(&self, g: usize) {
        for p in &self.shards[g].params {
            free(p);
        }
    }

    /// Reduce-scatters one group's full gradients (any dtype; summed in fp32) into its accumulator, scaled. The first
    /// micro-batch after a step overwrites the accumulator, so it is never cleared.
    fn accumulate(&mut self, g: usize, grads: &[Tensor], scale: f64) -> Result<(), EngineError> {
        match self.start_accumulate(g, grads, scale)? {
            Some(r) => self.finish_accumulate(r),
            None => Ok(()),
        }
    }

    /// Starts [`Fsdp::accumulate`]'s reduce-scatter, so the next block's backward overlaps it; `None` when there is
    /// nothing to wait for (one rank: each gradient lands in its place at once).
    fn start_accumulate(
        &mut self,
        g: usize,
        grads: &[Tensor],
        scale: f64,
    ) -> Result<Option<Reducing>, EngineError> {
        let first = self.micro_batches == 0;
        let s = &mut self.shards[g];
        if self.comm.world() == 1 {
            // The accumulator is the whole group: each gradient lands in its place, with no flat copy.
            for (gk, (offset, shape)) in grads
                .iter()
                .zip(s.layout.offsets.iter().zip(&s.layout.shapes))
            {
                let numel: i64 = shape.iter().product();
                let mut dst = s.grad.narrow(0, *offset, numel);
                if !gk.defined() {
                    if first {
                        let _ = dst.zero_();
                    }
                    continue;
                }
                let mut gk = gk.to_kind(Kind::Float).reshape([-1]);
                if scale != 1.0 {
                    gk *= scale;
                }
                if first {
                    dst.copy_(&gk);
                } else {
                    dst += &gk;
                }
            }
            return Ok(None);
        }
        let flat = s.layout.flatten(grads, Kind::Float);
        // The first micro-batch reduces straight into the accumulator; later ones into a slice that is added.
        let mut into = if first {
            s.grad.shallow_clone()
        } else {
            Tensor::empty([s.layout.shard], (Kind::Float, self.device))
        };
        let flight = self.comm.start_reduce_scatter_sum(&flat, &mut into)?;
        Ok(Some(Reducing {
            group: g,
            _flat: flat,
            into,
            first,
            scale,
            flight,
        }))
    }

    /// Waits for a started reduce-scatter and scales (and adds) its slice into the group's accumulator.
    fn finish_accumulate(&mut self, r: Reducing) -> Result<(), EngineError> {
        self.comm.wait(r.flight)?;
        let s = &mut self.shards[r.group];
        let mut into = r.into;
        if r.scale != 1.0 {
            into *= r.scale;
        }
        if !r.first {
            s.grad += &into;
        }
        Ok(())
    }

    /// Forward and backward of one micro-batch, `loss` taking the model's output to a scalar; gradients accumulate
    /// (scaled by `scale`, normally 1 / (world * micro-batches per step)). Returns this rank's loss on it.
    pub fn forward_backward(
        &mut self,
        inputs: &ModelInputs,
        loss: impl FnOnce(&Tensor) -> Tensor,
        scale: f64,
    ) -> Result<f64, EngineError> {
        self.model.check_inputs(inputs)?;
        let parts = self.model.rest_parts();
        let depth = self.shards.len() - 1;
        let zero2 = self.cfg.mode == ShardingMode::Zero2;
        // Rest group: gathered for the whole micro-batch (embeddings, conditioning and the final layer).
        self.gather(0)?;
        let h0 = self.model.embed(inputs.x);
        let c = self.model.condition(inputs);
        let c_in = c.detach();
        let mut saved = vec![h0.detach()];
        // Blocks without autograd, saving each block's input; the next block's gather is in flight meanwhile.
        tch::no_grad(|| -> Result<(), EngineError> {
            let mut next = if depth > 0 {
                Some(self.start_gather(1)?)
            } else {
                None
            };
            for i in 0..depth {
                if let Some(x) = next.take() {
                    self.finish_gather(x)?;
                }
                if i + 1 < depth {
                    next = Some(self.start_gather(i + 2)?);
                }
                let h = self
                    .model
                    .block(i, &saved[i], &c_in, self.cfg.precision.compute_kind());
                saved.push(h);
                if !zero2 {
                    self.release(i + 1);
                }
            }
            Ok(())
        })?;

        // Head and loss with autograd; gradients w.r.t. its input, c and the final layer.
        let h_last = saved[depth].detach().set_requires_grad(true);
        let c_leaf = c_in.detach().set_requires_grad(true);
        let out = self.model.head(&h_last, &c_leaf);
        let loss = loss(&out);
        let loss_value = loss.double_value(&[]);
        let rest = 0;
        let mut rest_grads: BTreeMap<usize, Tensor> = BTreeMap::new();
        let head_idx: Vec<usize> = parts
            .head
            .iter()
            .flat_map(|p| self.shards[rest].layout.indices_with_prefix(p))
            .collect();
        let (mut dh, mut dc) = {
            let mut wrt = vec![h_last.shallow_clone(), c_leaf.shallow_clone()];
            wrt.extend(
                head_idx
                    .iter()
                    .map(|&k| self.shards[rest].params[k].shallow_clone()),
            );
            let g = Tensor::f_run_backward(&[&loss], &wrt, false, false)?;
            for (&k, gk) in head_idx.iter().zip(&g[2..]) {
                rest_grads.insert(k, gk.shallow_clone());
            }
            (g[0].shallow_clone(), g[1].shallow_clone())
        };

        // Blocks in reverse: regather (ZeRO-3), recompute, backpropagate, reduce-scatter.
        let mut next = if !zero2 && depth > 0 {
            Some(self.start_gather(depth)?)
        } else {
            None
        };
        let mut reducing: Option<Reducing> = None;
        for i in (0..depth).rev() {
            if let Some(x) = next.take() {
                self.finish_gather(x)?;
            }
            if !zero2 && i > 0 {
                next = Some(self.start_gather(i)?);
            }
            let h_in = saved[i].detach().set_requires_grad(true);
            let c_blk = c_in.detach().set_requires_grad(true);
            let out = self
                .model
                .block(i, &h_in, &c_blk, self.cfg.precision.compute_kind());
            let surrogate = (out * &dh).sum(Kind::Float);
            let mut wrt = vec![h_in, c_blk];
            wrt.extend(self.shards[i + 1].params.iter().map(Tensor::shallow_clone));
            let g = Tensor::f_run_backward(&[&surrogate], &wrt, false, false)?;
            dh = g[0].shallow_clone();
            dc += &g[1];
            self.release(i + 1);
            // The previous block's reduce-scatter has overlapped this block's backward; this block's overlaps the
            // next one's (and, for the first block, the rest group's backward below).
            if let Some(r) = reducing.take() {
                self.finish_accumulate(r)?;
            }
            reducing = self.start_accumulate(i + 1, &g[2..], scale)?;
        }

        // The rest group's remaining parameters: the input embedding (through h0) and the conditioning (through c).
        for (prefixes, root, upstream) in [(parts.input, &h0, &dh), (parts.conditioning, &c, &dc)] {
            let idx: Vec<usize> = prefixes
                .iter()
                .flat_map(|p| self.shards[rest].layout.indices_with_prefix(p))
                .collect();
            let wrt: Vec<Tensor> = idx
                .iter()
                .map(|&k| self.shards[rest].params[k].shallow_clone())
                .collect();
            let surrogate = (root * upstream).sum(Kind::Float);
            let g = Tensor::f_run_backward(&[&surrogate], &wrt, false, false)?;
            for (&k, gk) in idx.iter().zip(g) {
                rest_grads.insert(k, gk);
            }
        }
        let grads: Vec<Tensor> = (0..self.shards[rest].params.len())
            .map(|k| rest_grads.remove(&k).unwrap_or_default())
            .collect();
        if let Some(r) = reducing.take() {
            self.finish_accumulate(r)?;
        }
        self.release(rest);
        self.accumulate(rest, &grads, scale)?;
        self.micro_batches += 1;
        Ok(loss_value)
    }

    /// Clips, steps Adam and the EMA on the local slices, and clears the accumulators. `local_loss_sum` is this
    /// rank's sum of micro-batch mean losses since the last step. A non-finite loss or gradient norm on any rank
    /// skips the step on every rank.
    pub fn optimizer_step(
        &mut self,
        local_loss_sum: f64,
        lr: f64,
    ) -> Result<StepReport, EngineError> {
        let local_sq: f64 = self
            .shards
            .iter()
            .map(|s| s.grad.norm().double_value(&[]).powi(2))
            .sum();
        let (loss, grad_norm) = step_totals(
            self.comm.as_ref(),
            local_loss_sum,
            self.micro_batches,
            local_sq,
            false,
        )?;
        self.micro_batches = 0;
        if !loss.is_finite() || !grad_norm.is_finite() {
            for s in &mut self.shards {
                let _ = s.grad.zero_();
            }
            return Ok(StepReport {
                loss,
                grad_norm,
                lr,
                skipped: true,
            });
        }
        let clip = clip_factor(self.cfg.grad_clip, grad_norm);
        self.adam_steps += 1;
        let adam = self.cfg.adam;
        let decay = self.cfg.ema_decay;
        let step = self.adam_steps;
        let comm = self.comm.as_ref();
        tch::no_grad(|| -> Result<(), EngineError> {
            for s in &mut self.shards {
                optim::update_slice(
                    &adam,
                    &mut s.master,
                    &s.grad,
                    &mut s.m,
                    &mut s.v,
                    &mut s.ema,
                    lr,
                    step,
                    clip,
                    decay,
                );
                // A row may straddle two ranks' slices: its sum of squares is all-reduced.
                if let Some(norm) = &s.norm {
                    norm.apply(&mut s.master, Some(comm))?;
                }
            }
            Ok(())
        })?;
        Ok(StepReport {
            loss,
            grad_norm,
            lr,
            skipped: false,
        })
    }

    /// The full named weights (fp32, on the CPU): the raw parameters, or the EMA when `ema`. Collective.
    pub fn gather_named(&self, ema: bool) -> Result<BTreeMap<String, Tensor>, EngineError> {
        let mut out = BTreeMap::new();
        for s in &self.shards {
            let local = if ema { &s.ema } else { &s.master };
            let mut full = Tensor::zeros([s.layout.padded], (Kind::Float, self.device));
            self.comm.all_gather(local, &mut full)?;
            out.extend(s.layout.unflatten(&full.to_device(Device::Cpu)));
        }
        Ok(out)
    }

    /// This rank's slices as they are now, for checkpoints: views, not copies, so they must be read (encoded)
    /// before the next [`Fsdp::optimizer_step`] changes them.
    pub fn shard_views(&self) -> Vec<ShardState> {
        self.shards
            .iter()
            .map(|s| ShardState {
                group: s.layout.name.clone(),
                master: s.master.shallow_clone(),
                m: s.m.shallow_clone(),
                v: s.v.shallow_clone(),
                ema: s.ema.shallow_clone(),
            })
            .collect()
    }

    /// Restores this rank's slices (already resharded to this world) and Adam's step counter.
    pub fn load_shard_states(
        &mut self,
        states: &[ShardState],
        adam_steps: u64,
    ) -> Result<(), EngineError> {
        if states.len() != self.shards.len() {
            return Err(EngineError::StateMismatch(format!(
                "{} groups in the state, {} in the model",
                states.len(),
                self.shards.len()
            )));
        }
        for (s, st) in self.shards.iter_mut().zip(states) {
            if st.group != s.layout.name || st.master.size() != s.master.size() {
                return Err(EngineError::StateMismatch(format!(
                    "group {} ({:?}) does not match {} ({:?})",
                    st.group,
                    st.master.size(),
                    s.layout.name,
                    s.master.size()
                )));
            }
            let dev = |t: &Tensor| t.to_device(self.device).to_kind(Kind::Float);
            s.master = dev(&st.master);
            s.m = dev(&st.m);
            s.v = dev(&st.v);
            s.ema = dev(&st.ema);
            let _ = s.grad.zero_();
        }
        self.adam_steps = adam_steps;
        self.micro_batches = 0;
        Ok(())
    }

    /// The group layouts (world-independent apart from padding), for checkpoint manifests.
    pub fn layouts(&self) -> Vec<&GroupLayout> {
        self.shards.iter().map(|s| &s.layout).collect()
    }
}

/// Runs `build` with libtorch's global generator seeded by [`Initial::Seed`]; the generator is process-wide, so the
/// draw holds one lock.
pub(crate) fn seeded<T>(initial: Initial, build: impl FnOnce() -> T) -> T {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Initial::Seed(seed) = initial {
        tch::manual_seed(seed);
    }
    build()
}

/// A step's mean loss over the global batch and its global gradient norm, the same on every rank: from this rank's
/// sum of micro-batch losses and its sum of squared gradients, which is its shard's (`replicated` false) or, for
/// replicated gradients, the whole sum every rank holds (averaged over ranks, so the clip is the same bits
/// everywhere).
pub(crate) fn step_totals(
    comm: &dyn Collective,
    local_loss_sum: f64,
    micro_batches: u64,
    local_sq: f64,
    replicated: bool,
) -> Result<(f64, f64), CollectiveError> {
    let world = comm.world() as f64;
    let loss = comm.all_reduce_f64(local_loss_sum)? / (world * micro_batches.max(1) as f64);
    let sq = comm.all_reduce_f64(local_sq)?;
    let grad_norm = if replicated { sq / world } else { sq }.sqrt();
    Ok((loss, grad_norm))
}

/// The factor the global gradient-norm clip scales gradients by (1: no clip).
pub(crate) fn clip_factor(grad_clip: f64, grad_norm: f64) -> f64 {
    if grad_clip > 0.0 {
        (grad_clip / (grad_norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// Where the weights start.
#[derive(Clone, Copy)]
pub enum Initial<'a> {
    /// DiT initialisation drawn from this seed (on rank 0, broadcast).
    Seed(i64),
    /// These full weights (every parameter by name, fp32), e.g. from a weights file.
    Weights(&'a BTreeMap<String, Tensor>),
}

pub(crate) fn copy_weights(
    vars: &std::collections::HashMap<String, Tensor>,
    weights: &BTreeMap<String, Tensor>,
) -> Result<(), EngineError> {
    for (name, var) in vars {
        let src = weights.get(name).ok_or_else(|| {
            EngineError::StateMismatch(format!("the initial weights lack {name}"))
        })?;
        if src.size() != var.size() {
            return Err(EngineError::StateMismatch(format!(
                "initial weight {name} has shape {:?}, the model {:?}",
                src.size(),
                var.size()
            )));
        }
        tch::no_grad(|| var.shallow_clone().f_copy_(&src.to_device(var.device())))?;
    }
    Ok(())
}

/// Drops a parameter's storage but keeps the variable (and its autograd identity).
fn free(p: &Tensor) {
    let mut p = p.shallow_clone();
    p.set_data(&Tensor::empty([0], (p.kind(), p.device())));
}

#[cfg(test)]
mod tests;

//! The data-parallel engine: any [`StagedModel`] (a U-Net with its skip connections, or RadiT as a chain) with
//! its weights, gradients, Adam state and EMA replicated on every rank. The forward runs stage after stage, each
//! on detached copies of the values before it, keeping its autograd graph; the backward walks the stages in
//! reverse, and as soon as every stage feeding a parameter group has run backward, the group's flat gradient is
//! all-reduced (in fp32) while the earlier stages' backward goes on, as PyTorch DDP's buckets do.
//!
//! Checkpoints are the sharded engine's: the same groups, padded to the world, each rank writing its slice of
//! the replicated state, so a run resumes on any world size and a RadiT checkpoint reads under either engine.
//!
//! Every method that communicates is collective: all ranks call it in the same order.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor, nn, nn::VarStore};

use crate::collective::{Collective, InFlight};
use crate::fsdp::{
    AdamConfig, EngineConfig, EngineError, GroupLayout, Initial, ShardState, StepReport,
    check_state_fits, clip_factor, copy_weights, free_for_state, optim, seeded, step_totals,
};
use crate::weight_norm::RowNorm;
use radit_models::block::ModelInputs;
use radit_models::model::ModelError;
use radit_models::staged::{StageInputs, StagedModel};

/// Non-trainable variables (fixed Fourier frequencies): saved with the weights, never stepped.
const BUFFERS: &str = "buffers";

/// One flat group, whole on every rank.
struct Group {
    layout: GroupLayout,
    /// The model's variables of this group, in layout order: views of `master`.
    params: Vec<Tensor>,
    trainable: bool,
    master: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    ema: Tensor,
    norm: Option<RowNorm>,
    /// Stages whose backward writes this group's gradients.
    stages: usize,
    /// Where a later micro-batch's local gradients gather until the all-reduce has summed them over ranks (the
    /// accumulator already holds the sum of the earlier ones); made on first use.
    staging: Tensor,
}

/// A group's gradient all-reduce in flight.
struct Reducing {
    group: usize,
    /// The accumulator itself on the first micro-batch, else a buffer to add to it.
    into: Tensor,
    first: bool,
    flight: InFlight,
}

/// A staged model trained with replicated state and bucketed, overlapped gradient all-reduces.
pub struct DataParallel {
    _vs: VarStore,
    model: Box<dyn StagedModel>,
    comm: Box<dyn Collective>,
    cfg: EngineConfig,
    device: Device,
    groups: Vec<Group>,
    /// Each stage's trainable parameters as (group, position in the group).
    stage_params: Vec<Vec<(usize, usize)>>,
    adam_steps: u64,
    micro_batches: u64,
}

impl DataParallel {
    /// Builds the model; with [`Initial::Seed`] rank 0's initialisation is broadcast, with [`Initial::Weights`]
    /// every rank starts from the given weights. Forced weight normalisation applies from the start, as EDM2
    /// normalises its weights before every training forward.
    pub fn new(
        build: impl FnOnce(&nn::Path) -> Result<Box<dyn StagedModel>, ModelError>,
        cfg: EngineConfig,
        comm: Box<dyn Collective>,
        device: Device,
        initial: Initial,
    ) -> Result<Self, EngineError> {
        cfg.validate()?;
        if device == Device::Cpu {
            crate::runtime::retain_large_cpu_buffers();
        }
        let vs = VarStore::new(device);
        let mut model = seeded(initial, || build(&vs.root()))?;
        model.set_precision(cfg.precision);
        let vars = vs.variables();
        let parameters: u64 = vars.values().map(|t| t.numel() as u64).sum();
        // Replicated: every rank holds the whole state.
        check_state_fits(parameters, 1, free_for_state(device))?;
        if let Initial::Weights(weights) = initial {
            copy_weights(&vars, weights)?;
        }
        let mut names = model.groups();
        let stages = model.stages();
        let mut members: Vec<Vec<(String, Vec<i64>)>> = vec![Vec::new(); names.len() + 1];
        for (name, t) in vars.iter().collect::<BTreeMap<_, _>>() {
            let g = if t.requires_grad() {
                model.group_of(name)
            } else {
                names.len()
            };
            let Some(list) = members.get_mut(g) else {
                return Err(EngineError::StateMismatch(format!(
                    "the model puts {name} in group {g} of {}",
                    names.len()
                )));
            };
            list.push((name.clone(), t.size()));
        }
        names.push(BUFFERS.into());
        let (rank, world) = (comm.rank() as i64, comm.world() as i64);
        let mut groups = Vec::new();
        let mut stage_params = vec![Vec::new(); stages];
        for (g, (name, params)) in names.iter().zip(members).enumerate() {
            let trainable = name != BUFFERS;
            if !trainable && params.is_empty() {
                continue;
            }
            let layout = GroupLayout::new(name, &params, world);
            let tensors: Vec<Tensor> = layout
                .names
                .iter()
                .map(|n| vars[n].shallow_clone())
                .collect();
            let mut master = tch::no_grad(|| layout.flatten(&tensors, Kind::Float));
            if matches!(initial, Initial::Seed(_)) {
                comm.broadcast(&mut master, 0)?;
            }
            let mut used_by = std::collections::BTreeSet::new();
            if trainable {
                for (k, n) in layout.names.iter().enumerate() {
                    let s = model.stage_of(n);
                    let Some(list) = stage_params.get_mut(s) else {
                        return Err(EngineError::StateMismatch(format!(
                            "the model puts {n} in stage {s} of {stages}"
                        )));
                    };
                    list.push((g, k));
                    used_by.insert(s);
                }
            }
            let norm = RowNorm::new(&layout, 0, layout.padded, |n| {
                trainable && model.normalized_rows(n)
            });
            if let Some(norm) = &norm {
                norm.apply(&mut master, None)?;
            }
            let group = Group {
                grad: master.zeros_like(),
                m: master.zeros_like(),
                v: master.zeros_like(),
                ema: master.copy(),
                params: tensors,
                trainable,
                norm,
                stages: used_by.len(),
                staging: Tensor::new(),
                master,
                layout,
            };
            // No copy: the update writes the master in place.
            group.layout.point(&group.params, &group.master);
            groups.push(group);
        }
        tracing::debug!(rank, world, groups = groups.len(), "data-parallel engine");
        Ok(Self {
            _vs: vs,
            model,
            comm,
            cfg,
            device,
            groups,
            stage_params,
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

    /// Forward and backward of one micro-batch; `keys` (one per sample) turns the model's dropout on. Gradients
    /// accumulate scaled by `scale` (normally 1 / (world x micro-batches per step)), summed over ranks. Returns this
    /// rank's loss.
    pub fn forward_backward(
        &mut self,
        inputs: &ModelInputs,
        keys: Option<&Tensor>,
        loss: impl FnOnce(&[Tensor]) -> Tensor,
        scale: f64,
    ) -> Result<f64, EngineError> {
        self.model.check_inputs(inputs)?;
        let keys = keys.map(|k| k.to_device(self.device));
        let at = StageInputs {
            inputs: *inputs,
            keys: keys.as_ref(),
        };
        let stages = self.model.stages();
        // Forward: each stage on detached leaves of the values before it, keeping its graph.
        let mut leaves: Vec<Tensor> = Vec::new();
        let mut made: Vec<Vec<Tensor>> = Vec::with_capacity(stages);
        let mut first_value = Vec::with_capacity(stages);
        for i in 0..stages {
            let out = self.model.stage(i, &leaves, &at)?;
            first_value.push(leaves.len());
            if i + 1 < stages {
                // Integer values (none of today's models make one) carry no gradient.
                leaves.extend(out.iter().map(|t| {
                    let leaf = t.detach();
                    if t.is_floating_point() {
                        leaf.set_requires_grad(true)
                    } else {
                        leaf
                    }
                }));
            }
            made.push(out);
        }
        let output = made
            .last()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| EngineError::StateMismatch("the model made no output".into()))?;
        let loss = loss(output);
        let loss_value = loss.double_value(&[]);

        // Backward, last stage first; a group's all-reduce starts once its last stage is done.
        let first = self.micro_batches == 0;
        let mut upstream: Vec<Option<Tensor>> = (0..leaves.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = self.groups.iter().map(|g| g.stages).collect();
        let mut reducing: Vec<Reducing> = Vec::new();
        for i in (0..stages).rev() {
            let root = if i + 1 == stages {
                loss.shallow_clone()
            } else {
                let terms: Vec<Tensor> = made[i]
                    .iter()
                    .enumerate()
                    .filter_map(|(k, out)| {
                        let g = upstream[first_value[i] + k].take()?;
                        Some((out * g).sum(Kind::Float))
                    })
                    .collect();
                match terms.into_iter().reduce(|a, b| a + b) {
                    Some(t) => t,
                    // Nothing after this stage used its values.
                    None => Tensor::zeros([], (Kind::Float, self.device)),
                }
            };
            let mine = self.stage_params[i].clone();
            // The earlier values that can carry a gradient, then this stage's parameters.
            let inputs: Vec<usize> = (0..first_value[i])
                .filter(|&j| leaves[j].requires_grad())
                .collect();
            let before = inputs.len();
            let mut wrt: Vec<Tensor> = inputs.iter().map(|&j| leaves[j].shallow_clone()).collect();
            wrt.extend(
                mine.iter()
                    .map(|&(g, k)| self.groups[g].params[k].shallow_clone()),
            );
            let grads = if root.requires_grad() {
                Tensor::f_run_backward(&[&root], &wrt, false, false)?
            } else {
                (0..wrt.len()).map(|_| Tensor::new()).collect()
            };
            drop(made[i].drain(..));
            for (&j, g) in inputs.iter().zip(&grads[..before]) {
                if g.defined() {
                    upstream[j] = Some(match upstream[j].take() {
                        Some(u) => u + g,
                        None => g.shallow_clone(),
                    });
                }
            }
            for (&(g, k), grad) in mine.iter().zip(&grads[before..]) {
                self.write_gradient(g, k, grad, scale, first);
            }
            let mut done: Vec<usize> = mine.iter().map(|&(g, _)| g).collect();
            done.sort_unstable();
            done.dedup();
            for g in done {
                pending[g] -= 1;
                if pending[g] == 0 {
                    reducing.push(self.start_reduce(g, first)?);
                }
            }
        }
        for r in reducing {
            self.finish_reduce(r)?;
        }
        self.micro_batches += 1;
        Ok(loss_value)
    }

    /// Writes one parameter's local gradient (scaled) where its group's all-reduce will read it: the accumulator
    /// on the first micro-batch after a step, else the staging buffer.
    fn write_gradient(&mut self, g: usize, k: usize, grad: &Tensor, scale: f64, first: bool) {
        let group = &mut self.groups[g];
        let numel: i64 = group.layout.shapes[k].iter().product();
        let target = if first {
            group.grad.shallow_clone()
        } else {
            group.staging()
        };
        let mut dst = target.narrow(0, group.layout.offsets[k], numel);
        if !grad.defined() {
            let _ = dst.zero_();
            return;
        }
        let mut src = grad.to_kind(Kind::Float).reshape([-1]);
        if scale != 1.0 {
            src *= scale;
        }
        dst.copy_(&src);
    }

    fn start_reduce(&mut self, g: usize, first: bool) -> Result<Reducing, EngineError> {
        let group = &mut self.groups[g];
        let mut into = if first {
            group.grad.shallow_clone()
        } else {
            group.staging()
        };
        let flight = if self.comm.world() > 1 {
            self.comm.start_all_reduce_sum(&mut into)?
        } else {
            InFlight::Done
        };
        Ok(Reducing {
            group: g,
            into,
            first,
            flight,
        })
    }

    fn finish_reduce(&mut self, r: Reducing) -> Result<(), EngineError> {
        self.comm.wait(r.flight)?;
        if !r.first {
            let group = &mut self.groups[r.group];
            group.grad += &r.into;
        }
        Ok(())
    }

    /// Clips, steps Adam and the EMA, renormalises the rows the model names, and clears the accumulators.
    /// `local_loss_sum` is this rank's sum of micro-batch mean losses since the last step. A non-finite loss or
    /// gradient norm skips the step on every rank.
    pub fn optimizer_step(
        &mut self,
        local_loss_sum: f64,
        lr: f64,
    ) -> Result<StepReport, EngineError> {
        let local_sq: f64 = self
            .groups
            .iter()
            .filter(|g| g.trainable)
            .map(|g| g.grad.norm().double_value(&[]).powi(2))
            .sum();
        // Every rank holds the same summed gradients; the all-reduced norm makes the clip factor (and the skip) the
        // same bits everywhere, so the replicas cannot drift apart.
        let (loss, grad_norm) = step_totals(
            self.comm.as_ref(),
            local_loss_sum,
            self.micro_batches,
            local_sq,
            true,
        )?;
        self.micro_batches = 0;
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Ok(StepReport {
                loss,
                grad_norm,
                lr,
                skipped: true,
            });
        }
        let clip = clip_factor(self.cfg.grad_clip, grad_norm);
        self.adam_steps += 1;
        let adam: AdamConfig = self.cfg.adam;
        let (decay, step) = (self.cfg.ema_decay, self.adam_steps);
        tch::no_grad(|| -> Result<(), EngineError> {
            for g in self.groups.iter_mut().filter(|g| g.trainable) {
                optim::update_slice(
                    &adam,
                    &mut g.master,
                    &g.grad,
                    &mut g.m,
                    &mut g.v,
                    &mut g.ema,
                    lr,
                    step,
                    clip,
                    decay,
                );
                if let Some(norm) = &g.norm {
                    norm.apply(&mut g.master, None)?;
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

    /// The full named weights (fp32, on the CPU): the raw parameters, or the EMA when `ema`.
    pub fn gather_named(&self, ema: bool) -> Result<BTreeMap<String, Tensor>, EngineError> {
        let mut out = BTreeMap::new();
        for g in &self.groups {
            let full = if ema { &g.ema } else { &g.master };
            out.extend(g.layout.unflatten(&full.to_device(Device::Cpu)));
        }
        Ok(out)
    }

    /// This rank's slice of every group, as the sharded engine's (views, read before the next step).
    pub fn shard_views(&self) -> Vec<ShardState> {
        let rank = self.comm.rank() as i64;
        self.groups
            .iter()
            .map(|g| {
                let mine = |t: &Tensor| t.narrow(0, rank * g.layout.shard, g.layout.shard);
                ShardState {
                    group: g.layout.name.clone(),
                    master: mine(&g.master),
                    m: mine(&g.m),
                    v: mine(&g.v),
                    ema: mine(&g.ema),
                }
            })
            .collect()
    }

    /// Restores the state from every rank's slice (already resharded to this world): each rank all-gathers the
    /// whole. Collective.
    pub fn load_shard_states(
        &mut self,
        states: &[ShardState],
        adam_steps: u64,
    ) -> Result<(), EngineError> {
        if states.len() != self.groups.len() {
            return Err(EngineError::StateMismatch(format!(
                "{} groups in the state, {} in the model",
                states.len(),
                self.groups.len()
            )));
        }
        for (g, st) in self.groups.iter_mut().zip(states) {
            if st.group != g.layout.name || st.master.size() != [g.layout.shard] {
                return Err(EngineError::StateMismatch(format!(
                    "group {} ({:?}) does not match {} ([{}])",
                    st.group,
                    st.master.size(),
                    g.layout.name,
                    g.layout.shard
                )));
            }
            for (part, whole) in [
                (&st.master, &mut g.master),
                (&st.m, &mut g.m),
                (&st.v, &mut g.v),
                (&st.ema, &mut g.ema),
            ] {
                let part = part.to_device(self.device).to_kind(Kind::Float);
                let mut gathered = Tensor::empty([g.layout.padded], (Kind::Float, self.device));
                self.comm.all_gather(&part, &mut gathered)?;
                // In place: the model's parameters are views of the master.
                tch::no_grad(|| whole.copy_(&gathered));
            }
            let _ = g.grad.zero_();
        }
        self.adam_steps = adam_steps;
        self.micro_batches = 0;
        Ok(())
    }

    pub fn layouts(&self) -> Vec<&GroupLayout> {
        self.groups.iter().map(|g| &g.layout).collect()
    }
}

impl Group {
    fn staging(&mut self) -> Tensor {
        if !self.staging.defined() {
            self.staging = self.grad.zeros_like();
        }
        self.staging.shallow_clone()
    }
}

#[cfg(test)]
mod tests;

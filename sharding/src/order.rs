//! The training sample order: a pure function of (seed, epoch), never of the number of ranks.
//!
//! Each epoch shuffles the shard order, cuts it into windows of `window_shards` consecutive shards, and shuffles the
//! samples inside each window. The epochs are concatenated into one stream; global step k takes stream positions
//! `[k*B, (k+1)*B)` and rank r of W takes the contiguous slice `[r*B/W, (r+1)*B/W)` of that batch. So the global batch
//! of a step is the same set of images on 1, 2 or 32 ranks, every sample appears exactly once per epoch, and the
//! whole resume state is [`OrderState`]: a few integers.
//!
//! ```
//! use radit_sharding::order::{OrderConfig, SampleOrder};
//! let order = SampleOrder::new(OrderConfig { seed: 1, samples: 1000, shard_size: 64, window_shards: 4, global_batch: 32 })?;
//! let batch = order.global_batch(7);          // 32 sample indices of step 7
//! let mine = order.rank_slice(7, 1, 4)?;      // rank 1 of 4: the second 8 of them
//! assert_eq!(mine, &batch[8..16]);
//! # Ok::<(), radit_sharding::order::OrderError>(())
//! ```

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// Default shuffle window: 16 shards of 64 = 1,024 images mixed together.
pub const DEFAULT_WINDOW_SHARDS: u64 = 16;

/// What decides the order. Part of a run's resume state: changing any field changes the data order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfig {
    pub seed: u64,
    /// Samples in the split.
    pub samples: u64,
    /// Samples per stored shard (the store's `shard_images`).
    pub shard_size: u64,
    /// Shards whose samples are mixed together; larger mixes better, smaller needs less cache per window.
    pub window_shards: u64,
    pub global_batch: u64,
}

/// The complete resume state of the training order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    pub config: OrderConfig,
    /// The next global step to produce.
    pub step: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    #[error("order.{field} must be positive")]
    Zero { field: &'static str },
    #[error("train.global_batch ({batch}) must be divisible by the world size ({world})")]
    BatchNotDivisible { batch: u64, world: u64 },
    #[error("rank {rank} is outside a world of {world}")]
    RankOutOfRange { rank: u64, world: u64 },
}

impl OrderConfig {
    pub fn validate(&self) -> Result<(), OrderError> {
        for (field, v) in [
            ("samples", self.samples),
            ("shard_size", self.shard_size),
            ("window_shards", self.window_shards),
            ("global_batch", self.global_batch),
        ] {
            if v == 0 {
                return Err(OrderError::Zero { field });
            }
        }
        Ok(())
    }
}

/// Checks that rank `rank` of `world` can take an equal slice of `batch`.
pub fn check_world(batch: u64, rank: u64, world: u64) -> Result<(), OrderError> {
    if world == 0 || rank >= world {
        return Err(OrderError::RankOutOfRange { rank, world });
    }
    if !batch.is_multiple_of(world) {
        return Err(OrderError::BatchNotDivisible { batch, world });
    }
    Ok(())
}

/// The sample order; epochs' permutations are computed on demand and the latest one is cached.
#[derive(Debug)]
pub struct SampleOrder {
    config: OrderConfig,
    cached: Mutex<Option<(u64, Arc<Vec<u64>>)>>,
}

impl SampleOrder {
    pub fn new(config: OrderConfig) -> Result<Self, OrderError> {
        config.validate()?;
        Ok(Self {
            config,
            cached: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &OrderConfig {
        &self.config
    }

    /// Steps per epoch, counting a step that straddles two epochs in the earlier one.
    pub fn steps_per_epoch(&self) -> u64 {
        self.config.samples.div_ceil(self.config.global_batch)
    }

    /// The permutation of `0..samples` for `epoch`.
    pub fn epoch(&self, epoch: u64) -> Arc<Vec<u64>> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((e, perm)) = cached.as_ref()
            && *e == epoch
        {
            return perm.clone();
        }
        let perm = Arc::new(self.compute_epoch(epoch));
        *cached = Some((epoch, perm.clone()));
        perm
    }

    fn compute_epoch(&self, epoch: u64) -> Vec<u64> {
        let c = &self.config;
        let shards = c.samples.div_ceil(c.shard_size);
        let mut shard_order: Vec<u64> = (0..shards).collect();
        SplitMix64::stream(&[c.seed, epoch, u64::MAX]).shuffle(&mut shard_order);
        let mut out = Vec::with_capacity(c.samples as usize);
        for (w, window) in shard_order.chunks(c.window_shards as usize).enumerate() {
            let start = out.len();
            for &shard in window {
                let first = shard * c.shard_size;
                out.extend(first..(first + c.shard_size).min(c.samples));
            }
            SplitMix64::stream(&[c.seed, epoch, w as u64]).shuffle(&mut out[start..]);
        }
        out
    }

    /// Sample at stream position `p` (epochs concatenated).
    fn at(&self, p: u64) -> u64 {
        let n = self.config.samples;
        self.epoch(p / n)[(p % n) as usize]
    }

    /// The sample indices of global step `step`.
    pub fn global_batch(&self, step: u64) -> Vec<u64> {
        let b = self.config.global_batch;
        (step * b..(step + 1) * b).map(|p| self.at(p)).collect()
    }

    /// Rank `rank` of `world`'s part of global step `step`.
    pub fn rank_slice(&self, step: u64, rank: u64, world: u64) -> Result<Vec<u64>, OrderError> {
        let b = self.config.global_batch;
        check_world(b, rank, world)?;
        let per = b / world;
        let start = step * b + rank * per;
        Ok((start..start + per).map(|p| self.at(p)).collect())
    }

    /// The epoch that global step `step` starts in.
    pub fn epoch_of_step(&self, step: u64) -> u64 {
        step * self.config.global_batch / self.config.samples
    }
}

/// One evaluation batch of a rank: sample indices and whether each is real (padding repeats the last real sample
/// with weight 0, so every rank runs the same number of steps and no collective waits for a rank that has finished).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalBatch {
    pub indices: Vec<u64>,
    pub valid: Vec<bool>,
}

/// Validation order: no shuffle; the split covered exactly once across ranks, in steps of `global_batch`.
/// Rank `rank` takes the contiguous slice of each global batch, as in training.
pub fn eval_batches(
    samples: u64,
    global_batch: u64,
    rank: u64,
    world: u64,
) -> Result<Vec<EvalBatch>, OrderError> {
    if global_batch == 0 {
        return Err(OrderError::Zero {
            field: "global_batch",
        });
    }
    check_world(global_batch, rank, world)?;
    let per = global_batch / world;
    let steps = samples.div_ceil(global_batch);
    let mut out = Vec::with_capacity(steps as usize);
    for step in 0..steps {
        let start = step * global_batch + rank * per;
        let mut indices = Vec::with_capacity(per as usize);
        let mut valid = Vec::with_capacity(per as usize);
        for p in start..start + per {
            let real = p < samples;
            indices.push(if real { p } else { samples.saturating_sub(1) });
            valid.push(real);
        }
        out.push(EvalBatch { indices, valid });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn order(samples: u64, shard: u64, window: u64, batch: u64) -> SampleOrder {
        SampleOrder::new(OrderConfig {
            seed: 42,
            samples,
            shard_size: shard,
            window_shards: window,
            global_batch: batch,
        })
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_sample_exactly_once_per_epoch(samples in 1u64..3000, shard in 1u64..100, window in 1u64..10, seed: u64, epoch in 0u64..5) {
            let o = SampleOrder::new(OrderConfig { seed, samples, shard_size: shard, window_shards: window, global_batch: 8 }).unwrap();
            let mut perm = o.epoch(epoch).to_vec();
            perm.sort_unstable();
            prop_assert_eq!(perm, (0..samples).collect::<Vec<_>>());
        }

        #[test]
        fn global_batches_do_not_depend_on_the_world_size(samples in 1u64..2000, batch_per in 1u64..6, step in 0u64..200) {
            let batch = batch_per * 24; // divisible by 1, 2, 3, 4 and 8
            let o = order(samples, 16, 3, batch);
            let global = o.global_batch(step);
            for world in [1u64, 2, 3, 4, 8] {
                let joined: Vec<u64> = (0..world).flat_map(|r| o.rank_slice(step, r, world).unwrap()).collect();
                prop_assert_eq!(&joined, &global);
            }
        }

        #[test]
        fn resuming_at_step_k_on_any_world_reproduces_the_uninterrupted_run(samples in 10u64..500, k in 0u64..50, world in prop::sample::select(vec![1u64, 2, 4, 8])) {
            let cfg = OrderConfig { seed: 9, samples, shard_size: 8, window_shards: 2, global_batch: 16 };
            let straight = SampleOrder::new(cfg).unwrap();
            let state = OrderState { config: cfg, step: k };
            let json = serde_json::to_string(&state).unwrap();
            let restored: OrderState = serde_json::from_str(&json).unwrap();
            let resumed = SampleOrder::new(restored.config).unwrap();
            for step in restored.step..restored.step + 5 {
                let joined: Vec<u64> = (0..world).flat_map(|r| resumed.rank_slice(step, r, world).unwrap()).collect();
                prop_assert_eq!(joined, straight.global_batch(step));
            }
        }
    }

    #[test]
    fn order_is_stable_across_runs_and_changes_with_seed_and_epoch() {
        let o = order(100, 10, 2, 10);
        // Pinned: a change here would change the data order of every existing run.
        assert_eq!(o.global_batch(0), order(100, 10, 2, 10).global_batch(0));
        assert_eq!(
            o.global_batch(0),
            vec![86, 83, 61, 65, 67, 89, 63, 62, 68, 80]
        );
        assert_ne!(o.epoch(0), o.epoch(1));
        let other = SampleOrder::new(OrderConfig {
            seed: 43,
            ..*o.config()
        })
        .unwrap();
        assert_ne!(o.epoch(0), other.epoch(0));
    }

    #[test]
    fn windows_keep_each_step_within_few_shards() {
        // With windows of 2 shards of 64, a batch of 32 touches at most 2 shards (or 4 at a window boundary).
        let o = order(64 * 20, 64, 2, 32);
        for step in 0..40 {
            let mut shards: Vec<u64> = o.global_batch(step).iter().map(|i| i / 64).collect();
            shards.sort_unstable();
            shards.dedup();
            assert!(shards.len() <= 4, "step {step}: {shards:?}");
        }
    }

    #[test]
    fn indivisible_batches_and_bad_ranks_are_named_errors() {
        let o = order(100, 10, 2, 10);
        let e = o.rank_slice(0, 0, 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "train.global_batch (10) must be divisible by the world size (3)"
        );
        assert!(matches!(
            o.rank_slice(0, 2, 2),
            Err(OrderError::RankOutOfRange { .. })
        ));
        assert!(matches!(
            SampleOrder::new(OrderConfig {
                samples: 0,
                ..*o.config()
            }),
            Err(OrderError::Zero { field: "samples" })
        ));
    }

    #[test]
    fn eval_covers_the_split_once_and_every_rank_runs_the_same_steps() {
        for (samples, batch, world) in [(10u64, 4u64, 2u64), (7, 6, 3), (12, 4, 4), (1, 8, 8)] {
            let per_rank: Vec<Vec<EvalBatch>> = (0..world)
                .map(|r| eval_batches(samples, batch, r, world).unwrap())
                .collect();
            let steps = per_rank[0].len();
            assert!(
                per_rank.iter().all(|b| b.len() == steps),
                "same number of steps on every rank"
            );
            let mut seen: Vec<u64> = per_rank
                .iter()
                .flatten()
                .flat_map(|b| {
                    b.indices
                        .iter()
                        .zip(&b.valid)
                        .filter(|(_, v)| **v)
                        .map(|(i, _)| *i)
                })
                .collect();
            seen.sort_unstable();
            assert_eq!(
                seen,
                (0..samples).collect::<Vec<_>>(),
                "{samples}/{batch}/{world}"
            );
        }
    }
}

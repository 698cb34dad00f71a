//! Which images each rank saw at each step: the answer to "what was in the step where the loss spiked?" and the
//! check that a resumed or resized run saw the same data.

use std::collections::HashMap;

use crate::error::ShardError;
use crate::order::SampleOrder;
use crate::reader::StoreReader;
use crate::split::Split;

/// One step of one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepImages {
    pub step: u64,
    pub image_ids: Vec<String>,
}

/// Settings of the training order that are not in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRequest {
    pub split: Split,
    pub seed: u64,
    pub window_shards: u64,
    pub global_batch: u64,
    pub world: u64,
    pub rank: u64,
    pub from_step: u64,
    pub steps: u64,
}

/// The `image_id`s that rank `rank` of `world` sees at each of the requested steps.
pub fn batches(reader: &StoreReader, req: &AuditRequest) -> Result<Vec<StepImages>, ShardError> {
    let cfg = reader.order_config(req.split, req.seed, req.window_shards, req.global_batch);
    let order = SampleOrder::new(cfg).map_err(|e| ShardError::InvalidConfig(e.to_string()))?;
    let mut ids_by_shard: HashMap<u64, Vec<String>> = HashMap::new();
    let mut out = Vec::with_capacity(req.steps as usize);
    for step in req.from_step..req.from_step + req.steps {
        let indices = order
            .rank_slice(step, req.rank, req.world)
            .map_err(|e| ShardError::InvalidConfig(e.to_string()))?;
        let mut image_ids = Vec::with_capacity(indices.len());
        for i in indices {
            let shard = i / cfg.shard_size;
            let ids = match ids_by_shard.entry(shard) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(reader.read_image_ids(req.split, shard)?)
                }
            };
            image_ids.push(ids[(i % cfg.shard_size) as usize].clone());
        }
        out.push(StepImages { step, image_ids });
    }
    Ok(out)
}

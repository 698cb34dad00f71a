//! Flat parameter groups: which parameters go together, in what order, and how a group splits over ranks.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// One flat group: its parameters in name order, their offsets, and the padded size that splits evenly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupLayout {
    /// `rest` or `blocks.{i}`.
    pub name: String,
    pub names: Vec<String>,
    pub shapes: Vec<Vec<i64>>,
    pub offsets: Vec<i64>,
    /// Elements without padding (the same on every world size).
    pub numel: i64,
    /// Elements with padding: the smallest multiple of the world size >= numel.
    pub padded: i64,
    /// Elements per rank.
    pub shard: i64,
}

impl GroupLayout {
    pub fn new(name: &str, params: &[(String, Vec<i64>)], world: i64) -> Self {
        let mut offsets = Vec::with_capacity(params.len());
        let mut numel = 0;
        for (_, shape) in params {
            offsets.push(numel);
            numel += shape.iter().product::<i64>();
        }
        let shard = (numel + world - 1) / world;
        Self {
            name: name.to_string(),
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            shapes: params.iter().map(|(_, s)| s.clone()).collect(),
            offsets,
            numel,
            padded: shard * world,
            shard,
        }
    }

    /// The same group split over another world size.
    pub fn for_world(&self, world: i64) -> Self {
        let params: Vec<(String, Vec<i64>)> = self
            .names
            .iter()
            .cloned()
            .zip(self.shapes.iter().cloned())
            .collect();
        Self::new(&self.name, &params, world)
    }

    /// Concatenates `tensors` (one per parameter, in layout order; undefined = zeros) into [padded] of `kind`.
    pub fn flatten(&self, tensors: &[Tensor], kind: Kind) -> Tensor {
        let device = tensors
            .iter()
            .find(|t| t.defined())
            .map_or(Device::Cpu, Tensor::device);
        let mut parts: Vec<Tensor> = tensors
            .iter()
            .zip(&self.shapes)
            .map(|(t, shape)| {
                if t.defined() {
                    t.to_kind(kind).reshape([-1])
                } else {
                    Tensor::zeros([shape.iter().product::<i64>()], (kind, device))
                }
            })
            .collect();
        if self.padded > self.numel {
            parts.push(Tensor::zeros([self.padded - self.numel], (kind, device)));
        }
        Tensor::cat(&parts, 0)
    }

    /// Each parameter's own copy, by name, out of the whole flat group `full` ([padded] or [numel]).
    pub fn unflatten(&self, full: &Tensor) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .zip(self.offsets.iter().zip(&self.shapes))
            .map(|(name, (offset, shape))| {
                let numel: i64 = shape.iter().product();
                let t = full.narrow(0, *offset, numel).view(shape.as_slice()).copy();
                (name.clone(), t)
            })
            .collect()
    }

    /// Points the model's parameter tensors (in layout order) at their places in the whole flat group `full`: views,
    /// no copy.
    pub fn point(&self, params: &[Tensor], full: &Tensor) {
        for (p, (offset, shape)) in params.iter().zip(self.offsets.iter().zip(&self.shapes)) {
            let numel: i64 = shape.iter().product();
            let mut p = p.shallow_clone();
            p.set_data(&full.narrow(0, *offset, numel).view(shape.as_slice()));
        }
    }

    /// Positions of the parameters whose names start with `prefix`.
    pub fn indices_with_prefix(&self, prefix: &str) -> Vec<usize> {
        self.names
            .iter()
            .enumerate()
            .filter(|(_, n)| n.starts_with(prefix))
            .map(|(i, _)| i)
            .collect()
    }
}

/// Which group a parameter belongs to: `blocks.{i}.*` -> block i, everything else -> rest.
/// The groups of a model's variables: `rest` first, then `blocks.0` ... `blocks.{depth-1}`; `block_of` says which
/// block a variable belongs to (`None`: rest).
pub fn group_layouts(
    vars: &HashMap<String, Tensor>,
    depth: i64,
    world: i64,
    block_of: impl Fn(&str) -> Option<i64>,
) -> Vec<GroupLayout> {
    let mut groups: BTreeMap<Option<i64>, Vec<(String, Vec<i64>)>> = BTreeMap::new();
    let sorted: BTreeMap<&String, &Tensor> = vars.iter().collect();
    for (name, t) in sorted {
        groups
            .entry(block_of(name))
            .or_default()
            .push((name.clone(), t.size()));
    }
    let mut out = vec![GroupLayout::new(
        "rest",
        groups.get(&None).map_or(&[][..], |v| v),
        world,
    )];
    for i in 0..depth {
        out.push(GroupLayout::new(
            &format!("blocks.{i}"),
            groups.get(&Some(i)).map_or(&[][..], |v| v),
            world,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_split_evenly_and_cover_every_parameter_once() {
        let cfg = radit_models::model::RadiTConfig::preset("tiny").unwrap();
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let m = radit_models::model::RadiT::new(&vs.root(), &cfg).unwrap();
        let vars = vs.variables();
        let block_of = |n: &str| crate::fsdp::BlockModel::block_of(&m, n).map(|i| i as i64);
        for world in [1, 2, 3, 4, 7] {
            let groups = group_layouts(&vars, cfg.depth, world, block_of);
            assert_eq!(groups.len(), cfg.depth as usize + 1);
            let names: usize = groups.iter().map(|g| g.names.len()).sum();
            assert_eq!(names, vars.len());
            for g in &groups {
                assert_eq!(g.padded % world, 0);
                assert!(g.padded - g.numel < world);
                assert_eq!(g.for_world(1).numel, g.numel);
            }
            assert!(groups[1].names.iter().all(|n| n.starts_with("blocks.0.")));
            assert!(groups[0].names.iter().all(|n| !n.starts_with("blocks.")));
        }
        assert_eq!(block_of("blocks.12.attn.qkv.weight"), Some(12));
        assert_eq!(block_of("final_layer.linear.weight"), None);
    }
}

//! Forced weight normalisation of the fp32 master weights (EDM2, Eq. 66): after every optimiser step, each row
//! (output channel) of the weights a model names goes back to unit RMS, `w / (‖w‖ / √fan_in + 1e-4)` as the
//! model's `normalize`. A flat shard may hold part of a row (shards split groups anywhere), so each rank sums the
//! squares of its part of every row, one all-reduce of the group's row sums adds the parts, and each rank scales
//! its own slice.

use tch::{Kind, Tensor};

use crate::collective::{Collective, CollectiveError};
use crate::fsdp::GroupLayout;

/// The part of one normalised parameter inside a slice.
#[derive(Debug, Clone)]
struct Piece {
    /// Where it starts in the slice, and how many elements of it the slice holds.
    at: i64,
    len: i64,
    /// The parameter's first element in the slice, counted from the parameter's start.
    from: i64,
    fan_in: i64,
    /// Its first row among the group's normalised rows.
    row: i64,
}

/// The normalised rows of one group, as seen from one slice of it.
#[derive(Debug, Clone)]
pub struct RowNorm {
    pieces: Vec<Piece>,
    /// Rows of every normalised parameter in the group (not only this slice's).
    rows: i64,
    /// Elements per row, one per row.
    fan_in: Vec<f32>,
}

impl RowNorm {
    /// The rows of `layout`'s parameters that `normalized` names, seen from the slice `[start, start + len)` of
    /// the flat group; `None` when the group has none.
    pub fn new(
        layout: &GroupLayout,
        start: i64,
        len: i64,
        normalized: impl Fn(&str) -> bool,
    ) -> Option<Self> {
        let mut pieces = Vec::new();
        let mut fan_in = Vec::new();
        for ((name, shape), &offset) in layout.names.iter().zip(&layout.shapes).zip(&layout.offsets)
        {
            if !normalized(name) || shape.is_empty() {
                continue;
            }
            let numel: i64 = shape.iter().product();
            let rows = shape[0];
            if rows == 0 || numel == 0 {
                continue;
            }
            let fan = numel / rows;
            let row = fan_in.len() as i64;
            fan_in.extend(std::iter::repeat_n(fan as f32, rows as usize));
            let (a, b) = (offset.max(start), (offset + numel).min(start + len));
            if a < b {
                pieces.push(Piece {
                    at: a - start,
                    len: b - a,
                    from: a - offset,
                    fan_in: fan,
                    row,
                });
            }
        }
        if fan_in.is_empty() {
            return None;
        }
        Some(Self {
            pieces,
            rows: fan_in.len() as i64,
            fan_in,
        })
    }

    /// Normalises the rows in `slice` (fp32, the slice this was made for). `comm` adds the other ranks' parts of
    /// the row sums (the sharded engine); `None` when the slice holds the whole group. Collective when `comm` is.
    pub fn apply(
        &self,
        slice: &mut Tensor,
        comm: Option<&dyn Collective>,
    ) -> Result<(), CollectiveError> {
        let device = slice.device();
        let mut sums = Tensor::zeros([self.rows], (Kind::Float, device));
        // Each piece, padded with zeros to whole rows, viewed as [rows it touches, fan_in].
        let rowwise = |t: &Tensor, p: &Piece| -> (i64, Tensor) {
            let first = p.from / p.fan_in;
            let last = (p.from + p.len - 1) / p.fan_in;
            let lead = p.from - first * p.fan_in;
            let tail = (last + 1) * p.fan_in - (p.from + p.len);
            let part = t.narrow(0, p.at, p.len);
            let padded = if lead == 0 && tail == 0 {
                part
            } else {
                Tensor::cat(
                    &[
                        Tensor::zeros([lead], (Kind::Float, device)),
                        part,
                        Tensor::zeros([tail], (Kind::Float, device)),
                    ],
                    0,
                )
            };
            (first, padded.view([last - first + 1, p.fan_in]))
        };
        tch::no_grad(|| -> Result<(), CollectiveError> {
            for p in &self.pieces {
                let (first, rows) = rowwise(slice, p);
                let n = rows.size()[0];
                let mut into = sums.narrow(0, p.row + first, n);
                into += rows
                    .square()
                    .sum_dim_intlist([1].as_slice(), false, Kind::Float);
            }
            if let Some(comm) = comm {
                comm.all_reduce_sum(&mut sums)?;
            }
            let fan_in = Tensor::from_slice(&self.fan_in).to_device(device);
            let scale = ((&sums / fan_in).sqrt() + 1e-4).reciprocal();
            for p in &self.pieces {
                let first = p.from / p.fan_in;
                let last = (p.from + p.len - 1) / p.fan_in;
                let lead = p.from - first * p.fan_in;
                let per_row = scale.narrow(0, p.row + first, last - first + 1);
                let per_element = per_row
                    .unsqueeze(1)
                    .expand([last - first + 1, p.fan_in], false)
                    .reshape([-1])
                    .narrow(0, lead, p.len);
                let mut part = slice.narrow(0, p.at, p.len);
                part *= per_element;
            }
            Ok(())
        })
    }
}

/// The RMS of each row of a whole weight.
#[cfg(test)]
fn row_rms(w: &Tensor) -> Tensor {
    w.flatten(1, -1)
        .square()
        .mean_dim([1].as_slice(), false, Kind::Float)
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::local::LocalGroup;
    use std::time::Duration;
    use tch::Device;

    /// A group of three parameters, two of them normalised, whose rows straddle the shard boundaries of worlds
    /// 2, 3 and 4.
    fn group(world: i64) -> (GroupLayout, Vec<Tensor>) {
        let params = vec![
            ("a.weight".to_string(), vec![3, 5, 1, 1]),
            ("b.gain".to_string(), vec![]),
            ("c.weight".to_string(), vec![4, 7]),
        ];
        let layout = GroupLayout::new("rest", &params, world);
        let wave = |n: i64, phase: f64| {
            (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.71 + phase).sin() * 3.0
        };
        let tensors = vec![
            wave(15, 0.0).view([3, 5, 1, 1]),
            Tensor::from_slice(&[2.5f32]).view([0i64; 0].as_slice()),
            wave(28, 1.0).view([4, 7]),
        ];
        (layout, tensors)
    }

    #[test]
    fn sharded_rows_normalise_as_the_whole_weight_on_any_world() {
        let normalized = |n: &str| n.ends_with(".weight");
        let (whole, tensors) = group(1);
        let mut flat = whole.flatten(&tensors, Kind::Float);
        RowNorm::new(&whole, 0, whole.padded, normalized)
            .unwrap()
            .apply(&mut flat, None)
            .unwrap();
        let a = flat.narrow(0, 0, 15).view([3, 5]);
        let c = flat.narrow(0, 16, 28).view([4, 7]);
        for w in [&a, &c] {
            // rms / (rms + 1e-4): one to within the epsilon.
            let ones = Tensor::ones([w.size()[0]], (Kind::Float, Device::Cpu));
            assert!(row_rms(w).allclose(&ones, 0.0, 1e-4, false), "{w}");
        }
        assert_eq!(flat.double_value(&[15]), 2.5, "the gain is not normalised");
        // The model's own normalisation (`unet::mp::normalize`) agrees.
        let model = radit_models::unet::mp::normalize(&tensors[0]).view([3, 5]);
        assert!(model.allclose(&a, 1e-6, 1e-7, false));

        for world in [2usize, 3, 4] {
            let (layout, tensors) = group(world as i64);
            let full = layout.flatten(&tensors, Kind::Float);
            let ranks = LocalGroup::ranks(world, Duration::from_secs(30));
            let slices: Vec<Tensor> = std::thread::scope(|s| {
                let handles: Vec<_> = ranks
                    .into_iter()
                    .enumerate()
                    .map(|(r, comm)| {
                        let start = r as i64 * layout.shard;
                        let mut mine = full.narrow(0, start, layout.shard).copy();
                        let layout = layout.clone();
                        s.spawn(move || {
                            RowNorm::new(&layout, start, layout.shard, normalized)
                                .unwrap()
                                .apply(&mut mine, Some(&comm))
                                .unwrap();
                            mine
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let joined = Tensor::cat(&slices, 0).narrow(0, 0, layout.numel);
            let gap = (&joined - &flat.narrow(0, 0, layout.numel))
                .abs()
                .max()
                .double_value(&[]);
            assert!(gap < 1e-6, "world {world}: {gap}");
        }
    }

    #[test]
    fn a_group_without_normalised_weights_has_no_rows() {
        let (layout, _) = group(2);
        assert!(RowNorm::new(&layout, 0, layout.shard, |_| false).is_none());
        // A slice that holds none of the rows still takes part in the all-reduce: it has the group's rows.
        let only_gain = RowNorm::new(&layout, 15, 1, |n| n.ends_with(".weight")).unwrap();
        assert!(only_gain.pieces.is_empty());
        assert_eq!(only_gain.rows, 7);
    }
}

//! The conformance suite every [`Collective`] backend must pass, written once. Each rank calls [`run`] with its
//! handle (threads for the local backend, `mpirun -np N radit collective-check` for MPI, GPUs for NCCL); it returns
//! a description of the first disagreement.

use tch::{Device, Kind, Tensor};

use super::Collective;

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

/// Rank r's distinctive values: r * 1000 + i.
fn ramp(rank: usize, n: i64, kind: Kind, device: Device) -> Tensor {
    (Tensor::arange(n, (Kind::Double, Device::Cpu)) + rank as f64 * 1000.0)
        .to_kind(kind)
        .to_device(device)
}

/// Runs every check on `device` (CPU, or the rank's GPU for NCCL).
pub fn run(c: &dyn Collective, device: Device) -> Result<(), String> {
    let (rank, world) = (c.rank(), c.world());
    let err = |e: super::CollectiveError| e.to_string();
    let w = world as i64;
    for kind in [Kind::Float, Kind::Double] {
        // all_reduce: sum of every rank's ramp.
        let mut t = ramp(rank, 5, kind, device);
        c.all_reduce_sum(&mut t).map_err(err)?;
        let want =
            Tensor::arange(5, (Kind::Double, Device::Cpu)) * w + 1000.0 * (w * (w - 1) / 2) as f64;
        expect(
            t.to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .allclose(&want, 0.0, 0.0, false),
            || format!("rank {rank}: all_reduce {kind:?} gave {t}"),
        )?;

        // reduce_scatter: block r of the sum.
        let input = ramp(rank, 3 * w, kind, device);
        let mut out = Tensor::zeros([3], (kind, device));
        c.reduce_scatter_sum(&input, &mut out).map_err(err)?;
        let want = (Tensor::arange(3, (Kind::Double, Device::Cpu)) + 3.0 * rank as f64) * w
            + 1000.0 * (w * (w - 1) / 2) as f64;
        expect(
            out.to_device(Device::Cpu)
                .to_kind(Kind::Double)
                .allclose(&want, 0.0, 0.0, false),
            || format!("rank {rank}: reduce_scatter {kind:?} gave {out}"),
        )?;
    }
    for kind in [Kind::Float, Kind::BFloat16, Kind::Int64, Kind::Uint8] {
        // all_gather: every rank's ramp in rank order (bf16 and bytes travel unchanged).
        let n = 4;
        let input = ramp(rank, n, Kind::Double, Device::Cpu)
            .remainder(251.0)
            .to_kind(kind)
            .to_device(device);
        let mut out = Tensor::zeros([n * w], (kind, device));
        c.all_gather(&input, &mut out).map_err(err)?;
        for r in 0..world {
            let want = ramp(r, n, Kind::Double, Device::Cpu)
                .remainder(251.0)
                .to_kind(kind);
            let got = out.narrow(0, r as i64 * n, n).to_device(Device::Cpu);
            expect(got.equal(&want), || {
                format!("rank {rank}: all_gather {kind:?} block {r} = {got}")
            })?;
        }
        // broadcast from the last rank.
        let root = world - 1;
        let mut t = ramp(rank, 3, Kind::Double, Device::Cpu)
            .remainder(251.0)
            .to_kind(kind)
            .to_device(device);
        c.broadcast(&mut t, root).map_err(err)?;
        let want = ramp(root, 3, Kind::Double, Device::Cpu)
            .remainder(251.0)
            .to_kind(kind);
        expect(t.to_device(Device::Cpu).equal(&want), || {
            format!("rank {rank}: broadcast {kind:?} = {t}")
        })?;
    }
    let total = c.all_reduce_f64(rank as f64 + 0.5).map_err(err)?;
    expect(
        total == (0..world).map(|r| r as f64 + 0.5).sum::<f64>(),
        || format!("rank {rank}: all_reduce_f64 = {total}"),
    )?;
    // The largest value sits on a middle rank, so neither the first nor the last wins by position.
    let mine = if rank == world / 2 {
        7.25
    } else {
        -(rank as f64)
    };
    let max = c.all_reduce_max_f64(mine).map_err(err)?;
    expect(max == 7.25, || {
        format!("rank {rank}: all_reduce_max_f64 = {max}")
    })?;
    c.barrier().map_err(err)?;

    // Started collectives: two in flight at once and a blocking call behind them, then the waits, in order.
    let input = ramp(rank, 2 * w, Kind::Float, device);
    let mut summed = Tensor::zeros([2], (Kind::Float, device));
    let mut gathered = Tensor::zeros([2 * w], (Kind::Float, device));
    let scatter = c
        .start_reduce_scatter_sum(&input, &mut summed)
        .map_err(err)?;
    let gather = c
        .start_all_gather(&input.narrow(0, 0, 2), &mut gathered)
        .map_err(err)?;
    let between = c.all_reduce_f64(1.0).map_err(err)?;
    c.wait(scatter).map_err(err)?;
    c.wait(gather).map_err(err)?;
    let want_sum = (Tensor::arange(2, (Kind::Double, Device::Cpu)) + 2.0 * rank as f64) * w
        + 1000.0 * (w * (w - 1) / 2) as f64;
    expect(
        summed
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .allclose(&want_sum, 0.0, 0.0, false),
        || format!("rank {rank}: started reduce_scatter gave {summed}"),
    )?;
    for r in 0..world {
        let want = ramp(r, 2, Kind::Float, Device::Cpu);
        let got = gathered.narrow(0, r as i64 * 2, 2).to_device(Device::Cpu);
        expect(got.equal(&want), || {
            format!("rank {rank}: started all_gather block {r} = {got}")
        })?;
    }
    expect(between == w as f64, || {
        format!("rank {rank}: all_reduce_f64 between started collectives = {between}")
    })?;

    // Misuse is refused before any communication, identically on every rank.
    let mut bad = Tensor::zeros([2, 2], (Kind::Float, device));
    expect(c.all_reduce_sum(&mut bad).is_err(), || {
        "a 2-D all_reduce was accepted".into()
    })?;
    let mut out = Tensor::zeros([3], (Kind::Float, device));
    expect(
        c.reduce_scatter_sum(&Tensor::zeros([3 * w + 1], (Kind::Float, device)), &mut out)
            .is_err(),
        || "a reduce_scatter of the wrong size was accepted".into(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::collective::CollectiveError;
    use crate::collective::local::LocalGroup;

    #[test]
    fn the_local_backend_passes_the_conformance_suite_on_worlds_1_to_4() {
        for world in 1..=4 {
            let handles = LocalGroup::ranks(world, Duration::from_secs(30));
            let threads: Vec<_> = handles
                .into_iter()
                .map(|c| std::thread::spawn(move || run(&c, Device::Cpu)))
                .collect();
            for t in threads {
                t.join().expect("rank thread").unwrap();
            }
        }
    }

    #[test]
    fn a_rank_that_leaves_fails_its_peers_instead_of_hanging() {
        let mut handles = LocalGroup::ranks(2, Duration::from_secs(30));
        let survivor = handles.pop().unwrap();
        drop(handles); // rank 0 is gone
        let err = survivor.barrier().unwrap_err();
        assert!(
            matches!(err, CollectiveError::RankFailed { rank: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_missing_peer_times_out() {
        let handles = LocalGroup::ranks(2, Duration::from_millis(200));
        let err = handles[0].barrier().unwrap_err();
        assert!(matches!(err, CollectiveError::Timeout { .. }), "{err}");
    }
}

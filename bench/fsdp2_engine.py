"""PyTorch's FSDP2 on CPU ranks, the peer of `radit engine bench` (scripts/bench-engine.sh runs both in one run).

The same model (the twin's RadiT, tests/python/radit_twin.py, at the same preset and DiT initialisation), the same
work per step as the engine: fp32, per-block activation checkpointing (`checkpoint_wrapper`), `fully_shard` per block
and on the root (parameters, gradients and Adam state sharded: ZeRO-3), Adam (foreach), a global gradient-norm clip
at 1.0 and an EMA (0.9999) of the local shards. Ranks are processes on 127.0.0.1 with gloo, one core each at world 2.

Prints one JSON line: median and min step seconds (rank 0's clock, a barrier before each step), logical collective
bytes per step per rank counted as radit counts them (gathered outputs + reduce-scatter inputs + all-reduces), and
the largest peak resident memory of any rank over the timed steps.

With --checkpoint DIR it then saves (twice, timing both) the whole training state (the sharded weights and Adam state, and the EMA) with
torch.distributed.checkpoint's `async_save` into DIR, as the peer of radit's checkpoint writer: the stall (until
`async_save` returns and training could go on), the write (until its future resolves; DCP's file writer fsyncs), and
a cold `dcp.load` of it (page cache dropped for its files with posix_fadvise).

Usage: python bench/fsdp2_engine.py --preset b-latent --global-batch 2 --world 2 --steps 3 --warmup 1 --threads 1
       [--checkpoint DIR]
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "python"))
import radit_twin  # noqa: E402


def peak_rss_reset() -> None:
    # Writing 5 resets the peak resident set (VmHWM) to the current one; no privileges needed.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Traffic:
    """Counts the bytes of the collectives FSDP2 and the clip issue, by wrapping torch.distributed's functions."""

    def __init__(self) -> None:
        self.bytes = 0
        # FSDP2 calls the `*_single` names in torch 2.13 and the `*_tensor` ones before; the clip's scalar
        # all-reduce goes through DTensor's functional collectives and is not counted (4 bytes).
        wrap = {
            "all_gather_single": lambda a, kw: _arg(a, kw, 0, "output_tensor"),
            "all_gather_into_tensor": lambda a, kw: _arg(a, kw, 0, "output_tensor"),
            "reduce_scatter_single": lambda a, kw: _arg(a, kw, 1, "input"),
            "reduce_scatter_tensor": lambda a, kw: _arg(a, kw, 1, "input"),
            "all_reduce": lambda a, kw: _arg(a, kw, 0, "tensor"),
        }
        for name, counted in wrap.items():
            original = getattr(dist, name, None)
            if original is None:
                continue

            def patched(*a, _original=original, _counted=counted, **kw):
                t = _counted(a, kw)
                self.bytes += t.numel() * t.element_size()
                return _original(*a, **kw)

            setattr(dist, name, patched)


def _arg(a, kw, position, name):
    return a[position] if len(a) > position else kw[name]


def rank_main(rank: int, args, port: int, results) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    traffic = Traffic()
    mesh = init_device_mesh("cpu", (args.world,))
    torch.manual_seed(0)
    cfg = radit_twin.PRESETS[args.preset]
    model = radit_twin.RadiT(cfg)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
        fully_shard(model.blocks[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=1e-4, foreach=True)
    # DTensors like the parameters, so DCP saves each rank's shard of the EMA (as radit does).
    ema = [p.detach().clone() for p in params]
    b = args.global_batch // args.world
    x1 = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size)
    x0 = torch.randn_like(x1)
    t = torch.rand(b)
    labels = torch.stack([torch.randint(0, k, (b,)) for k in cfg.classes], dim=1)
    age = torch.full((b,), 0.5)
    times, traffic_per_step = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            peak_rss_reset()
        dist.barrier()
        before = traffic.bytes
        start = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        radit_twin.loss(model, x1, x0, t, labels, age).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        with torch.no_grad():
            torch._foreach_lerp_([e.to_local() for e in ema], [p.to_local() for p in params], 1.0 - 0.9999)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            traffic_per_step.append(traffic.bytes - before)
    results[rank] = {"times": times, "bytes": traffic_per_step[-1], "peak_rss": peak_rss_bytes()}
    if args.checkpoint:
        results[rank] = dict(results[rank], checkpoint=checkpoint_bench(model, optim, ema, Path(args.checkpoint), rank))
    dist.barrier()
    dist.destroy_process_group()


def drop_cached(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def checkpoint_bench(model, optim, ema, root: Path, rank: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optim)
    state = {"model": model_state, "optim": optim_state, "ema": {str(i): e for i, e in enumerate(ema)}}
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    tensors = []
    torch.utils._pytree.tree_map(lambda x: tensors.append(local(x)) if isinstance(x, torch.Tensor) else None, state)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)
    # Two saves, as radit's bench makes: the second is what every later save of a run costs.
    timed = []
    for i in range(2):
        out = root / f"dcp-{i}"
        dist.barrier()
        start = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(out))
        stall = time.perf_counter() - start
        future.result()
        timed.append((stall, time.perf_counter() - start))
        dist.barrier()
    (first_stall, _), (stall, write) = timed
    files = [str(p) for p in out.rglob("*") if p.is_file()]
    os.sync()
    drop_cached(files)
    dist.barrier()
    start = time.perf_counter()
    dcp.load(state, checkpoint_id=str(out))
    restore = time.perf_counter() - start
    return {"state_bytes": state_bytes, "stall_seconds": stall, "first_stall_seconds": first_stall,
            "write_seconds": write, "restore_seconds": restore}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="b-latent", choices=sorted(radit_twin.PRESETS))
    ap.add_argument("--global-batch", type=int, default=2)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--checkpoint", help="also save and load the training state with DCP into this directory")
    args = ap.parse_args()
    if args.global_batch % args.world:
        sys.exit(f"--global-batch {args.global_batch} does not split over --world {args.world}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(args, port, results), nprocs=args.world, join=True)
    times = results[0]["times"]
    print(json.dumps({
        "impl": "pytorch-fsdp2",
        "preset": args.preset,
        "world": args.world,
        "global_batch": args.global_batch,
        "threads_per_rank": args.threads,
        "torch": torch.__version__,
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        "bytes_per_step": results[0]["bytes"],
        "peak_rss_bytes": max(r["peak_rss"] for r in results.values()),
        "checkpoint": results[0].get("checkpoint"),
    }))


if __name__ == "__main__":
    main()

"""PyTorch DDP on CPU ranks, the peer of `radit engine bench unet-* --mode ddp` (scripts/bench-unet.sh runs both in one
run).

The same network (the twin's RadUNet, tests/python/radunet_twin.py, at the same preset), the same work per step as
radit's data-parallel engine: fp32, dropout keyed as radit keys it, `DistributedDataParallel` (gradient buckets
all-reduced during the backward) over gloo, a global gradient-norm clip at 1.0, AdamW (foreach) with the preset's
recipe, EMA of the weights, and forced weight normalisation of every MPConv weight after the step. Ranks are
processes on 127.0.0.1, one core each at world 2.

Prints one JSON line: median and min step seconds (rank 0's clock, a barrier before each step) and the largest peak
resident memory of any rank over the timed steps.

Usage: python bench/ddp_unet.py --preset unet-small --global-batch 4 --world 2 --steps 3 --warmup 1 --threads 1
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
import radunet_twin  # noqa: E402
from fsdp2_engine import peak_rss_bytes, peak_rss_reset  # noqa: E402  (measured as the FSDP2 peer measures)


def rank_main(rank: int, args, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(0)
    cfg = radunet_twin.PRESETS[args.preset]
    model = radunet_twin.build(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-4, foreach=True)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    mpconv = [m.weight for m in model.modules() if isinstance(m, radunet_twin.MPConv)]
    per = args.global_batch // args.world
    s, c = cfg["img_resolution"], cfg["img_channels"]
    x1, x0 = torch.randn(per, c, s, s), torch.randn(per, c, s, s)
    t = torch.rand(per)
    labels = torch.stack([torch.randint(0, k, (per,)) for k in radunet_twin.CLASSES], dim=1)
    age = torch.rand(per)
    keys = torch.tensor([radunet_twin.sample_key(0, 0, rank * per + i) for i in range(per)], dtype=torch.int64)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            peak_rss_reset()
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = (ddp(xt, t, labels, age, keys) - (x1 - x0)).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.9999)
            for w in mpconv:
                w.copy_(radunet_twin.normalize(w))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.tensor([peak_rss_bytes()], dtype=torch.float64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.put({"impl": "pytorch-ddp", "preset": args.preset, "world": args.world,
                 "global_batch": args.global_batch, "step_seconds_median": statistics.median(times),
                 "step_seconds_min": min(times), "peak_rss_bytes": int(peak.item())})
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="unet-small", choices=sorted(radunet_twin.PRESETS))
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, args, port, out)) for r in range(args.world)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            sys.exit(f"rank exited with {p.exitcode}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Peer for the loader benchmark: zarr-python 3 reading a radit store the straightforward way.

One process; shards in a seeded shuffled order, each read whole (images, labels, age), then batches of
--global-batch handed out as dequantised float32, x = 2(n+u)/65536 - 1, like radit's loader. Prints one JSON line.
"""

import argparse
import json
import time

import numpy as np
import zarr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    started = time.perf_counter()
    group = zarr.open_group(args.store, mode="r")
    manifest_rows = None
    images = group[f"{args.split}/images"]
    labels = group[f"{args.split}/labels"]
    age = group[f"{args.split}/age"]
    with open(f"{args.store}/manifest.json") as f:
        manifest_rows = json.load(f)["counts"]["splits"][args.split]["images"]
    s = images.shards[0] if images.shards else images.chunks[0]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(-(-manifest_rows // s))
    samples = 0
    pending = []
    checksum = 0.0
    for k in order:
        lo, hi = k * s, min((k + 1) * s, manifest_rows)
        n = images[lo:hi]
        lab = labels[lo:hi]
        a = age[lo:hi]
        pending.append((n, lab, a))
        rows = sum(p[0].shape[0] for p in pending)
        while rows >= args.global_batch or (k == order[-1] and rows > 0):
            n = np.concatenate([p[0] for p in pending])
            lab = np.concatenate([p[1] for p in pending])
            a = np.concatenate([p[2] for p in pending])
            take = min(args.global_batch, n.shape[0])
            x = 2.0 * (n[:take].astype(np.float32) + rng.random(n[:take].shape, dtype=np.float32)) / 65536.0 - 1.0
            checksum += float(x[:, 0, 0].sum()) + float(lab[:take].sum()) + float(np.nansum(a[:take]))
            samples += take
            pending = [(n[take:], lab[take:], a[take:])]
            rows = n.shape[0] - take
    seconds = time.perf_counter() - started
    print(json.dumps({"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}))


if __name__ == "__main__":
    main()

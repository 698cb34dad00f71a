"""Peer for the loader benchmark: MosaicML Streaming (`mosaicml-streaming`) over the same images in its MDS format.

`convert`: reads a radit store with zarr-python and writes MDS shards (uint16 images, labels, age; zstd; about the
same raw bytes per shard as the radit store). `read`: a StreamingDataset (shuffled, seeded) through a torch
DataLoader with --workers processes, batches of --global-batch as dequantised float32 like radit's loader; `--remote`
streams from S3 (S3_ENDPOINT_URL for moto) into the --local cache directory. The clock starts when every worker is
up and waiting (their start-up is not counted). Prints one JSON line.
"""

import argparse
import json
import time

import numpy as np


def convert(args) -> None:
    import zarr
    from streaming import MDSWriter

    group = zarr.open_group(args.store, mode="r")
    with open(f"{args.store}/manifest.json") as f:
        rows = json.load(f)["counts"]["splits"][args.split]["images"]
    images = group[f"{args.split}/images"]
    labels = group[f"{args.split}/labels"]
    age = group[f"{args.split}/age"]
    t = images.shape[1]
    columns = {"image": f"ndarray:uint16:{t},{t}", "labels": "ndarray:uint8:18", "age": "float32"}
    started = time.perf_counter()
    step = 64
    with MDSWriter(out=args.out, columns=columns, compression="zstd:3", size_limit=1 << 25) as w:
        for lo in range(0, rows, step):
            hi = min(lo + step, rows)
            n, lab, a = images[lo:hi], labels[lo:hi], age[lo:hi]
            for i in range(hi - lo):
                w.write({"image": n[i], "labels": lab[i], "age": float(a[i])})
    print(json.dumps({"samples": rows, "seconds": time.perf_counter() - started}))


def read(args) -> None:
    import torch
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()

    class Dequantised(StreamingDataset):
        def __getitem__(self, idx):
            s = super().__getitem__(idx)
            return s["image"], s["labels"], np.float32(s["age"])

    def collate(items):
        n = np.stack([i[0] for i in items])
        u = np.random.default_rng().random(n.shape, dtype=np.float32)
        x = 2.0 * (n.astype(np.float32) + u) / 65536.0 - 1.0
        return torch.from_numpy(x), torch.from_numpy(np.stack([i[1] for i in items])), torch.tensor([i[2] for i in items])

    import multiprocessing as mp

    # The clock starts once every worker process is up (spawned, imported, initialised) and waiting, so Streaming's
    # start-up is not counted against it; then the workers are let go all at once.
    ready, go = mp.Semaphore(0), mp.Event()

    def hold(_worker):
        ready.release()
        go.wait()

    ds = Dequantised(
        remote=args.remote, local=args.local, shuffle=True, shuffle_seed=args.seed, batch_size=args.global_batch
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=args.global_batch,
        num_workers=args.workers,
        collate_fn=collate,
        persistent_workers=False,
        worker_init_fn=hold,
        multiprocessing_context="fork",
    )
    batches = iter(loader)
    for _ in range(args.workers):
        ready.acquire()
    started = time.perf_counter()
    go.set()
    samples = 0
    for x, lab, a in batches:
        samples += x.shape[0]
    seconds = time.perf_counter() - started
    print(json.dumps({"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--store", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--split", default="train")
    r = sub.add_parser("read")
    r.add_argument("--local", required=True)
    r.add_argument("--remote", default=None)
    r.add_argument("--global-batch", type=int, default=64)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    convert(args) if args.cmd == "convert" else read(args)


if __name__ == "__main__":
    main()

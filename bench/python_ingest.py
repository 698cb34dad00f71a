"""The straightforward Python ingest that radit shard is compared against: PIL decode -> numpy full-range
normalisation -> PIL Lanczos resize + centre padding -> zarr-python 3 sharded array (zstd), whole shards at a time.
Single process, as people write it. Prints one JSON line with images, seconds and bytes."""

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import zarr
from PIL import Image
from zarr.codecs import ZstdCodec


def preprocess(path, size):
    img = Image.open(path)
    a = np.asarray(img, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) * (65535.0 / (hi - lo))
    h, w = a.shape
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        a = np.asarray(Image.fromarray(a, mode="F").resize((nw, nh), Image.LANCZOS))
    out = np.zeros((size, size), dtype=np.uint16)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = np.clip(np.rint(a), 0, 65535).astype(np.uint16)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--table", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--shard", type=int, default=64)
    args = p.parse_args()
    rows = list(csv.DictReader(open(args.table, newline="")))
    n, s, t = len(rows), args.shard, args.size
    start = time.perf_counter()
    root = zarr.open_group(args.out, mode="w")
    images = root.create_array("images", shape=(n, t, t), dtype="uint16", chunks=(1, t, t), shards=(s, t, t),
                               compressors=ZstdCodec(level=3), fill_value=0)
    ages = root.create_array("age", shape=(n,), dtype="float32", chunks=(s,), compressors=ZstdCodec(level=3))
    buf = np.zeros((s, t, t), dtype=np.uint16)
    age = np.full(n, np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        buf[i % s] = preprocess(Path(args.images) / r["path"], t)
        try:
            age[i] = float(r["age"]) / 100.0
        except ValueError:
            pass
        if i % s == s - 1 or i == n - 1:
            k = i // s
            images[k * s:i + 1] = buf[: i - k * s + 1]
    ages[:] = age
    secs = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(json.dumps({"images": n, "seconds": secs, "stored_bytes": stored}))


if __name__ == "__main__":
    main()

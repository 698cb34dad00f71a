"""The straightforward Python ingest that radit shard is compared against: PIL decode -> numpy full-range
normalisation -> PIL Lanczos resize + centre padding -> zarr-python 3 sharded array (zstd), whole shards at a time.
Single process, as people write it. Prints one JSON line with images, seconds and bytes.

`ingest()` and `resize_pad()` are shared with bench/python_dicom_ingest.py, which only loads its images differently."""

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import zarr
from PIL import Image
from zarr.codecs import ZstdCodec


def load_png(path, stages):
    """A PNG as float32 stretched to 0..65535."""
    a = np.asarray(Image.open(path), dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) * (65535.0 / (hi - lo))


def resize_pad(a, size):
    """Lanczos resize keeping the aspect ratio, then centre padding to size x size, as uint16."""
    h, w = a.shape
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        a = np.asarray(Image.fromarray(a, mode="F").resize((nw, nh), Image.LANCZOS))
    out = np.zeros((size, size), dtype=np.uint16)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = np.clip(np.rint(a), 0, 65535).astype(np.uint16)
    return out


def ingest(load, description):
    """Parses the command line, ingests the table's images through load(path, stages) into a zarr-python 3 store
    (uint16 [N, size, size], one chunk per image, shards of --shard, zstd 3; age alongside) and prints one JSON line:
    images, seconds, stored_bytes and the seconds of each stage (load adds its own to `stages`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--table", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--shard", type=int, default=64)
    args = p.parse_args()
    rows = list(csv.DictReader(open(args.table, newline="")))
    n, s, t = len(rows), args.shard, args.size
    stages = {"resize": 0.0, "zarr_write": 0.0}
    start = time.perf_counter()
    root = zarr.open_group(args.out, mode="w")
    images = root.create_array("images", shape=(n, t, t), dtype="uint16", chunks=(1, t, t), shards=(s, t, t),
                               compressors=ZstdCodec(level=3), fill_value=0)
    ages = root.create_array("age", shape=(n,), dtype="float32", chunks=(s,), compressors=ZstdCodec(level=3))
    buf = np.zeros((s, t, t), dtype=np.uint16)
    age = np.full(n, np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        a = load(Path(args.images) / r["path"], stages)
        t0 = time.perf_counter()
        buf[i % s] = resize_pad(a, t)
        t1 = time.perf_counter()
        stages["resize"] += t1 - t0
        try:
            age[i] = float(r["age"]) / 100.0
        except ValueError:
            pass
        if i % s == s - 1 or i == n - 1:
            k = i // s
            images[k * s:i + 1] = buf[: i - k * s + 1]
            stages["zarr_write"] += time.perf_counter() - t1
    ages[:] = age
    secs = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(json.dumps({"images": n, "seconds": secs, "stored_bytes": stored,
                      "stages": {k: round(v, 3) for k, v in stages.items()}}))


if __name__ == "__main__":
    ingest(load_png, __doc__)

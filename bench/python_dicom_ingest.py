"""The straightforward Python DICOM ingest that radit shard is compared against: pydicom.dcmread -> pixel_array ->
apply_modality_lut -> apply_voi_lut(prefer_lut=True) -> float64, negated for MONOCHROME1 -> min-max stretch to
0..65535 -> PIL Lanczos resize keeping the aspect + centre padding -> zarr-python 3 sharded uint16 array (zstd level 3),
whole shards at a time. Single process, as people write it. Prints one JSON line with images, seconds and bytes, and
the split of the time by stage (read_decode, luts_stretch, resize, zarr_write; seconds)."""

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import zarr
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from zarr.codecs import ZstdCodec


def read_decode(path):
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array


def luts_stretch(ds, a):
    """Modality LUT, VOI LUT or window, MONOCHROME1 negated, then stretched to 0..65535 (float32 for the resize)."""
    a = apply_modality_lut(a, ds)
    a = apply_voi_lut(a, ds, index=0, prefer_lut=True)
    a = np.asarray(a, dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = -a
    lo, hi = a.min(), a.max()
    a = (a - lo) * (65535.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return a.astype(np.float32)


def resize_pad(a, size):
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
    stages = dict.fromkeys(["read_decode", "luts_stretch", "resize", "zarr_write"], 0.0)
    start = time.perf_counter()
    root = zarr.open_group(args.out, mode="w")
    images = root.create_array("images", shape=(n, t, t), dtype="uint16", chunks=(1, t, t), shards=(s, t, t),
                               compressors=ZstdCodec(level=3), fill_value=0)
    ages = root.create_array("age", shape=(n,), dtype="float32", chunks=(s,), compressors=ZstdCodec(level=3))
    buf = np.zeros((s, t, t), dtype=np.uint16)
    age = np.full(n, np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        t0 = time.perf_counter()
        ds, a = read_decode(Path(args.images) / r["path"])
        t1 = time.perf_counter()
        a = luts_stretch(ds, a)
        t2 = time.perf_counter()
        buf[i % s] = resize_pad(a, t)
        t3 = time.perf_counter()
        stages["read_decode"] += t1 - t0
        stages["luts_stretch"] += t2 - t1
        stages["resize"] += t3 - t2
        try:
            age[i] = float(r["age"]) / 100.0
        except ValueError:
            pass
        if i % s == s - 1 or i == n - 1:
            k = i // s
            images[k * s:i + 1] = buf[: i - k * s + 1]
            stages["zarr_write"] += time.perf_counter() - t3
    t4 = time.perf_counter()
    ages[:] = age
    stages["zarr_write"] += time.perf_counter() - t4
    secs = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(json.dumps({"images": n, "seconds": secs, "stored_bytes": stored,
                      "stages": {k: round(v, 3) for k, v in stages.items()}}))


if __name__ == "__main__":
    main()

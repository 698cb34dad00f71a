"""Adds a `<split>/latents` array to a radit store with zarr-python, as a user's VAE encoder job would.

The values are a known function of the row so the Rust test can check what the loader hands out:
latents[n, c, h, w] = sin(n + 0.1 c + 0.01 (h W + w)) * (c + 1) + c, stored as float16.
Layout: sharded with one shard per `shard_images` rows (inner chunks of one row), per-channel statistics as the
`channel_mean` / `channel_std` attributes. `--bad-chunks` writes an array chunked along C instead, which the
loader must refuse with a clear error. Like radit's own encode job it records the latents in manifest.json last
(`--no-manifest` leaves that out, as a job killed before its end would).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import zarr


def values(rows: int, c: int, h: int, w: int) -> np.ndarray:
    n = np.arange(rows, dtype=np.float64)[:, None, None, None]
    ch = np.arange(c, dtype=np.float64)[None, :, None, None]
    pos = np.arange(h * w, dtype=np.float64).reshape(1, 1, h, w)
    return (np.sin(n + 0.1 * ch + 0.01 * pos) * (ch + 1) + ch).astype(np.float16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--bad-chunks", action="store_true")
    ap.add_argument("--no-manifest", action="store_true")
    args = ap.parse_args()

    manifest = json.loads((Path(args.store) / "manifest.json").read_text())
    rows = manifest["counts"]["splits"][args.split]["images"]
    s = manifest["settings"]["layout"]["shard_images"]
    c, t = args.channels, args.size
    data = values(rows, c, t, t)
    root = zarr.open_group(args.store, mode="r+")
    if args.bad_chunks:
        arr = root.create_array(f"{args.split}/latents", shape=data.shape, dtype="float16", chunks=(s, 1, t, t))
    else:
        arr = root.create_array(
            f"{args.split}/latents", shape=data.shape, dtype="float16", shards=(s, c, t, t), chunks=(1, c, t, t)
        )
    arr[:] = data
    as32 = data.astype(np.float32)
    arr.attrs["channel_mean"] = [float(x) for x in as32.mean(axis=(0, 2, 3))]
    arr.attrs["channel_std"] = [float(x) for x in as32.std(axis=(0, 2, 3))]
    if not args.no_manifest:
        manifest["latents"] = {
            "encoder": {"fingerprint": "zarr-python-test", "description": "tests/python/write_latents.py"},
            "sample_shape": [c, t, t],
            "data_type": "float16",
            "channel_mean": arr.attrs["channel_mean"],
            "channel_std": arr.attrs["channel_std"],
        }
        (Path(args.store) / "manifest.json").write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()

"""Synthetic CXR-like DICOM inputs for scripts/bench-dicom.sh: N DX images of 2048 columns x 2500 rows, 12-bit
unsigned in 16-bit words, MONOCHROME1, a LINEAR window, RescaleSlope 1 / RescaleIntercept 0, written with pydicom in
Explicit VR Little Endian or RLE Lossless (pydicom's own encoder), plus the harmonised table radit shard reads.

    python make_dicom_inputs.py DIR --images N --syntax explicit|rle [--variants K] [--jobs J]

writes DIR/images/<i>.dcm and DIR/table.csv (paths relative to DIR/images). The pixels are one smooth field with
noise (the idea of tests/python/dicom_twin.py's radiograph()), made once and varied cheaply by rolls and flips.
pydicom's RLE encoder is pure Python (about 1 s per image), so for RLE only K distinct variants are encoded (default
8, in parallel); image i reuses variant i mod K's encoded pixels with its own UIDs and patient. Explicit VR images
are all distinct. Prints one JSON line: images, syntax, seconds, bytes."""

import argparse
import csv
import json
import os
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, RLELossless, generate_uid

ROWS, COLS, BITS = 2500, 2048, 12
FINDINGS = [
    "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum", "fracture", "lung_lesion",
    "lung_opacity", "no_finding", "pleural_effusion", "pleural_other", "pneumonia", "pneumothorax", "support_devices",
]
HEADER = ["image_id", "patient_id", "dataset", "path", "age", "sex", "race", "view"] + FINDINGS + ["split"]
SYNTAXES = {"explicit": ExplicitVRLittleEndian, "rle": RLELossless}


def radiograph(seed=0):
    """A smooth CXR-like field (two darker lung fields in a brighter body) with mild noise over most of 0..4095."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:ROWS, 0:COLS].astype(np.float32)
    u, v = x / COLS, y / ROWS
    field = np.sin(u * 3.0) * np.cos(v * 2.0)
    for cx in (0.3, 0.7):
        field -= 0.8 * np.exp(-(((u - cx) / 0.16) ** 2 + ((v - 0.45) / 0.28) ** 2))
    field += 0.02 * rng.standard_normal((ROWS, COLS), dtype=np.float32)
    field = (field - field.min()) / (field.max() - field.min())
    return np.round(field * (2**BITS - 1)).astype(np.uint16)


def variant(base, k):
    """The k-th cheap variation of `base`: a roll by a k-dependent offset, flipped left-right on odd k."""
    a = np.roll(base, (k * 37) % ROWS, axis=0)
    a = np.roll(a, (k * 53) % COLS, axis=1)
    return np.ascontiguousarray(a[:, ::-1] if k % 2 else a)


def dataset(pixels):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.Modality = "DX"
    ds.PatientAge = "050Y"
    ds.PatientSex = "M"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = BITS
    ds.HighBit = BITS - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 2048
    ds.WindowWidth = 3500
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = pixels.tobytes()
    return ds


def write_images(job):
    """Writes images j, j + jobs, ...; image i gets variant i mod K, encoded once per process."""
    out, n, j, jobs, variants, syntax, seed = job
    base = radiograph(seed)
    encoded = {}
    for i in range(j, n, jobs):
        k = i % variants
        if k not in encoded:
            ds = dataset(variant(base, k))
            if syntax == "rle":
                ds.compress(RLELossless)
            encoded[k] = ds
        ds = encoded[k]
        uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.PatientID = f"p{i}"
        ds.save_as(Path(out) / "images" / f"{i}.dcm", enforce_file_format=True)
        if variants >= n:
            del encoded[k]
    return len(range(j, n, jobs))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--syntax", choices=sorted(SYNTAXES), default="explicit")
    p.add_argument("--variants", type=int, default=None,
                   help="distinct pixel variants (default: every image for explicit, 8 for rle)")
    p.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    n = args.images
    variants = args.variants or (n if args.syntax == "explicit" else 8)
    variants = max(1, min(variants, n))
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = max(1, min(args.jobs or os.cpu_count() or 1, variants))
    with Pool(jobs) as pool:
        done = sum(pool.map(write_images, [(str(out), n, j, jobs, variants, args.syntax, args.seed)
                                           for j in range(jobs)]))
    assert done == n, (done, n)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        for i in range(n):
            w.writerow([f"bench:{i}", f"p{i}", "VinDr-CXR", f"{i}.dcm", 50, "Male", "", "PA"] + [""] * 14 + [""])
    secs = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (out / "images").iterdir())
    print(json.dumps({"images": n, "syntax": args.syntax, "variants": variants, "seconds": secs, "bytes": size}))


if __name__ == "__main__":
    main()

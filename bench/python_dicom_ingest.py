"""The straightforward Python DICOM ingest that radit shard is compared against: pydicom.dcmread -> pixel_array ->
apply_modality_lut -> apply_voi_lut(prefer_lut=True) -> float64, negated for MONOCHROME1 -> min-max stretch to
0..65535 -> PIL Lanczos resize keeping the aspect + centre padding -> zarr-python 3 sharded uint16 array (zstd level 3),
whole shards at a time (bench/python_ingest.py's ingest()). Single process, as people write it. Prints one JSON line
with images, seconds and bytes, and the split of the time by stage (read_decode, luts_stretch, resize, zarr_write)."""

import time

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from python_ingest import ingest


def load_dicom(path, stages):
    """Modality LUT, VOI LUT or window, MONOCHROME1 negated, then stretched to 0..65535 (float32 for the resize)."""
    t0 = time.perf_counter()
    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    t1 = time.perf_counter()
    a = apply_modality_lut(a, ds)
    a = apply_voi_lut(a, ds, index=0, prefer_lut=True)
    a = np.asarray(a, dtype=np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = -a
    lo, hi = a.min(), a.max()
    a = (a - lo) * (65535.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    stages["read_decode"] = stages.get("read_decode", 0.0) + t1 - t0
    stages["luts_stretch"] = stages.get("luts_stretch", 0.0) + time.perf_counter() - t1
    return a.astype(np.float32)


if __name__ == "__main__":
    ingest(load_dicom, __doc__)

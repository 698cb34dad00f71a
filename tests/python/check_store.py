"""Reads a radit store with zarr-python 3 and checks it against the source table and images independently of the
Rust code: labels and age re-encoded here from the CSV by the rules of the dataset spec, and images that needed no
resizing compared pixel for pixel with the full-range-normalised source PNG.

Prints (or writes with --out) a JSON summary per split so the Rust test can compare it with what zarrs reads.
Exit status 1 on any mismatch, with the mismatches listed on stderr.
"""

import argparse
import csv
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import zarr
from PIL import Image

FINDINGS = [
    "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum", "fracture",
    "lung_lesion", "lung_opacity", "no_finding", "pleural_effusion", "pleural_other", "pneumonia",
    "pneumothorax", "support_devices",
]
RACE = ["Asian", "Black", "White"]
SEX = ["Male", "Female"]
VIEW = ["AP", "PA", "Lateral"]
DATASET = ["MIMIC-CXR", "CheXpert-Plus", "ReXGradient-160K", "PadChest", "VinDr-CXR", "NIH-CXR14", "BRAX"]
VIEW_ALIASES = {"ll": 3, "lat": 3, "rl": 3, "posteroanterior": 2, "anteroposterior": 1}


def enc_finding(v):
    # U-Ignore: uncertain -> missing
    return {"1": 2, "1.0": 2, "0": 1, "0.0": 1}.get(v.strip(), 0)


def enc_class(v, classes, aliases=None):
    v = v.strip()
    for i, c in enumerate(classes):
        if c.lower() == v.lower():
            return i + 1
    if aliases:
        key = "".join(ch for ch in v.lower() if ch.isalnum())
        return aliases.get(key, 0)
    return 0


def enc_age(v):
    try:
        a = float(v)
    except ValueError:
        return math.nan
    return a / 100.0 if 0.0 <= a <= 100.0 else math.nan


def expected_rows(table):
    rows = {}
    with open(table, newline="", encoding="utf-8", errors="replace") as f:
        for r in csv.DictReader(f):
            # Malformed rows (too few or too many fields) are rejected by the ingest; skip them here too.
            if None in r or None in r.values() or r["image_id"] in rows:
                continue
            labels = [enc_finding(r[k]) for k in FINDINGS]
            labels += [enc_class(r["race"], RACE), enc_class(r["sex"], SEX),
                       enc_class(r["view"], VIEW, VIEW_ALIASES), enc_class(r["dataset"], DATASET)]
            rows[r["image_id"]] = {"labels": labels, "age": enc_age(r["age"]), "path": r["path"],
                                   "patient_id": r["patient_id"]}
    return rows


def normalised(path, size):
    # DICOM sources go through the VOI pipeline, which tests/python/dicom_twin.py checks; compare PNGs only.
    if path.suffix.lower() != ".png":
        return None
    img = Image.open(path)
    if img.mode not in ("I;16", "I;16B", "I"):
        return None
    a = np.array(img).astype(np.int64)
    if a.shape != (size, size):
        return None
    lo, hi = a.min(), a.max()
    if lo == hi:
        return None
    return ((a - lo) * 65535 + (hi - lo) // 2) // (hi - lo)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out")
    args = p.parse_args()

    root = zarr.open_group(args.store, mode="r")
    attrs = root.attrs["radit"]
    assert attrs["vocabulary"]["labels"][:14] == FINDINGS, attrs["vocabulary"]["labels"]
    size = attrs["settings"]["layout"]["image_size"]
    expected = expected_rows(args.table)
    problems, summary, exact = [], {}, 0
    for split in ("train", "val", "test"):
        g = root[split]
        images, labels, age = g["images"], g["labels"], g["age"]
        ids = [str(x) for x in g["image_id"][:]]
        patients = [str(x) for x in g["patient_id"][:]]
        n = len(ids)
        if images.shape != (n, size, size) or labels.shape != (n, 18) or age.shape != (n,):
            problems.append(f"{split}: shapes {images.shape} {labels.shape} {age.shape} for {n} ids")
            continue
        lab = labels[:]
        ages = age[:]
        hashes = []
        for i, image_id in enumerate(ids):
            e = expected.get(image_id)
            if e is None:
                problems.append(f"{split}/{image_id}: not in the table")
                continue
            if list(lab[i]) != e["labels"]:
                problems.append(f"{split}/{image_id}: labels {list(lab[i])} != {e['labels']}")
            if ages_differ(float(ages[i]), e["age"]):
                problems.append(f"{split}/{image_id}: age {ages[i]} != {e['age']}")
            if patients[i] != e["patient_id"]:
                problems.append(f"{split}/{image_id}: patient {patients[i]} != {e['patient_id']}")
            px = images[i]
            hashes.append(hashlib.sha256(np.ascontiguousarray(px, dtype="<u2").tobytes()).hexdigest())
            ref = normalised(Path(args.images) / e["path"], size)
            if ref is not None:
                exact += 1
                if not np.array_equal(px.astype(np.int64), ref):
                    problems.append(f"{split}/{image_id}: pixels differ from the normalised source")
        summary[split] = {
            "image_ids": ids,
            "labels": lab.tolist(),
            "age": [None if math.isnan(a) else float(a) for a in ages],
            "image_sha256": hashes,
        }
    summary["exact_images_checked"] = exact
    text = json.dumps(summary)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(1)


def ages_differ(stored, expected):
    """A missing age (NaN) on one side only is a difference; two ages differ by more than 1e-6."""
    if math.isnan(stored) or math.isnan(expected):
        return math.isnan(stored) != math.isnan(expected)
    return abs(stored - expected) > 1e-6


if __name__ == "__main__":
    main()

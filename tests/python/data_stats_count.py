"""An independent count of a radit store for `radit data stats`: reads the store with zarr-python and counts with
numpy, per split and dataset, every split per dataset, and the totals, in the report's JSON shape.

Usage: data_stats_count.py STORE OUT.json
"""

import json
import sys

import numpy as np
import zarr

FINDINGS = [
    "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum", "fracture",
    "lung_lesion", "lung_opacity", "no_finding", "pleural_effusion", "pleural_other", "pneumonia",
    "pneumothorax", "support_devices",
]
CLASSES = {
    "race": (14, ["missing", "Asian", "Black", "White"]),
    "sex": (15, ["missing", "Male", "Female"]),
    "view": (16, ["missing", "AP", "PA", "Lateral"]),
}
DATASETS = ["missing", "MIMIC-CXR", "CheXpert-Plus", "ReXGradient-160K", "PadChest", "VinDr-CXR", "NIH-CXR14",
            "BRAX"]


def group(split, dataset, labels, ages, patients):
    out = {"split": split, "dataset": dataset, "patients": len(set(patients)), "images": int(len(labels))}
    for name, (col, classes) in CLASSES.items():
        out[name] = {c: int((labels[:, col] == i).sum()) for i, c in enumerate(classes)}
    years = ages[np.isfinite(ages)].astype(np.float64) * 100.0
    out["age"] = {
        "mean": float(years.mean()) if len(years) else None,
        "sd": float(years.std(ddof=1)) if len(years) > 1 else None,
        "missing": int((~np.isfinite(ages)).sum()),
    }
    out["findings"] = {
        f: [int((labels[:, i] == 2).sum()), int((labels[:, i] == 1).sum()), int((labels[:, i] == 0).sum())]
        for i, f in enumerate(FINDINGS)
    }
    return out


def main():
    store, out = sys.argv[1], sys.argv[2]
    root = zarr.open_group(store, mode="r")
    rows = {}
    for split in ("train", "val", "test"):
        g = root[split]
        rows[split] = (g["labels"][:], g["age"][:], np.array([str(x) for x in g["patient_id"][:]]))
    groups = []
    for split, (labels, ages, patients) in rows.items():
        for d, name in enumerate(DATASETS):
            keep = labels[:, 17] == d
            if keep.any():
                groups.append(group(split, name, labels[keep], ages[keep], patients[keep]))
        groups.append(group(split, "all", labels, ages, patients))
    labels = np.concatenate([r[0] for r in rows.values()])
    ages = np.concatenate([r[1] for r in rows.values()])
    patients = np.concatenate([r[2] for r in rows.values()])
    for d, name in enumerate(DATASETS):
        keep = labels[:, 17] == d
        if keep.any():
            groups.append(group("all", name, labels[keep], ages[keep], patients[keep]))
    groups.append(group("all", "all", labels, ages, patients))
    with open(out, "w") as f:
        json.dump(groups, f, indent=1)


if __name__ == "__main__":
    main()

"""The plain-Python alternative to `radit harmonise nih --no-check-files` (no pandas: the csv module, as a typical
script is written): NIH ChestX-ray14's Data_Entry_2017_v2020.csv -> the harmonised table, with the same label map
(sources/labelmaps/nih.toml), sex, view and age rules. Single process. Prints one JSON line with rows and seconds.

    python python_harmonise.py --root DIR --out TABLE.csv"""

import argparse
import csv
import json
import time
from pathlib import Path

DATASET = "NIH-CXR14"
FINDINGS = [
    "atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum", "fracture", "lung_lesion",
    "lung_opacity", "no_finding", "pleural_effusion", "pleural_other", "pneumonia", "pneumothorax", "support_devices",
]
HEADER = ["image_id", "patient_id", "dataset", "path", "age", "sex", "race", "view"] + FINDINGS + ["split"]
# NIH label -> finding; findings that no label maps to stay blank.
LABEL_MAP = {
    "Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Consolidation": "consolidation", "Edema": "edema",
    "Effusion": "pleural_effusion", "Pneumonia": "pneumonia", "Pneumothorax": "pneumothorax",
    "Nodule": "lung_lesion", "Mass": "lung_lesion", "Infiltration": "lung_opacity",
    "Pleural_Thickening": "pleural_other",
}
MAPPED = set(LABEL_MAP.values())
SEX = {"M": "Male", "F": "Female"}
VIEW = {"PA": "PA", "AP": "AP"}


def age_text(raw):
    """Years as the harmonised table writes them (up to two decimals, trailing zeros trimmed); blank outside 0..100."""
    raw = raw.strip()
    if raw[-1:].upper() == "Y":
        raw = raw[:-1]
    try:
        age = float(raw)
    except ValueError:
        return ""
    if not 0 <= age <= 100:
        return ""
    return f"{age:.2f}".rstrip("0").rstrip(".")


def findings(labels):
    labels = {label.strip() for label in labels.split("|") if label.strip()}
    if not labels:
        return [""] * len(FINDINGS)
    positive = {LABEL_MAP[label] for label in labels if label in LABEL_MAP}
    out = []
    for name in FINDINGS:
        if name == "no_finding":
            out.append("1" if "No Finding" in labels else "0")
        elif name in MAPPED:
            out.append("1" if name in positive else "0")
        else:
            out.append("")
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    start = time.perf_counter()
    n = 0
    with open(Path(args.root) / "Data_Entry_2017_v2020.csv", newline="") as f, \
            open(args.out, "w", newline="") as g:
        w = csv.writer(g, lineterminator="\n")
        w.writerow(HEADER)
        for r in csv.DictReader(f):
            image, patient = r["Image Index"].strip(), r["Patient ID"].strip()
            if not image or not patient:
                continue
            w.writerow([f"{DATASET}:{image}", f"{DATASET}:{patient}", DATASET, f"images/{image}",
                        age_text(r["Patient Age"]), SEX.get(r["Patient Gender"].strip(), ""), "",
                        VIEW.get(r["View Position"].strip(), "")] + findings(r["Finding Labels"]) + [""])
            n += 1
    print(json.dumps({"rows": n, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()

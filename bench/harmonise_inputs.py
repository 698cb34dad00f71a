"""Synthetic release tables for the harmonise benchmark (scripts/bench-dicom.sh), no images (radit harmonise is run
with --no-check-files):

    python harmonise_inputs.py DIR [--nih-rows 112120] [--padchest-rows 160000] [--scale 1.0] [--seed 11]

writes DIR/nih/Data_Entry_2017_v2020.csv (NIH ChestX-ray14's header, labels from its 15 strings joined by `|`, integer
ages, M/F, PA/AP) and DIR/padchest/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv (Labels as Python list
literals of a few real PadChest labels). --scale multiplies both row counts. Prints one JSON line."""

import argparse
import csv
import json
import random
import time
from pathlib import Path

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
    "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax",
]
# Roughly the release's frequencies (Infiltration and Effusion common, Hernia rare).
NIH_WEIGHTS = [11.6, 2.8, 4.2, 2.1, 11.9, 2.2, 1.5, 0.2, 17.7, 5.2, 5.6, 3.0, 1.3, 4.7]
PADCHEST_HEADER = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
                   "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Labels"]
PADCHEST_LABELS = ["cardiomegaly", "pleural effusion", "pneumonia", "atelectasis", "nodule", "NSG tube",
                   "chronic changes"]
PADCHEST_VIEWS = [("PA", "POSTEROANTERIOR"), ("L", "LATERAL"), ("AP", "ANTEROPOSTERIOR"), ("AP_horizontal", "")]


def write_nih(path, n, rng):
    with open(path, "w", newline="") as f:
        f.write(NIH_HEADER + "\n")
        w = csv.writer(f, lineterminator="\n")
        patient, follow = 1, 0
        for _ in range(n):
            if rng.random() < 0.54:
                labels = "No Finding"
            else:
                k = rng.choice((1, 1, 1, 2, 2, 3))
                labels = "|".join(sorted(set(rng.choices(NIH_FINDINGS, NIH_WEIGHTS, k=k))))
            w.writerow([f"{patient:08d}_{follow:03d}.png", labels, follow, patient, rng.randint(1, 95),
                        rng.choice("MF"), "PA" if rng.random() < 0.6 else "AP", 2500, 2048, 0.143, 0.143])
            if rng.random() < 0.65:
                follow += 1
            else:
                patient, follow = patient + 1, 0


def write_padchest(path, n, rng):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PADCHEST_HEADER)
        patient = 0
        for i in range(n):
            if i == 0 or rng.random() < 0.6:
                patient += 1
                birth = "" if rng.random() < 0.01 else f"{rng.randint(1920, 2005)}.0"
                sex = rng.choice("MF")
            if rng.random() < 0.35:
                labels = ["normal"]
            else:
                labels = rng.sample(PADCHEST_LABELS, rng.choice((1, 1, 2, 3)))
            text = "[" + ", ".join(repr(label if j == 0 else " " + label) for j, label in enumerate(labels)) + "]"
            projection, position = rng.choice(PADCHEST_VIEWS)
            date = f"{rng.randint(2009, 2017)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            image = f"{rng.getrandbits(120)}_{rng.getrandbits(30):08x}.png"
            w.writerow([image, rng.randint(0, 54), date, f"{rng.getrandbits(120)}", f"{patient:032x}", birth, sex,
                        position, projection, "Manual review of DICOM fields", text])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--nih-rows", type=int, default=112120)
    p.add_argument("--padchest-rows", type=int, default=160000)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    out = Path(args.out)
    (out / "nih").mkdir(parents=True, exist_ok=True)
    (out / "padchest").mkdir(parents=True, exist_ok=True)
    nih, padchest = round(args.nih_rows * args.scale), round(args.padchest_rows * args.scale)
    start = time.perf_counter()
    write_nih(out / "nih" / "Data_Entry_2017_v2020.csv", nih, random.Random(args.seed))
    write_padchest(out / "padchest" / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", padchest,
                   random.Random(args.seed + 1))
    print(json.dumps({"nih_rows": nih, "padchest_rows": padchest, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()

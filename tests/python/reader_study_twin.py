"""The reader study's scores by the reference packages: scipy's exact binomial test and scikit-learn's Cohen's kappa,
from the study's sealed key and the filled sheets.

Usage: reader_study_twin.py STUDY_DIR SHEET... (prints JSON)
"""

import csv
import itertools
import json
import math
import sys

from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score


def main():
    study, sheets = sys.argv[1], sys.argv[2:]
    with open(f"{study}/sealed/key.csv") as f:
        key = {r["image"]: r["truth"] == "synthetic" for r in csv.DictReader(f)}
    said = {}  # reader -> presentation -> image -> synthetic
    for sheet in sheets:
        with open(sheet) as f:
            for r in csv.DictReader(f):
                said.setdefault(r["reader"], {}).setdefault(int(r["presentation"]), {})[r["image"]] = (
                    r["answer"].strip().lower() == "synthetic")

    def acc(pairs):
        k = sum(s == t for s, t in pairs)
        return {"correct": k, "answered": len(pairs), "p_value": binomtest(k, len(pairs), 0.5).pvalue}

    def kappa(a, b):
        k = cohen_kappa_score(a, b)
        return None if math.isnan(k) else float(k)

    out = {"readers": {}, "pairs": []}
    for reader, pres in said.items():
        every = [(s, key[i]) for p in pres.values() for i, s in p.items()]
        first, second = [pres[p] for p in sorted(pres)][:2]
        both = sorted(set(first) & set(second))
        a, b = [first[i] for i in both], [second[i] for i in both]
        out["readers"][reader] = {
            "overall": acc(every),
            "presentations": {str(p): acc([(s, key[i]) for i, s in pres[p].items()]) for p in pres},
            "intra_rater": {"percent": 100.0 * sum(x == y for x, y in zip(a, b)) / len(both), "kappa": kappa(a, b)},
        }
    for r1, r2 in itertools.combinations(sorted(said), 2):
        for p in sorted(said[r1]):
            both = sorted(set(said[r1][p]) & set(said[r2][p]))
            out["pairs"].append({"readers": [r1, r2], "presentation": p,
                                 "kappa": kappa([said[r1][p][i] for i in both], [said[r2][p][i] for i in both])})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

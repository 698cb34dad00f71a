"""The Python references' timings for scripts/bench-eval.sh: FD by scipy's sqrtm route (pytorch-fid, dgm-eval), KD by
torch-fidelity's unbiased MMD^2 over the same subsets count and size (numpy; a different random draw), PRDC by the
`prdc` package. Prints one JSON object; PRDC is skipped (and said so) when its three N x M float64 distance matrices
would not fit in the memory given.
"""

import contextlib
import json
import sys
import time

import numpy as np
from scipy import linalg


def main():
    real, fake = np.load(sys.argv[1]).astype(np.float64), np.load(sys.argv[2]).astype(np.float64)
    subsets, size, k, memory_gib = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    out = {"n_real": len(real), "n_fake": len(fake), "dim": real.shape[1]}
    t = time.perf_counter()
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    out["fd"] = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))
    out["fd_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    rng = np.random.default_rng(0)
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), size, replace=False)]
        y = fake[rng.choice(len(fake), size, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = lambda m: m.sum() - np.trace(m)  # noqa: E731
        values.append((off(kxx) + off(kyy)) / (size * (size - 1)) - 2 * kxy.sum() / size**2)
    out["kd"] = float(np.mean(values))
    out["kd_seconds"] = time.perf_counter() - t
    need_gib = 8 * (len(real) ** 2 + len(fake) ** 2 + len(real) * len(fake)) / 2**30
    if need_gib > memory_gib:
        out["prdc"] = f"not run: its distance matrices need {need_gib:.0f} GiB"
    else:
        from prdc import compute_prdc

        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            out["prdc"] = {k_: float(v) for k_, v in compute_prdc(real, fake, nearest_k=k).items()}
        out["prdc_seconds"] = time.perf_counter() - t
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""The evaluation metrics as the reference packages compute them, for tests/eval_metrics.rs.

Reads DIR/case.json (which inputs, their shapes) and the raw little-endian float64 arrays beside it, computes each
metric with the package the paper's tables come from, and prints one JSON object:
  - FD: pytorch-fid's / dgm-eval's route (scipy.linalg.sqrtm of S1 S2, retried with 1e-6 on the diagonals when not
    finite, imaginary parts dropped), and torchmetrics' (the real parts of the eigenvalues of S1 S2), mean and
    unbiased covariance in float64;
  - KD: torch-fidelity's unbiased MMD^2 with the cubic polynomial kernel, written out in numpy on the full sets
    (subset size = set size, CheXGenBench's setting, so no random draw to reproduce);
  - PRDC: the `prdc` package (0.2), k from the case;
  - SSIM and PSNR: scikit-image (gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range);
  - ROC-AUC (binary, and multi-class one-vs-rest macro), MAE and Cohen's kappa: scikit-learn.
"""

import json
import sys
from pathlib import Path

import numpy as np


def load(dir_, name, shape):
    return np.fromfile(dir_ / f"{name}.f64", dtype="<f8").reshape(shape)


def fd(x, y):
    from scipy import linalg

    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kd_full(x, y):
    d = x.shape[1]
    m = x.shape[0]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    off = lambda k: k.sum() - np.diag(k).sum()  # noqa: E731
    return float((off(kxx) + off(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def main():
    dir_ = Path(sys.argv[1])
    case = json.loads((dir_ / "case.json").read_text())
    out = {}
    if "features" in case:
        f = case["features"]
        x = load(dir_, "real", f["real"])
        y = load(dir_, "fake", f["fake"])
        out["fd"] = fd(x, y)
        # torchmetrics' route (what CheXGenBench uses): the eigenvalues of S1 S2, real parts.
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        eig = np.linalg.eigvals(s1 @ s2).real.clip(0)
        out["fd_eigvals"] = float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                                  - 2 * np.sqrt(eig).sum())
        if x.shape[0] == y.shape[0]:
            out["kd"] = kd_full(x, y)
        import contextlib

        from prdc import compute_prdc

        with contextlib.redirect_stdout(sys.stderr):  # it prints the set sizes
            p = compute_prdc(real_features=x, fake_features=y, nearest_k=f["k"])
        out["prdc"] = {k: float(v) for k, v in p.items()}
    if "images" in case:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity

        i = case["images"]
        a = load(dir_, "image_a", i["shape"])
        b = load(dir_, "image_b", i["shape"])
        out["ssim"] = float(structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False, data_range=i["range"]))
        out["psnr"] = float(peak_signal_noise_ratio(a, b, data_range=i["range"]))
    if "labels" in case:
        from sklearn.metrics import cohen_kappa_score, mean_absolute_error, roc_auc_score

        c = case["labels"]
        out["auc"] = float(roc_auc_score(np.array(c["binary"]), load(dir_, "binary_scores", [len(c["binary"])])))
        scores = load(dir_, "class_scores", [len(c["classes"]), c["n_classes"]])
        out["auc_ovr"] = float(roc_auc_score(np.array(c["classes"]), scores, multi_class="ovr", average="macro"))
        out["mae"] = float(mean_absolute_error(load(dir_, "age_true", [c["n_age"]]), load(dir_, "age_pred", [c["n_age"]])))
        out["kappa"] = float(cohen_kappa_score(c["rater_a"], c["rater_b"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

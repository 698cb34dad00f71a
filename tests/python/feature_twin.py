"""The TorchScript feature-network backend's twin, for tests/eval_metrics.rs.

    export OUT.pt        a tiny random feature network with its own normalisation, traced at 32x32
                         ([B, 3, 32, 32] in [0, 1] -> [B, 24]), as a user exports Inception or Rad-DINO
    check STORE SPLIT NET FEATURES
                         reads the split's images with zarr-python, prepares them as radit documents (16-bit
                         levels / 65535, bilinear resize to 32 with align_corners=False and no antialiasing, grey
                         repeated to 3 channels), runs NET in PyTorch and prints the largest difference from the
                         features radit wrote (.npy) and whether the ids file matches the split's image ids (JSON)
"""

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32


class TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 24)

    def forward(self, x):
        x = (x - 0.5) / 0.25
        x = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(x.flatten(1))


def main():
    cmd = sys.argv[1]
    if cmd == "export":
        torch.manual_seed(0)
        net = TinyFeatures().eval()
        traced = torch.jit.trace(net, torch.rand(2, 3, SIZE, SIZE))
        traced.save(sys.argv[2])
        return
    store, split, net_path, features = sys.argv[2:6]
    import zarr

    root = zarr.open_group(store, mode="r")
    images = root[f"{split}/images"][:].astype(np.float32) / 65535.0
    x = torch.from_numpy(images)[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
    net = torch.jit.load(net_path)
    with torch.no_grad():
        want = net(x.repeat(1, 3, 1, 1)).numpy()
    got = np.load(features)
    ids = open(features[: -len(".npy")] + ".ids.txt").read().split()
    print(json.dumps({
        "shape": list(got.shape), "want_shape": list(want.shape),
        "max_abs_diff": float(np.abs(got - want).max()), "scale": float(np.abs(want).max()),
        "ids_match": ids == [str(i) for i in root[f"{split}/image_id"][:]],
    }))


if __name__ == "__main__":
    main()

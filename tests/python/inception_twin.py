"""The FID Inception's twin, for tests/eval_metrics.rs: pytorch-fid's own InceptionV3 (FID's patched blocks, pool3,
its resize and scaling), never radit's code. No weights can be downloaded here: `make` gives the FID network random
weights of the real shapes (BatchNorm statistics included), as pytorch-fid would load the real file.

    make PTH SEED        the FID Inception (pytorch-fid's fid_inception_v3 layout, 1008 classes) with random weights,
                         saved with torch.save as the real .pth is
    check STORE SPLIT PTH FEATURES
                         reads the split with zarr-python, makes 8-bit images round(v / 257) as pytorch-fid's
                         dataset reads a PNG (RGB, ToTensor), runs pytorch-fid's InceptionV3([3]) with those weights
                         and prints the largest difference of its pool3 features from radit's (JSON)
"""

import json
import sys

import numpy as np
import torch


def fid_network():
    import pytorch_fid.inception as fi

    net = fi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fi.FIDInceptionE_1(1280)
    net.Mixed_7c = fi.FIDInceptionE_2(2048)
    return net


def make(pth, seed):
    torch.manual_seed(int(seed))
    net = fid_network()
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):
                fan_in = t[0].numel()
                t.copy_(torch.randn_like(t) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("bn.weight"):
                t.copy_(1.0 + 0.1 * torch.randn_like(t))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand_like(t))
            else:
                t.copy_(0.1 * torch.randn_like(t))
    torch.save(net.state_dict(), pth)


def check(store, split, pth, features):
    import pytorch_fid.inception as fi
    import zarr

    net = fid_network()
    net.load_state_dict(torch.load(pth, weights_only=True))
    fi.fid_inception_v3 = lambda: net
    model = fi.InceptionV3([fi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    root = zarr.open_group(store, mode="r")
    levels = np.round(root[f"{split}/images"][:].astype(np.float64) / 257.0).astype(np.uint8)
    # torchvision's ToTensor of the RGB image: uint8 / 255.
    x = torch.from_numpy(np.repeat(levels[:, None], 3, axis=1)).float() / 255.0
    with torch.no_grad():
        want = model(x)[0].squeeze(3).squeeze(2).numpy()
    got = np.load(features)
    print(json.dumps({
        "shape": list(got.shape), "want_shape": list(want.shape),
        "max_abs_diff": float(np.abs(got - want).max()), "scale": float(np.abs(want).max()),
    }))


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](*sys.argv[2:])

"""The native DINOv3 feature network's twin, for tests/eval_metrics.rs: transformers' own DINOv3ViTModel and its
image processor, never radit's code.

    make DIR SEED        a tiny random DINOv3ViTModel (2 layers, hidden 64, 4 heads, patch 16, 4 register tokens,
                         RoPE theta 100, no key bias) saved as a Hugging Face snapshot with a DINOv3ViTImageProcessor
                         at 64 x 64 (ImageNet's mean and std). Every parameter is random, LayerScale and LayerNorm
                         included, so a misplaced one shows.
    check STORE SPLIT DIR FEATURES
                         reads the split with zarr-python, makes 8-bit levels round(v / 257) repeated to RGB, runs the
                         snapshot's processor and model and prints the largest difference of its pooler_output from
                         the features radit wrote (JSON)
"""

import json
import sys

import numpy as np
import torch


def make(out, seed):
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    torch.manual_seed(int(seed))
    config = DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             patch_size=16, image_size=64, num_register_tokens=4, rope_theta=100.0)
    model = DINOv3ViTModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "lambda1")) else 0.0
            p.copy_(centre + 0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    DINOv3ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out)


def check(store, split, snapshot, features):
    import zarr
    from transformers import AutoImageProcessor, DINOv3ViTModel

    root = zarr.open_group(store, mode="r")
    levels = np.round(root[f"{split}/images"][:].astype(np.float64) / 257.0).astype(np.uint8)
    processor = AutoImageProcessor.from_pretrained(snapshot)
    model = DINOv3ViTModel.from_pretrained(snapshot).eval()
    images = [torch.from_numpy(np.repeat(u[None], 3, axis=0)) for u in levels]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        want = model(pixel_values=pixels).pooler_output.numpy()
    got = np.load(features)
    print(json.dumps({
        "shape": list(got.shape), "want_shape": list(want.shape), "input": list(pixels.shape),
        "max_abs_diff": float(np.abs(got - want).max()), "scale": float(np.abs(want).max()),
    }))


if __name__ == "__main__":
    {"make": make, "check": check}[sys.argv[1]](*sys.argv[2:])

"""The native DINOv2 feature network's twin, for tests/eval_metrics.rs: transformers' own Dinov2Model and image
processor, never radit's code.

    make DIR IMAGE_SIZE NAMING SEED
                         a tiny random Dinov2Model (2 layers, hidden 32) saved as a Hugging Face snapshot: config.json,
                         model.safetensors (NAMING `release`: the hub's names, `attention.attention.query`; `v5`:
                         transformers 5's `attention.q_proj`) and a BitImageProcessor's preprocessor_config.json
                         (shortest edge 98, centre crop 84, bicubic, a mean and std of its own). Every parameter is
                         random, LayerScale and LayerNorm included, so a misplaced one shows.
    check STORE SPLIT DIR CHAIN FEATURES
                         reads the split with zarr-python, makes 8-bit levels round(v / 257), prepares them with the
                         snapshot's processor (CHAIN `processor`), or with CheXGenBench's chain before it (`chexgenbench`:
                         PIL RGB, torchvision Resize((299, 299)), ToTensor, x 255, uint8), runs the model and prints
                         the largest difference of its pooler_output from the features radit wrote (JSON)
    perceptual DIR OUT   the Rad-DINO perceptual distance (radvae.md, Eq. 13) written from the design note on
                         transformers' model: two seeded batches of grey images in [0, 1], repeated to RGB, a
                         bicubic resize (align_corners False) to the crop size, the processor's mean and std, every
                         layer's tokens (hidden_states[1:]) L2-normalised (eps 1e-6), the squared difference
                         averaged over tokens and channels and summed over layers; OUT gets x, y, the distance per
                         sample and the gradient of its sum with respect to y
    predictor DIR WEIGHTS OUT
                         the attention-pooling metadata predictor (editing.md) written from the design note on
                         transformers' model: seeded grey images in [-1, 1] at the predictor's side, mapped to [0, 1],
                         repeated to RGB, a bicubic resize to the crop size, the processor's mean and std; the patch
                         tokens of the configured layers (hidden_states[k], CLS dropped) concatenated; per task a query
                         q weighs softmax_tokens(LN(h) q / sqrt(D)) and pools LN(h) into h_a, then the task's linear
                         head; OUT gets x, the outputs (tasks in the store's order, then age) and the embeddings
    bench-predictor DIR BATCH STEPS THREADS
                         the benchmark's PyTorch side of a predictor training step: grey 512x512 images, the
                         frozen model's layers 3, 6, 9, 12 at the crop size (no gradient), attention pooling and the
                         19 heads, the cross-entropy and age losses, backward and AdamW; the median step (JSON)
    make-base DIR        a randomly initialised ViT-B/14 at 518 (Rad-DINO's shape: 12 layers, hidden 768, 86.6M
                         parameters) with a 518 processor, for the benchmark
    time STORE SPLIT DIR BATCH
                         the benchmark's PyTorch side: what `check` does (zarr-python read, processor, model), timed
                         from the read to the last feature; images/s as JSON
"""

import json
import sys

import numpy as np
import torch


def make(out, image_size, naming, seed):
    from safetensors.torch import save_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(int(seed))
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          mlp_ratio=4, patch_size=14, image_size=int(image_size), layer_norm_eps=1e-6)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # scales (LayerNorm weights, LayerScale) around 1, everything else around 0
            centre = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1")) else 0.0
            p.copy_(centre + 0.3 * torch.randn_like(p))
    config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if naming == "release":
        renames = [(".attention.q_proj.", ".attention.attention.query."),
                   (".attention.k_proj.", ".attention.attention.key."),
                   (".attention.v_proj.", ".attention.attention.value."),
                   (".attention.o_proj.", ".attention.output.dense.")]
        for old, new in renames:
            state = {k.replace(old, new): v for k, v in state.items()}
    save_file(state, f"{out}/model.safetensors", metadata={"format": "pt"})
    BitImageProcessor(size={"shortest_edge": 98}, crop_size={"height": 84, "width": 84},
                      image_mean=[0.531, 0.529, 0.532], image_std=[0.258, 0.261, 0.255]).save_pretrained(out)


def prepared(levels, snapshot, chain):
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(snapshot)
    if chain == "processor":
        images = [torch.from_numpy(np.repeat(u[None], 3, axis=0)) for u in levels]
    else:
        import torchvision.transforms as T

        chain = T.Compose([T.Resize((299, 299)), T.ToTensor()])
        images = [(chain(Image.fromarray(u).convert("RGB")) * 255).to(torch.uint8) for u in levels]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def check(store, split, snapshot, chain, features):
    import zarr
    from transformers import Dinov2Model

    root = zarr.open_group(store, mode="r")
    levels = np.round(root[f"{split}/images"][:].astype(np.float64) / 257.0).astype(np.uint8)
    model = Dinov2Model.from_pretrained(snapshot).eval()
    with torch.no_grad():
        want = model(pixel_values=prepared(levels, snapshot, chain)).pooler_output.numpy()
    got = np.load(features)
    print(json.dumps({
        "shape": list(got.shape), "want_shape": list(want.shape),
        "max_abs_diff": float(np.abs(got - want).max()), "scale": float(np.abs(want).max()),
    }))


def make_base(out):
    from safetensors.torch import save_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(image_size=518, patch_size=14, hidden_size=768, num_hidden_layers=12,
                          num_attention_heads=12, layer_norm_eps=1e-6)
    model = Dinov2Model(config).eval()
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/model.safetensors",
              metadata={"format": "pt"})
    BitImageProcessor(size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)


def time_model(store, split, snapshot, batch):
    import time

    import zarr
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(snapshot).eval()
    batch = int(batch)
    start = time.perf_counter()
    root = zarr.open_group(store, mode="r")
    levels = np.round(root[f"{split}/images"][:].astype(np.float64) / 257.0).astype(np.uint8)
    with torch.no_grad():
        for i in range(0, len(levels), batch):
            model(pixel_values=prepared(levels[i:i + batch], snapshot, "processor")).pooler_output.numpy()
    seconds = time.perf_counter() - start
    print(json.dumps({"images": len(levels), "seconds": seconds, "images_per_second": len(levels) / seconds}))


def frozen_with_input(snapshot):
    """The snapshot's model, frozen, and its input from grey images in [0, 1] as the design notes write it: repeated
    to RGB, a bicubic resize (align_corners False) to the crop size, the processor's mean and std."""
    import torch.nn.functional as F
    from transformers import AutoImageProcessor, Dinov2Model

    processor = AutoImageProcessor.from_pretrained(snapshot)
    model = Dinov2Model.from_pretrained(snapshot).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    side = (processor.crop_size["height"], processor.crop_size["width"])
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    def unit_input(images):
        rgb = F.interpolate(images.repeat(1, 3, 1, 1), size=side, mode="bicubic", align_corners=False)
        return (rgb - mean) / std

    return model, unit_input


def perceptual(snapshot, out):
    import torch.nn.functional as F
    from safetensors.torch import save_file

    model, unit_input = frozen_with_input(snapshot)
    torch.manual_seed(3)
    x = torch.rand(2, 1, 40, 48)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)

    def layers(images):
        return model(pixel_values=unit_input(images), output_hidden_states=True).hidden_states[1:]

    d = sum(((F.normalize(a, dim=-1, eps=1e-6) - F.normalize(b, dim=-1, eps=1e-6)) ** 2).mean(dim=(1, 2))
            for a, b in zip(layers(x), layers(y)))
    d.sum().backward()
    save_file({"x": x, "y": y.detach(), "distance": d.detach(), "grad_y": y.grad}, out)


FINDINGS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum", "fracture",
            "lung_lesion", "lung_opacity", "no_finding", "pleural_effusion", "pleural_other", "pneumonia",
            "pneumothorax", "support_devices"]
TASKS = FINDINGS + ["race", "sex", "view", "dataset", "age"]


def predictor(snapshot, weights, out):
    import torch.nn.functional as F
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(weights, "pt") as f:
        config = json.loads(f.metadata()["radit.config"])
    w = load_file(weights)
    model, unit_input = frozen_with_input(snapshot)
    s = config["image_size"]
    torch.manual_seed(5)
    x = torch.rand(3, 1, s, s) * 2 - 1
    with torch.no_grad():
        hidden = model(pixel_values=unit_input((x + 1) / 2), output_hidden_states=True).hidden_states
        h = torch.cat([hidden[k][:, 1:] for k in config["layers"]], dim=-1)
        d = h.shape[-1]
        n = F.layer_norm(h, (d,), w["pool.norm.weight"], w["pool.norm.bias"], eps=1e-5)
        weights_ = torch.softmax(n @ w["pool.query"].T / d ** 0.5, dim=1)  # [B, N, T]
        pooled = weights_.transpose(1, 2) @ n  # [B, T, D]
        outputs = torch.cat([pooled[:, t] @ w[f"heads.{name}.weight"].T + w[f"heads.{name}.bias"]
                             for t, name in enumerate(TASKS)], dim=1)
    save_file({"x": x, "outputs": outputs.contiguous(), "embeddings": pooled.contiguous()}, out)


def bench_predictor(snapshot, batch, steps, threads):
    import time

    import torch.nn.functional as F

    torch.set_num_threads(int(threads))
    batch, steps = int(batch), int(steps)
    model, unit_input = frozen_with_input(snapshot)
    layers = [3, 6, 9, 12]
    d = model.config.hidden_size * len(layers)
    classes = [2] * 14 + [3, 2, 3, 7]
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(d)
    query = torch.nn.Parameter(torch.randn(len(classes) + 1, d) * 0.02)
    heads = torch.nn.ModuleList([torch.nn.Linear(d, k) for k in classes + [1]])
    params = list(norm.parameters()) + [query] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    x = torch.rand(batch, 1, 512, 512)
    labels = [torch.randint(0, k, (batch,)) for k in classes]
    age = torch.rand(batch)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.no_grad():
            hidden = model(pixel_values=unit_input(x), output_hidden_states=True).hidden_states
            h = torch.cat([hidden[k][:, 1:] for k in layers], dim=-1)
        n = norm(h)
        pooled = torch.softmax(n @ query.T / d ** 0.5, dim=1).transpose(1, 2) @ n
        loss = sum(F.cross_entropy(heads[t](pooled[:, t]), labels[t], reduction="none") for t in range(len(classes)))
        loss = (loss + (heads[-1](pooled[:, -1]).squeeze(1) - age) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i > 0:
            times.append(time.perf_counter() - start)
    times.sort()
    print(json.dumps({"impl": "pytorch", "batch": batch, "threads": int(threads), "steps": steps,
                      "median_s": times[len(times) // 2]}))


if __name__ == "__main__":
    {"make": make, "make-base": make_base, "check": check, "time": time_model, "perceptual": perceptual,
     "predictor": predictor, "bench-predictor": bench_predictor}[sys.argv[1]](*sys.argv[2:])

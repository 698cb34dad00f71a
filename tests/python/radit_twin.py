"""The PyTorch twin of RadiT, written from ../shared/design/model.md independently of the Rust port.

The parity tests build a small model here, export its weights to safetensors under the same parameter names the
Rust model uses, run both on the same inputs, and compare every intermediate and the loss.

Commands (run by tests/model_parity.rs and scripts/bench-model.sh):
    export --preset P --out DIR [--perturb]   DIR/weights.safetensors (the model, its config in the metadata),
                                              DIR/inputs.safetensors (x1, x0, t, labels, age),
                                              DIR/outputs.safetensors (patch_embed, c, block.{i}, velocity, loss),
                                              DIR/grads.safetensors (d loss / d parameter);
                                              --perturb moves the zero-initialised weights so every path is exercised
    odeint --dir DIR                          torchdiffeq dopri5 of the exported model, 0 -> 1 from x0 and 1 -> 0
                                              from x1, plus an analytic float64 ODE: DIR/ode.safetensors + JSON NFEs
    check-load --dir DIR --weights FILE       loads weights written by Rust (strict names and shapes) and checks that
                                              the forward pass reproduces DIR/outputs.safetensors
    load --preset P --weights FILE            loads weights (e.g. from `radit export`) strictly
    bench --preset P --batch B --threads T    forward+backward step time
    count --preset P                          the parameter count as the spec counts it
    bench-edit --dir DIR --edits OUT --batch B --threads T
                                              the counterfactual edits `radit edit` wrote to OUT, redone here from its
                                              originals and edits.csv's factual and edited profiles (same model, same
                                              batches): x0 = ODE(x, 1 -> 0 | factual), x' = ODE(x0, 0 -> 1 | edited),
                                              torchdiffeq dopri5 at 1e-5; images/s, model evaluations per image, and
                                              the largest difference from radit's PNGs in 16-bit levels (JSON)
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchdiffeq import odeint

# Classes per categorical variable, in the dataset's order: 14 findings, race, sex, view, dataset.
CLASSES = [3] * 14 + [4, 3, 4, 8]


@dataclass
class Config:
    in_channels: int
    input_size: int
    patch: int
    hidden: int
    depth: int
    heads: int
    classes: list = field(default_factory=lambda: list(CLASSES))
    mlp_bias: bool = True
    time_scale: float = 1.0

    def to_json(self) -> str:
        """The Rust RadiTConfig's field names, so Rust reads the architecture from the weights file."""
        d = asdict(self)
        return json.dumps(
            {
                "in_channels": d["in_channels"],
                "input_size": d["input_size"],
                "patch_size": d["patch"],
                "hidden": d["hidden"],
                "depth": d["depth"],
                "heads": d["heads"],
                "mlp_hidden": None,
                "mlp_bias": d["mlp_bias"],
                "classes": d["classes"],
                "time_scale": d["time_scale"],
                "conditioning": "sum",
            }
        )

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * 8 / 3)


PRESETS = {
    "b-pixel": Config(1, 512, 16, 1024, 16, 16),
    "b-latent": Config(32, 64, 2, 1024, 16, 16),
    "xl-latent": Config(32, 64, 2, 1536, 32, 24),
    "tiny": Config(1, 16, 4, 64, 2, 4),
    "tiny-latent": Config(4, 8, 2, 48, 2, 3),
}


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """First half encodes the column index, second half the row index; tokens row-major."""
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def timestep_sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_sinusoid(t))


class MetadataEmbedder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(k, cfg.hidden) for k in cfg.classes)
        self.age = TimestepEmbedder(cfg.hidden)
        self.age_null = nn.Parameter(torch.zeros(cfg.hidden))
        self.n = len(cfg.classes) + 1

    def forward(self, labels, age):
        total = sum(table(labels[:, i].long()) for i, table in enumerate(self.tables))
        missing = torch.isnan(age)
        a = self.age(torch.where(missing, torch.zeros_like(age), age))
        a = torch.where(missing[:, None], self.age_null[None].expand_as(a), a)
        return (total + a) / math.sqrt(self.n)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dh)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.hidden
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(d, cfg.mlp_hidden, cfg.mlp_bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        sm, cm, gm, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gm[:, None] * self.attn(modulate(self.norm1(x), sm, cm))
        return x + gf[:, None] * self.mlp(modulate(self.norm2(x), sf, cf))


class FinalLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.hidden
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, cfg.patch * cfg.patch * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden, cfg.patch, stride=cfg.patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RadiT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.input_size // cfg.patch
        self.x_embedder = PatchEmbed(cfg)
        self.register_buffer("pos_embed", sincos_2d(cfg.hidden, self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(cfg.hidden)
        self.y_embedder = MetadataEmbedder(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize()

    def initialize(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for table in self.y_embedder.tables:
            nn.init.normal_(table.weight, std=0.02)
        for emb in (self.t_embedder, self.y_embedder.age):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[1].weight)
            nn.init.zeros_(blk.adaLN_modulation[1].bias)
        for lin in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x):
        p, c, g = self.cfg.patch, self.cfg.in_channels, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, labels, age, trace=None):
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t * self.cfg.time_scale) + self.y_embedder(labels, age)
        if trace is not None:
            trace["patch_embed"] = h
            trace["c"] = c
        for i, blk in enumerate(self.blocks):
            h = blk(h, c)
            if trace is not None:
                trace[f"block.{i}"] = h
        v = self.unpatchify(self.final_layer(h, c))
        if trace is not None:
            trace["velocity"] = v
        return v


def shift(t: torch.Tensor, s: float) -> torch.Tensor:
    return t / (s - (s - 1) * t)


def loss(model, x1, x0, t, labels, age, trace=None):
    tt = t[:, None, None, None]
    xt = tt * x1 + (1 - tt) * x0
    v = model(xt, t, labels, age, trace)
    return ((v.float() - (x1 - x0)) ** 2).mean()


def count_parameters(model: RadiT) -> int:
    """As the spec counts them: every learnable parameter except the age null vector (pos_embed is a buffer)."""
    return sum(p.numel() for n, p in model.named_parameters() if n != "y_embedder.age_null")


def save(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def export(args) -> None:
    torch.manual_seed(args.seed)
    cfg = PRESETS[args.preset]
    model = RadiT(cfg)
    if args.perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or name.startswith("final_layer") or name.endswith("age_null"):
                    p.normal_(0, 0.05)
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    batch = args.batch
    x1 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    x0 = torch.randn_like(x1)
    t = shift(torch.rand(batch), 3.0)
    labels = torch.stack([torch.randint(0, k, (batch,)) for k in cfg.classes], dim=1)
    age = torch.rand(batch)
    age[0] = float("nan")
    trace = {}
    value = loss(model, x1, x0, t, labels, age, trace)
    value.backward()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    save(out / "weights.safetensors", params, {"format": "pt", "radit.config": cfg.to_json()})
    save(out / "grads.safetensors", {n: p.grad for n, p in params.items()})
    save(out / "inputs.safetensors", {"x1": x1, "x0": x0, "t": t, "labels": labels, "age": age})
    trace["loss"] = value.reshape(1)
    save(out / "outputs.safetensors", trace)
    (out / "preset").write_text(args.preset)
    print(json.dumps({"parameters": count_parameters(model), "loss": value.item()}))


def load_exported(d: Path, weights: Path | None = None):
    cfg = PRESETS[(d / "preset").read_text()]
    model = RadiT(cfg)
    state = load_file(str(weights or d / "weights.safetensors"))
    model.load_state_dict(state, strict=True)  # every name and shape must match
    return model, load_file(str(d / "inputs.safetensors"))


def analytic_field(t, y):
    """A nonlinear float64 test field that the Rust test reproduces op for op."""
    return torch.cos(3 * t) * y - 0.5 * y**3 + t


def ode(args) -> None:
    d = Path(args.dir)
    model, inp = load_exported(d)
    nfe = {"forward": 0, "reverse": 0, "analytic": 0}

    def field(key, labels, age):
        def f(t, x):
            nfe[key] += 1
            with torch.no_grad():
                return model(x, t.expand(x.shape[0]).float(), labels, age)

        return f

    opts = dict(method="dopri5", atol=args.tol, rtol=args.tol)
    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    fwd = odeint(field("forward", inp["labels"], inp["age"]), inp["x0"], times, **opts)[-1]
    rev = odeint(field("reverse", inp["labels"], inp["age"]), inp["x1"], times.flip(0), **opts)[-1]

    def counted(t, y):
        nfe["analytic"] += 1
        return analytic_field(t, y)

    y0 = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)
    ana = odeint(counted, y0, torch.tensor([0.0, 2.0], dtype=torch.float64), method="dopri5", atol=1e-9, rtol=1e-7)
    save(d / "ode.safetensors", {"forward": fwd, "reverse": rev, "analytic_y0": y0, "analytic": ana[-1]})
    (d / "ode.json").write_text(json.dumps(nfe))
    print(json.dumps(nfe))


def check_load(args) -> None:
    d = Path(args.dir)
    model, inp = load_exported(d, Path(args.weights))
    want = load_file(str(d / "outputs.safetensors"))
    with torch.no_grad():
        got = loss(model, inp["x1"], inp["x0"], inp["t"], inp["labels"], inp["age"])
    err = abs(got.item() - want["loss"].item()) / max(abs(want["loss"].item()), 1e-12)
    print(json.dumps({"loss": got.item(), "relative_error": err}))
    if err > 1e-6:
        raise SystemExit(f"the loss of the reloaded weights differs: {got.item()} vs {want['loss'].item()}")


def load_only(args) -> None:
    model = RadiT(PRESETS[args.preset])
    state = load_file(args.weights)
    model.load_state_dict(state, strict=True)  # every name and shape must match
    print(json.dumps({"loaded": len(state), "parameters": count_parameters(model)}))


def bench(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    model = RadiT(cfg)
    with torch.no_grad():  # move the zero-initialised layers so the backward does real work everywhere
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer"):
                p.normal_(0, 0.02)
    b = args.batch
    x1 = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size)
    x0 = torch.randn_like(x1)
    t = torch.rand(b)
    labels = torch.stack([torch.randint(0, k, (b,)) for k in cfg.classes], dim=1)
    age = torch.rand(b)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss(model, x1, x0, t, labels, age).backward()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    print(json.dumps({"impl": "pytorch", "preset": args.preset, "batch": b, "threads": args.threads,
                      "steps": args.steps, "median_s": times[len(times) // 2], "min_s": times[0]}))


# The store's vocabulary (sharding/src/schema.rs): class ids from 1, 0 = missing.
VOCAB = {
    "race": ["Asian", "Black", "White"],
    "sex": ["Male", "Female"],
    "view": ["AP", "PA", "Lateral"],
    "dataset": ["MIMIC-CXR", "CheXpert-Plus", "ReXGradient-160K", "PadChest", "VinDr-CXR", "NIH-CXR14", "BRAX"],
}
FINDINGS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum", "fracture",
            "lung_lesion", "lung_opacity", "no_finding", "pleural_effusion", "pleural_other", "pneumonia",
            "pneumothorax", "support_devices"]


def profile(row: dict, prefix: str):
    labels = []
    for name in FINDINGS + list(VOCAB):
        v = row[prefix + name]
        classes = VOCAB.get(name, ["negative", "positive"])
        labels.append(classes.index(v) + 1 if v else 0)
    age = row[prefix + "age"]
    return labels, (float(age) / 100 if age else float("nan"))


def bench_edit(args) -> None:
    import csv

    import numpy as np
    from PIL import Image

    torch.set_num_threads(args.threads)
    model, _ = load_exported(Path(args.dir))
    model.eval()
    out = Path(args.edits)
    rows = list(csv.DictReader(open(out / "edits.csv")))
    read = lambda p: np.array(Image.open(out / p), dtype=np.int64)  # noqa: E731
    nfe = 0
    worst = 0
    seconds = 0.0

    def field(labels, age):
        def f(t, x):
            nonlocal nfe
            nfe += 1
            return model(x, t.expand(x.shape[0]).float(), labels, age)
        return f

    # The job's units: per intervention, its patients in batches of B, in the table's order.
    units = []
    for r in rows:
        if not units or units[-1][0]["intervention"] != r["intervention"] or len(units[-1]) == args.batch:
            units.append([])
        units[-1].append(r)
    opts = dict(method="dopri5", atol=1e-5, rtol=1e-5)
    for unit in units:
        levels = np.stack([read(r["original"]) for r in unit])
        x = torch.from_numpy((2 * (levels + 0.5) / 65536 - 1).astype(np.float32)).unsqueeze(1)
        fl, fa = zip(*(profile(r, "factual_") for r in unit))
        el, ea = zip(*(profile(r, "") for r in unit))
        fl, el = torch.tensor(fl), torch.tensor(el)
        fa, ea = torch.tensor(fa, dtype=torch.float32), torch.tensor(ea, dtype=torch.float32)
        start = time.perf_counter()
        with torch.no_grad():
            x0 = odeint(field(fl, fa), x, torch.tensor([1.0, 0.0], dtype=torch.float64), **opts)[-1]
            x1 = odeint(field(el, ea), x0, torch.tensor([0.0, 1.0], dtype=torch.float64), **opts)[-1]
        seconds += time.perf_counter() - start
        mine = ((x1.clamp(-1, 1) + 1) / 2 * 65536 - 0.5).round().clamp(0, 65535).squeeze(1).numpy()
        theirs = np.stack([read(r["file"]) for r in unit])
        worst = max(worst, int(np.abs(mine - theirs).max()))
    print(json.dumps({"impl": "pytorch", "images": len(rows), "seconds": seconds,
                      "images_per_second": len(rows) / seconds, "nfe_per_image": nfe / len(units),
                      "max_level_difference": worst}))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=int, default=3)
    e.add_argument("--out", required=True)
    e.add_argument("--perturb", action="store_true")
    c = sub.add_parser("count")
    c.add_argument("--preset", required=True, choices=sorted(PRESETS))
    o = sub.add_parser("odeint")
    o.add_argument("--dir", required=True)
    o.add_argument("--tol", type=float, default=1e-5)
    k = sub.add_parser("check-load")
    k.add_argument("--dir", required=True)
    k.add_argument("--weights", required=True)
    ld = sub.add_parser("load")
    ld.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ld.add_argument("--weights", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--preset", default="b-latent", choices=sorted(PRESETS))
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--steps", type=int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    be = sub.add_parser("bench-edit")
    be.add_argument("--dir", required=True)
    be.add_argument("--edits", required=True)
    be.add_argument("--batch", type=int, default=16)
    be.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.cmd == "bench-edit":
        bench_edit(args)
        return
    if args.cmd == "export":
        export(args)
    elif args.cmd == "odeint":
        ode(args)
    elif args.cmd == "check-load":
        check_load(args)
    elif args.cmd == "load":
        load_only(args)
    elif args.cmd == "bench":
        bench(args)
    else:
        with torch.device("meta"):
            model = RadiT(PRESETS[args.preset])
        print(count_parameters(model))


if __name__ == "__main__":
    main()

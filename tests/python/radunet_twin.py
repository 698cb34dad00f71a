"""The PyTorch twin of RadUNet, written from ../shared/design/radunet.md (EDM2's U-Net, magnitude-preserving and
bias-free, its raw output the rectified-flow velocity, t in [0, 1] as the noise label, the 19 metadata variables
through magnitude-preserving layers) independently of the Rust code.

    python radunet_twin.py export --out DIR [--dropout P]
    python radunet_twin.py bench PRESET BATCH THREADS STEPS
    python radunet_twin.py export-vae --out DIR      (RadVAE Scratch, tiny: see export_vae)


builds the tiny U-Net (16x16x1, 16 channels x [1, 2], one block per level, attention at 8x8, 16-channel heads),
sets its zero-initialised gains to random values so every parameter gets a gradient (with --dropout P, the residual
branches drop at rate P with masks keyed by (seed, step, sample, block, element) as the Rust model keys them), and
writes
DIR/weights.safetensors (parameters and MPFourier buffers under the Rust names, the config in the metadata),
DIR/inputs.safetensors (x1, x0, t, labels, age, the dropout keys), DIR/outputs.safetensors (velocity, loss), DIR/grads.safetensors
(d loss / d parameter) and DIR/after_step.safetensors (the parameters after one SGD step of lr 0.1 followed by
forced weight normalisation of every MPConv weight). tests/unet_parity.rs checks the Rust model against all of it.
"""

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

CLASSES = [3] * 14 + [4, 3, 4, 8]
LR = 0.1
# The dropout keys of the export: seed, step and the batch's global sample indices.
SEED, STEP, SAMPLES = 5, 3, [40, 41, 42, 43]

M64 = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix(z):
    z = (z + GOLDEN) & M64
    z = ((z ^ (z >> 30)) * MIX1) & M64
    z = ((z ^ (z >> 27)) * MIX2) & M64
    return z ^ (z >> 31)


def signed(u):
    return u - (1 << 64) if u >= 1 << 63 else u


def sample_key(seed, step, sample):
    """A sample's dropout key for a step: splitmix(splitmix(splitmix(seed) ^ step) ^ sample)."""
    return signed(splitmix(splitmix(splitmix(seed) ^ step) ^ sample))


def shift_right(x, s):
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def keyed_uniform(keys, block, rest):
    """24-bit uniforms in [0, 1) of shape [B, *rest]: SplitMix64's finaliser of key + block x golden + element x
    MIX1, in int64 arithmetic that wraps, so every device computes the same bits."""
    per = math.prod(rest)
    x = keys[:, None] + signed((block * GOLDEN) & M64) + torch.arange(per, dtype=torch.int64)[None, :] * signed(MIX1)
    x = (x ^ shift_right(x, 30)) * signed(MIX1)
    x = (x ^ shift_right(x, 27)) * signed(MIX2)
    x = x ^ shift_right(x, 31)
    return (shift_right(x, 40).float() / (1 << 24)).view(keys.shape[0], *rest)


def normalize(x, dims=None, eps=1e-4):
    """x / (RMS over dims + eps), the RMS in float32; dims default to all but the first."""
    if dims is None:
        dims = list(range(1, x.ndim))
    kept = 1
    for d in dims:
        kept *= x.shape[d]
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    return x / (eps + norm / math.sqrt(kept)).to(x.dtype)


def mp_silu(x):
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t):
    return (a * (1 - t) + b * t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t):
    na, nb = a.shape[1], b.shape[1]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], dim=1)


def down(x):
    """The [1, 1] filter, down: a depthwise 2x2 average with stride 2."""
    c = x.shape[1]
    f = torch.full((c, 1, 2, 2), 0.25, dtype=x.dtype)
    return torch.nn.functional.conv2d(x, f, stride=2, groups=c)


def up(x):
    """The [1, 1] filter, up: a depthwise transposed 2x2 of ones with stride 2 (nearest neighbour x2)."""
    c = x.shape[1]
    f = torch.ones((c, 1, 2, 2), dtype=x.dtype)
    return torch.nn.functional.conv_transpose2d(x, f, stride=2, groups=c)


class MPFourier(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(n))
        self.register_buffer("phases", 2 * math.pi * torch.rand(n))

    def forward(self, x):
        return torch.cos(torch.outer(x.float(), self.freqs) + self.phases) * math.sqrt(2)


class MPConv(torch.nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        shape = (cout, cin) if k == 0 else (cout, cin, k, k)
        self.weight = torch.nn.Parameter(torch.randn(shape))

    def forward(self, x, gain=1.0):
        w = normalize(self.weight) * (gain / math.sqrt(self.weight[0].numel()))
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(torch.nn.Module):
    def __init__(self, cin, cout, cemb, flavor, mode, attention, cph, index, dropout):
        super().__init__()
        self.flavor, self.mode = flavor, mode
        self.index, self.dropout = index, dropout
        self.heads = cout // cph if attention else 0
        # RadVAE's blocks have no embedding (cemb None).
        if cemb is not None:
            self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, 3)
        self.emb_linear = MPConv(cemb, cout, 0) if cemb is not None else None
        self.conv_res1 = MPConv(cout, cout, 3)
        self.conv_skip = MPConv(cin, cout, 1) if cin != cout else None
        self.attn_qkv = MPConv(cout, 3 * cout, 1) if attention else None
        self.attn_proj = MPConv(cout, cout, 1) if attention else None

    def forward(self, x, emb, keys=None):
        if self.mode == "down":
            x = down(x)
        elif self.mode == "up":
            x = up(x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, [1])
        y = self.conv_res0(mp_silu(x))
        if self.emb_linear is not None:
            y = y * (self.emb_linear(emb, gain=self.emb_gain) + 1)[:, :, None, None]
        y = mp_silu(y)
        if keys is not None and self.dropout > 0:
            keep = keyed_uniform(keys, self.index, list(y.shape[1:])) >= self.dropout
            y = y * keep.to(y.dtype) / (1 - self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, 0.3)
        if self.heads:
            n, ch, h, w = x.shape
            y = self.attn_qkv(x).reshape(n, self.heads, -1, 3, h * w)
            q, k, v = normalize(y, [2]).unbind(3)
            a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", a, v)
            x = mp_sum(x, self.attn_proj(y.reshape(n, ch, h, w)), 0.3)
        return x.clamp(-256, 256)


class Metadata(torch.nn.Module):
    """One MPConv per variable on its sqrt(K)-scaled one-hot; age through MPFourier and an MPConv, or a learned null
    vector of unit RMS when missing; the 19 summed and divided by sqrt(19)."""

    def __init__(self, classes, cfourier, cemb):
        super().__init__()
        self.classes = classes
        self.tables = torch.nn.ModuleList(MPConv(k, cemb, 0) for k in classes)
        self.age_fourier = MPFourier(cfourier)
        self.age_linear = MPConv(cfourier, cemb, 0)
        self.age_null = MPConv(cemb, 1, 0)  # its weight [1, cemb] is the null vector, normalised as a whole

    def forward(self, labels, age):
        total = 0
        for i, (table, k) in enumerate(zip(self.tables, self.classes)):
            total = total + table(torch.nn.functional.one_hot(labels[:, i], k).float() * math.sqrt(k))
        known = torch.isfinite(age)[:, None]
        with_age = self.age_linear(self.age_fourier(torch.nan_to_num(age, nan=0.0)))
        null = normalize(self.age_null.weight).expand(age.shape[0], -1)
        total = total + torch.where(known, with_age, null)
        return total / math.sqrt(len(self.classes) + 1)


class RadUNet(torch.nn.Module):
    def __init__(self, res, ch, mc, mult, blocks, attn, cph, classes, dropout):
        super().__init__()
        blocks_made = [0]

        def block(*args):
            b = Block(*args, blocks_made[0], dropout)
            blocks_made[0] += 1
            return b

        widths = [mc * m for m in mult]
        cnoise, cemb = widths[0], max(widths)
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, 0)
        self.emb_label = Metadata(classes, cnoise, cemb)
        self.enc = torch.nn.ModuleDict()
        self.dec = torch.nn.ModuleDict()
        cout = ch + 1
        skips = []
        for level, c in enumerate(widths):
            r = res >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = MPConv(cout, c, 3)
                cout = c
            else:
                self.enc[f"{r}x{r}_down"] = block(cout, cout, cemb, "enc", "down", False, cph)
            skips.append(cout)
            for i in range(blocks):
                self.enc[f"{r}x{r}_block{i}"] = block(cout, c, cemb, "enc", "keep", r in attn, cph)
                cout = c
                skips.append(cout)
        for level, c in reversed(list(enumerate(widths))):
            r = res >> level
            if level == len(widths) - 1:
                self.dec[f"{r}x{r}_in0"] = block(cout, cout, cemb, "dec", "keep", True, cph)
                self.dec[f"{r}x{r}_in1"] = block(cout, cout, cemb, "dec", "keep", False, cph)
            else:
                self.dec[f"{r}x{r}_up"] = block(cout, cout, cemb, "dec", "up", False, cph)
            for i in range(blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = block(cout + skips.pop(), c, cemb, "dec", "keep", r in attn, cph)
                cout = c
        self.out_conv = MPConv(cout, ch, 3)

    def forward(self, x, t, labels, age, keys=None):
        emb = mp_silu(mp_sum(self.emb_noise(self.emb_fourier(t)), self.emb_label(labels, age), 0.5))
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb, keys)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), 0.5)
            x = layer(x, emb, keys)
        return self.out_conv(x, gain=self.out_gain)


class RadVAE(torch.nn.Module):
    """RadVAE (Scratch), from latents.md: the image and a ones channel through a 3x3 MPConv; per level a down block
    (after the first) and `blocks` encoder blocks; at the bottleneck an attention block and a plain block; a 1x1 MPConv
    to 2 x latent channels (mean, log-variance). The decoder: a 1x1 MPConv from the latent to the bottleneck's width,
    an attention block and a plain block, per level from the lowest an up block (but at the lowest) and `blocks`
    decoder blocks, a 3x3 MPConv to the image. No embedding, no skips, no dropout."""

    def __init__(self, res, ch, latent, mc, mult, blocks, cph):
        super().__init__()
        widths = [mc * m for m in mult]
        low = res >> (len(widths) - 1)
        self.latent = latent
        self.enc = torch.nn.ModuleDict()
        self.dec = torch.nn.ModuleDict()
        index = [0]

        def block(cin, cout, flavor, mode, attention):
            b = Block(cin, cout, None, flavor, mode, attention, cph, index[0], 0.0)
            index[0] += 1
            return b

        self.enc[f"{res}x{res}_conv"] = MPConv(ch + 1, widths[0], 3)
        cout = widths[0]
        for level, c in enumerate(widths):
            r = res >> level
            if level > 0:
                self.enc[f"{r}x{r}_down"] = block(cout, cout, "enc", "down", False)
            for i in range(blocks):
                self.enc[f"{r}x{r}_block{i}"] = block(cout, c, "enc", "keep", False)
                cout = c
        self.enc[f"{low}x{low}_mid0"] = block(cout, cout, "enc", "keep", True)
        self.enc[f"{low}x{low}_mid1"] = block(cout, cout, "enc", "keep", False)
        self.enc["out"] = MPConv(cout, 2 * latent, 1)
        self.dec["in"] = MPConv(latent, cout, 1)
        self.dec[f"{low}x{low}_mid0"] = block(cout, cout, "dec", "keep", True)
        self.dec[f"{low}x{low}_mid1"] = block(cout, cout, "dec", "keep", False)
        for level, c in reversed(list(enumerate(widths))):
            r = res >> level
            if level < len(widths) - 1:
                self.dec[f"{r}x{r}_up"] = block(cout, cout, "dec", "up", False)
            for i in range(blocks):
                self.dec[f"{r}x{r}_block{i}"] = block(cout, c, "dec", "keep", False)
                cout = c
        self.dec["out_conv"] = MPConv(cout, ch, 3)

    def encode(self, x):
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        for name, layer in self.enc.items():
            h = layer(h) if name.endswith("_conv") or name == "out" else layer(h, None)
        return h[:, : self.latent], h[:, self.latent :]

    def decode(self, z):
        h = z
        for name, layer in self.dec.items():
            h = layer(h) if name in ("in", "out_conv") else layer(h, None)
        return h


TINY_VAE = dict(img_resolution=16, img_channels=1, latent_channels=4, model_channels=16, channel_mult=[1, 2],
                num_blocks=1, channels_per_head=16)


def export_vae(out: Path):
    """The tiny RadVAE's weights, an image batch, its mean and log-variance, the decoded mean, the L1 loss of that
    reconstruction and its gradients."""
    torch.manual_seed(11)
    cfg = TINY_VAE
    model = RadVAE(cfg["img_resolution"], cfg["img_channels"], cfg["latent_channels"], cfg["model_channels"],
                   cfg["channel_mult"], cfg["num_blocks"], cfg["channels_per_head"])
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    mean, logvar = model.encode(x)
    y = model.decode(mean)
    loss = (y - x).abs().mean()
    loss.backward()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "weights.safetensors", metadata={"radit.vae.config": json.dumps(cfg)})
    save_file({"x": x}, out / "inputs.safetensors")
    save_file({"mean": mean.detach().contiguous(), "logvar": logvar.detach().contiguous(),
               "decoded": y.detach(), "loss": loss.detach()}, out / "outputs.safetensors")
    save_file({n: p.grad.contiguous() for n, p in model.named_parameters()}, out / "grads.safetensors")


TINY = dict(img_resolution=16, img_channels=1, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8], channels_per_head=16, dropout=0.0, classes=CLASSES)


# The presets of radit's UNetConfig, for the benchmarks (the tiny one is the parity tests').
PRESETS = {
    "unet-tiny": TINY,
    "unet-small": dict(img_resolution=32, img_channels=32, model_channels=64, channel_mult=[1, 2, 3, 4], num_blocks=3,
                       attn_resolutions=[16, 8], channels_per_head=64, dropout=0.1, classes=CLASSES),
    "unet-latent": dict(img_resolution=64, img_channels=32, model_channels=256, channel_mult=[1, 2, 3, 4],
                        num_blocks=3, attn_resolutions=[16, 8], channels_per_head=64, dropout=0.1, classes=CLASSES),
}


def bench(preset: str, batch: int, threads: int, steps: int, warmup: int = 1) -> None:
    """`radit model bench`'s peer: the plain forward+backward of the velocity loss (no dropout, fresh gradients each
    step), then the forward alone; one JSON line."""
    import time

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model = build(cfg)
    with torch.no_grad():  # the zero-initialised gains moved so the backward does real work everywhere
        for p in model.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
    s, c = cfg["img_resolution"], cfg["img_channels"]
    x1, x0 = torch.randn(batch, c, s, s), torch.randn(batch, c, s, s)
    t = torch.rand(batch)
    labels = torch.stack([torch.randint(0, k, (batch,)) for k in CLASSES], dim=1)
    age = torch.rand(batch)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    times, forward = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        (model(xt, t, labels, age) - (x1 - x0)).square().mean().backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    with torch.no_grad():
        for i in range(warmup + steps):
            start = time.perf_counter()
            (model(xt, t, labels, age) - (x1 - x0)).square().mean()
            if i >= warmup:
                forward.append(time.perf_counter() - start)
    times.sort()
    forward.sort()
    print(json.dumps({"impl": "pytorch", "preset": preset, "batch": batch, "threads": threads, "steps": steps,
                      "median_s": times[len(times) // 2], "min_s": times[0],
                      "forward_median_s": forward[len(forward) // 2]}))


def build(cfg):
    return RadUNet(cfg["img_resolution"], cfg["img_channels"], cfg["model_channels"], cfg["channel_mult"],
                   cfg["num_blocks"], cfg["attn_resolutions"], cfg["channels_per_head"], cfg["classes"],
                   cfg["dropout"])


def export(out: Path, dropout: float):
    torch.manual_seed(7)
    cfg = dict(TINY, dropout=dropout)
    model = build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 0:
                p.copy_(torch.randn([]) * 0.5 + 1.0)
    b = 4
    x1 = torch.randn(b, 1, 16, 16)
    x0 = torch.randn(b, 1, 16, 16)
    t = torch.rand(b)
    labels = torch.stack([torch.randint(0, k, (b,)) for k in CLASSES], dim=1)
    age = torch.tensor([0.63, float("nan"), 0.2, 0.95])
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    keys = torch.tensor([sample_key(SEED, STEP, i) for i in SAMPLES], dtype=torch.int64)
    v = model(xt, t, labels, age, keys if dropout > 0 else None)
    loss = (v - (x1 - x0)).square().mean()
    loss.backward()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "weights.safetensors", metadata={"radit.unet.config": json.dumps(cfg)})
    save_file({"x1": x1, "x0": x0, "t": t, "labels": labels, "age": age, "keys": keys}, out / "inputs.safetensors")
    save_file({"velocity": v.detach(), "loss": loss.detach()}, out / "outputs.safetensors")
    save_file({n: p.grad.contiguous() for n, p in model.named_parameters()}, out / "grads.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
        for m in model.modules():
            if isinstance(m, MPConv):
                m.weight.copy_(normalize(m.weight))
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, out / "after_step.safetensors")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:2] == ["export-vae", "--out"] and len(args) == 3:
        export_vae(Path(args[2]))
        sys.exit(0)
    if args[:1] == ["bench"] and len(args) == 5:
        bench(args[1], int(args[2]), int(args[3]), int(args[4]))
        sys.exit(0)
    dropout = 0.0
    if len(args) == 5 and args[3] == "--dropout":
        dropout = float(args[4])
        args = args[:3]
    if len(args) != 3 or args[0] != "export" or args[1] != "--out":
        sys.exit(__doc__)
    export(Path(args[2]), dropout)

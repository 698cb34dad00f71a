"""The PyTorch twin of the FLUX.2 autoencoder, written from ../shared/design/latents.md independently of the Rust port.

What it is: a small, plain PyTorch implementation of the FLUX.1/FLUX.2 AE ("BFL" layout: GroupNorm + SiLU ResNet
blocks, a single-head attention mid block, asymmetric-pad stride-2 downsampling, nearest-x2 upsampling, 1x1
quant_conv / post_quant_conv, and a BatchNorm2d(4*z, affine=False) whose running statistics are carried but unused).
Greyscale handling follows the paper: the [-1, 1] input is repeated to 3 channels; the decoder's RGB is averaged.
Written from latents.md and the topology summary in the brief; public loaders were read for names only, not copied.

How tests use it: a Rust test runs `reference DIR`, loads DIR/weights_bfl.safetensors (or weights_diffusers, to test
the other naming) into the Rust AE, runs encode-mean and decode on DIR/io.safetensors's `x` / `z`, and compares
`mean`, `decoded` and the gradients `grad.<BFL name>` / `grad.x` of L = mean(encode_mean(x)^2) + mean(decode(z)^2).
Compare gradients with an absolute floor: grad of `*.mid.attn_1.k.bias` is analytically zero (softmax is invariant
to a per-query constant), so its stored values are round-off (~1e-9). Cross-checked once (outside the repo) against
diffusers 0.42 AutoencoderKLFlux2 loading weights_diffusers: outputs agree to ~5e-6, gradients to ~4e-6 relative.

Commands:
    count                      full-config parameter counts as JSON; exit 1 unless total == 84,046,115
    bench [--image-size 512] [--batch 1] [--steps 2] [--threads 2] [--mode encode|recon|finetune]
                               full-size encoder, reconstruction or decoder fine-tuning step throughput on the CPU
                               (JSON), beside `radit vae bench --mode`
    reference DIR [--seed S]   tiny config (ch 16, mult [1,2], 1 res block, z 4, 8 groups), fp32 CPU, writes
                               DIR/weights_bfl.safetensors, DIR/weights_diffusers.safetensors, DIR/io.safetensors,
                               DIR/config.json; checks the diffusers round trip and a reload of the BFL file
    lora DIR                   the decoder fine-tune (radvae.md): loads DIR/weights_bfl.safetensors (the tiny config)
                               frozen, puts peft-style LoRA branches on the layers DIR/lora.safetensors has
                               `<layer>.lora_A.weight` / `.lora_B.weight` for (scale from DIR/lora.json) and its
                               other tensors in place of the released ones (trained in full); reconstructs
                               DIR/io.safetensors's `x` through the frozen encoder's mean, L = mean |x_hat - x|, and
                               writes DIR/lora_out.safetensors: `reconstruction`, `loss`, `grad.<name>` for every
                               trained tensor, and `merged_reconstruction` from a plain decoder with the branches
                               folded into the weights
    check-store STORE WEIGHTS  reads a store that `radit encode` filled (zarr-python), encodes its images with the
                               tiny twin loaded from WEIGHTS, and reports (JSON) the largest difference from the
                               stored float16 latents per split, and the training split's channel statistics as
                               numpy computes them from the stored values beside the ones in the array attributes
"""

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

TOTAL_FULL = 84_046_115


@dataclass
class Config:
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    eps: float = 1e-6


TINY = Config(ch=16, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=8)


def norm(cfg, c):
    return nn.GroupNorm(cfg.norm_groups, c, eps=cfg.eps, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cfg, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cfg, cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, cfg, c):
        super().__init__()
        self.norm = norm(cfg, c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww).transpose(1, 2) for m in (self.q, self.k, self.v))  # [B, HW, C]
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)  # single head
        out = (att @ v).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Resample(nn.Module):
    """down: zero-pad right/bottom by one, conv 3x3 stride 2 pad 0. up: nearest x2, conv 3x3 pad 1."""

    def __init__(self, c, down):
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        x = F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


def mid(cfg, c):
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(cfg, c, c), AttnBlock(cfg, c), ResnetBlock(cfg, c, c)
    return m


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, block_in = nn.ModuleList(), cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cfg, block_in, cfg.ch * mult))
                block_in = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Resample(block_in, down=True)
            self.down.append(level)
        self.mid = mid(cfg, block_in)
        self.norm_out = norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = mid(cfg, block_in)
        levels = [None] * len(cfg.ch_mult)
        for i in reversed(range(len(cfg.ch_mult))):  # built lowest resolution first, stored at BFL index i
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cfg, block_in, cfg.ch * cfg.ch_mult[i]))
                block_in = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Resample(block_in, down=False)
            levels[i] = level
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(cfg, block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):  # up.{last} runs first
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.bn = nn.BatchNorm2d(4 * cfg.z_channels, affine=False)  # FLUX.2 latent statistics; unused here

    def encode_mean(self, x1):
        """[B,1,H,W] in [-1,1] -> encoder mean [B,z,H/2^(levels-1),W/2^(levels-1)]."""
        moments = self.quant_conv(self.encoder(x1.repeat(1, self.cfg.in_channels, 1, 1)))
        return moments[:, : self.cfg.z_channels]  # the rest is the log-variance

    def decode(self, z):
        """[B,z,h,w] -> RGB-mean image [B,1,H,W]."""
        return self.decoder(self.post_quant_conv(z)).mean(dim=1, keepdim=True)

    def bfl_state_dict(self):
        """Parameters plus bn.running_mean / bn.running_var (not num_batches_tracked), BFL names."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------------------------------------- naming conversion
# (BFL, diffusers) name-prefix pairs. {p}: encoder|decoder; {i}, {j}: indices kept as they are; {u}: the BFL up
# level i and {d}: the diffusers up block k = levels - 1 - i (diffusers orders up blocks from the lowest resolution).
NAME_PAIRS = [
    ("{p}.mid.block_1.", "{p}.mid_block.resnets.0."),
    ("{p}.mid.block_2.", "{p}.mid_block.resnets.1."),
    ("{p}.mid.attn_1.norm.", "{p}.mid_block.attentions.0.group_norm."),
    ("{p}.mid.attn_1.q.", "{p}.mid_block.attentions.0.to_q."),
    ("{p}.mid.attn_1.k.", "{p}.mid_block.attentions.0.to_k."),
    ("{p}.mid.attn_1.v.", "{p}.mid_block.attentions.0.to_v."),
    ("{p}.mid.attn_1.proj_out.", "{p}.mid_block.attentions.0.to_out.0."),
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.", "encoder.down_blocks.{i}.downsamplers.0."),
    ("decoder.up.{u}.block.{j}.", "decoder.up_blocks.{d}.resnets.{j}."),
    ("decoder.up.{u}.upsample.", "decoder.up_blocks.{d}.upsamplers.0."),
    ("{p}.norm_out.", "{p}.conv_norm_out."),
]
SHORTCUT = (".nin_shortcut.", ".conv_shortcut.")
ATTN_PROJ_WEIGHT = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _pattern(template):
    rx = re.escape(template).replace(r"\{p\}", "(?P<p>encoder|decoder)")
    for g in "ijud":
        rx = rx.replace(rf"\{{{g}\}}", rf"(?P<{g}>\d+)")
    return re.compile("^" + rx)


def rename(name, levels, to_diffusers):
    """One tensor name, BFL -> diffusers (to_diffusers) or back; `levels` = len(ch_mult)."""
    for bfl, dif in NAME_PAIRS:
        src, dst = (bfl, dif) if to_diffusers else (dif, bfl)
        if m := _pattern(src).match(name):
            g = m.groupdict()
            if "u" in g:
                g["d"] = str(levels - 1 - int(g["u"]))
            elif "d" in g:
                g["u"] = str(levels - 1 - int(g["d"]))
            name = dst.format(**g) + name[m.end():]
            break
    old, new = SHORTCUT if to_diffusers else SHORTCUT[::-1]
    return name.replace(old, new)


def _levels(names, prefix):
    found = [int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))]
    return max(found) + 1 if found else 0


def bfl_to_diffusers(sd):
    """BFL names -> diffusers (AutoencoderKLFlux2) names; attention q/k/v/proj_out 1x1 convs become [C, C] Linear."""
    levels, out = _levels(sd, "decoder.up."), {}
    for k, v in sd.items():
        out[rename(k, levels, True)] = v.reshape(v.shape[:2]) if ATTN_PROJ_WEIGHT.match(k) else v
    assert len(out) == len(sd), "name collision in bfl_to_diffusers"
    return out


def diffusers_to_bfl(sd):
    """The inverse of bfl_to_diffusers: diffusers names -> BFL names, [C, C] attention weights -> [C, C, 1, 1]."""
    levels, out = _levels(sd, "decoder.up_blocks."), {}
    for k, v in sd.items():
        b = rename(k, levels, False)
        out[b] = v.reshape(*v.shape, 1, 1) if ATTN_PROJ_WEIGHT.match(b) and v.dim() == 2 else v
    assert len(out) == len(sd), "name collision in diffusers_to_bfl"
    return out


# ---------------------------------------------------------------------------------------------- commands
def numel(module):
    return sum(p.numel() for p in module.parameters())


def cmd_count(_args):
    t0 = time.time()
    with torch.device("meta"):
        ae = AutoEncoder(Config())
    counts = {"encoder": numel(ae.encoder), "decoder": numel(ae.decoder),
              "quant": numel(ae.quant_conv) + numel(ae.post_quant_conv), "total": numel(ae)}
    counts["seconds"] = round(time.time() - t0, 3)
    print(json.dumps(counts))
    return 0 if counts["total"] == TOTAL_FULL else 1


def random_init(ae, gen):
    """Nothing trivially identity: conv weights N(0, 0.2), biases N(0, 0.1), GroupNorm 1+0.1n / 0.1n."""
    with torch.no_grad():
        for mod in ae.modules():
            if isinstance(mod, nn.GroupNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
            elif isinstance(mod, nn.Conv2d):
                mod.weight.copy_(0.2 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
        ae.bn.running_mean.copy_(torch.randn(ae.bn.running_mean.shape, generator=gen))
        ae.bn.running_var.copy_(0.5 + torch.rand(ae.bn.running_var.shape, generator=gen))


def cmd_reference(args):
    t0 = time.time()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order on CPU
    torch.backends.mkldnn.enabled = False
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = TINY
    ae = AutoEncoder(cfg).float().eval()
    random_init(ae, gen)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(asdict(cfg)), "format": "bfl"}
    bfl = {k: v.contiguous() for k, v in ae.bfl_state_dict().items()}
    save_file(bfl, str(out / "weights_bfl.safetensors"), metadata=meta)
    diff = {k: v.contiguous() for k, v in bfl_to_diffusers(bfl).items()}
    save_file(diff, str(out / "weights_diffusers.safetensors"), metadata={**meta, "format": "diffusers"})
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    down = 2 ** (len(cfg.ch_mult) - 1)
    x = (torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1).requires_grad_(True)
    z = torch.randn(2, cfg.z_channels, 16 // down, 16 // down, generator=gen)
    mean, decoded = ae.encode_mean(x), ae.decode(z)
    loss = (mean ** 2).mean() + (decoded ** 2).mean()
    loss.backward()
    io = {"x": x.detach(), "mean": mean.detach(), "z": z, "decoded": decoded.detach(),
          "loss": loss.detach().reshape(1), "grad.x": x.grad}
    for name, p in ae.named_parameters():
        io[f"grad.{name}"] = p.grad
    save_file({k: v.contiguous() for k, v in io.items()}, str(out / "io.safetensors"), metadata=meta)

    # Self-checks: the diffusers file round-trips to identical BFL tensors; the BFL file reloads (only
    # bn.num_batches_tracked, never saved, may be missing) and reproduces the outputs bit for bit.
    back = diffusers_to_bfl(load_file(str(out / "weights_diffusers.safetensors")))
    assert back.keys() == bfl.keys(), sorted(set(back) ^ set(bfl))
    assert all(torch.equal(back[k], bfl[k]) for k in bfl), "diffusers round trip changed a tensor"
    ae2 = AutoEncoder(cfg).float().eval()
    missing, unexpected = ae2.load_state_dict(load_file(str(out / "weights_bfl.safetensors")), strict=False)
    assert set(missing) <= {"bn.num_batches_tracked"} and not unexpected, (missing, unexpected)
    with torch.no_grad():
        assert torch.equal(ae2.encode_mean(x), mean) and torch.equal(ae2.decode(z), decoded)
    print(json.dumps({"dir": str(out), "tensors_bfl": len(bfl), "parameters": numel(ae),
                      "loss": loss.item(), "seconds": round(time.time() - t0, 3)}))
    return 0


class LoraConv(nn.Module):
    """A frozen convolution with a LoRA branch, as peft adds one to a Conv2d: y = base(x) + scale * B(A(x)), A with
    the base's kernel, stride and padding into rank r and no bias, B a 1x1 convolution out of it, no bias."""

    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_A = nn.Conv2d(base.in_channels, a.shape[0], base.kernel_size, stride=base.stride,
                                padding=base.padding, bias=False)
        self.lora_B = nn.Conv2d(a.shape[0], base.out_channels, 1, bias=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    def merged_weight(self):
        w, a, b = self.base.weight, self.lora_A.weight, self.lora_B.weight
        r = a.shape[0]
        return w + self.scale * (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(w.shape)


def _set_module(root, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def cmd_lora(args):
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    d = Path(args.dir)
    ae = AutoEncoder(TINY).float().eval()
    missing, unexpected = ae.load_state_dict(load_file(str(d / "weights_bfl.safetensors")), strict=False)
    assert set(missing) <= {"bn.num_batches_tracked"} and not unexpected, (missing, unexpected)
    for p in ae.parameters():
        p.requires_grad_(False)
    scale = json.loads((d / "lora.json").read_text())["scale"]
    trained = load_file(str(d / "lora.safetensors"))
    loras = {}
    for name, t in sorted(trained.items()):
        if name.endswith(".lora_A.weight"):
            layer = name[: -len(".lora_A.weight")]
            module = LoraConv(ae.get_submodule(layer), t, trained[layer + ".lora_B.weight"], scale)
            _set_module(ae, layer, module)
            loras[layer] = module
        elif not name.endswith(".lora_B.weight"):
            layer, _, kind = name.rpartition(".")
            param = nn.Parameter(t.clone())
            setattr(ae.get_submodule(layer), kind, param)
    x = load_file(str(d / "io.safetensors"))["x"]
    with torch.no_grad():
        z = ae.encode_mean(x)
    rec = ae.decode(z)
    loss = (rec - x).abs().mean()
    loss.backward()
    out = {"reconstruction": rec.detach(), "loss": loss.detach().reshape(1)}
    for name in trained:
        if name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight"):
            layer, _, rest = name.partition(".lora_")
            param = getattr(loras[layer], "lora_" + rest.split(".")[0]).weight
        else:
            layer, _, kind = name.rpartition(".")
            param = getattr(ae.get_submodule(layer), kind)
        out["grad." + name] = param.grad
    # The plain decoder: each branch folded into its layer's weight.
    with torch.no_grad():
        for layer, module in loras.items():
            module.base.weight.copy_(module.merged_weight())
            _set_module(ae, layer, module.base)
        out["merged_reconstruction"] = ae.decode(z)
    save_file({k: v.contiguous() for k, v in out.items()}, str(d / "lora_out.safetensors"))
    print(json.dumps({"loss": loss.item(), "lora_layers": len(loras), "trained": len(trained)}))
    return 0


def cmd_check_store(args):
    import numpy as np
    import zarr

    torch.set_num_threads(1)
    ae = AutoEncoder(TINY).float().eval()
    missing, unexpected = ae.load_state_dict(load_file(args.weights), strict=False)
    assert set(missing) <= {"bn.num_batches_tracked"} and not unexpected, (missing, unexpected)
    manifest = json.loads((Path(args.store) / "manifest.json").read_text())
    root = zarr.open_group(args.store, mode="r")
    report = {"latents": manifest.get("latents"), "splits": {}}
    for split, counts in manifest["counts"]["splits"].items():
        if counts["images"] == 0:
            continue
        images = root[f"{split}/images"][:]
        stored = root[f"{split}/latents"]
        assert stored.dtype == np.float16, stored.dtype
        values = stored[:].astype(np.float32)
        x = torch.from_numpy((2.0 * (images.astype(np.float64) + 0.5) / 65536.0 - 1.0).astype(np.float32))
        with torch.no_grad():
            mean = ae.encode_mean(x[:, None]).numpy()
        scale = float(np.abs(mean).max())
        report["splits"][split] = {
            "rows": int(values.shape[0]), "shape": list(values.shape), "chunks": list(stored.chunks),
            "shards": list(stored.shards) if stored.shards else None,
            # float16 keeps 11 significant bits: compare relative to each value's magnitude.
            "max_rel_diff": float((np.abs(values - mean) / (np.abs(mean) + 1e-3 * scale)).max()),
            "attrs": dict(stored.attrs),
        }
        if split == "train":
            report["numpy_mean"] = values.mean(axis=(0, 2, 3), dtype=np.float64).tolist()
            report["numpy_std"] = values.std(axis=(0, 2, 3), dtype=np.float64).tolist()
    print(json.dumps(report))
    return 0


LORA_UP_8_8 = [r"decoder\.conv_in", r"decoder\.mid\.block_\d\.conv\d", r"decoder\.mid\.attn_1\.(q|k|v|proj_out)",
               r"decoder\.up\.\d+\.block\.2\.conv2"]


def cmd_bench(args):
    """Full-size throughput on the CPU (random weights), as `radit vae bench --mode` measures it: the encoder's
    mean (encode), encode then decode (recon), or one step of the decoder fine-tune (finetune: the frozen encoder's
    mean, LoRA (Up-Blocks, 8, 8) and the RGB head, L1, backward, Adam)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ae = AutoEncoder(Config()).float().eval()
    x = torch.rand(args.batch, 1, args.image_size, args.image_size) * 2 - 1
    if args.mode == "finetune":
        for p in ae.parameters():
            p.requires_grad_(False)
        trained = []
        for name, module in list(ae.named_modules()):
            if isinstance(module, nn.Conv2d) and any(re.fullmatch(t, name) for t in LORA_UP_8_8):
                r = 8
                a = torch.empty(r, module.in_channels, *module.kernel_size)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                lora = LoraConv(module, a, torch.zeros(module.out_channels, r, 1, 1), 8 / r)
                _set_module(ae, name, lora)
                trained += [lora.lora_A.weight, lora.lora_B.weight]
        for p in list(ae.decoder.norm_out.parameters()) + list(ae.decoder.conv_out.parameters()):
            p.requires_grad_(True)
            trained.append(p)
        adam = torch.optim.Adam(trained, lr=2e-5)

        def step():
            with torch.no_grad():
                z = ae.encode_mean(x)
            loss = (ae.decode(z) - x).abs().mean()
            adam.zero_grad()
            loss.backward()
            adam.step()
    else:
        def step():
            with torch.no_grad():
                z = ae.encode_mean(x)
                if args.mode == "recon":
                    ae.decode(z)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    print(json.dumps({"impl": "pytorch", "mode": args.mode, "image_size": args.image_size, "batch": args.batch,
                      "threads": args.threads, "median_s": median, "images_per_s": args.batch / median}))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("count")
    r = sub.add_parser("reference")
    r.add_argument("dir")
    r.add_argument("--seed", type=int, default=0)
    lo = sub.add_parser("lora")
    lo.add_argument("dir")
    c = sub.add_parser("check-store")
    c.add_argument("store")
    c.add_argument("weights")
    b = sub.add_parser("bench")
    b.add_argument("--image-size", type=int, default=512)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--steps", type=int, default=2)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--mode", choices=["encode", "recon", "finetune"], default="encode")
    args = ap.parse_args()
    commands = {"count": cmd_count, "reference": cmd_reference, "bench": cmd_bench, "check-store": cmd_check_store,
                "lora": cmd_lora}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

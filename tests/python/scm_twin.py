"""The Flow SCM's twin, for tests/scm.rs, written from ../shared/design/scm.md (not from radit's code).

    export OUT SEED      the tiny SCM (embeddings of 16, MP-Fourier of 16, velocity networks of width 32 with 2
                         residual blocks) over the built-in graph (models/src/scm/default_graph.toml), every
                         parameter perturbed (the zero-initialised layers too, so every gradient path is exercised):
                         OUT/weights.safetensors; a batch with missing classes and ages, times and noises:
                         OUT/inputs.safetensors; each variable's velocity and loss term, the loss and every
                         parameter's gradient: OUT/reference.safetensors
"""

import math
import sys
import tomllib
from pathlib import Path

import torch
from safetensors.torch import save_file

FINDINGS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "enlarged_cardiomediastinum", "fracture",
            "lung_lesion", "lung_opacity", "no_finding", "pleural_effusion", "pleural_other", "pneumonia",
            "pneumothorax", "support_devices"]
# (name, real classes): the 14 findings (negative, positive), race, sex, view, dataset, then age (one dimension)
VARIABLES = [(f, 2) for f in FINDINGS] + [("race", 3), ("sex", 2), ("view", 3), ("dataset", 7), ("age", 1)]
D, FOURIER, WIDTH, BLOCKS = 16, 16, 32, 2


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.fc1 = torch.nn.Linear(WIDTH, WIDTH)
        self.fc2 = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, h):
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h))))


class Flow(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.proj = torch.nn.Linear(1 + k + D, WIDTH)
        self.blocks = torch.nn.ModuleList([Block() for _ in range(BLOCKS)])
        self.head_norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, k)

    def forward(self, t, x, c):
        h = torch.nn.functional.silu(self.proj(torch.cat([t[:, None], x, c], 1)))
        for b in self.blocks:
            h = b(h)
        return self.head(self.head_norm(h))


class AgeEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("freqs", torch.randn(FOURIER))
        self.register_buffer("phases", torch.rand(FOURIER))
        self.fc1 = torch.nn.Linear(FOURIER, D)
        self.fc2 = torch.nn.Linear(D, D)
        self.null = torch.nn.Parameter(torch.randn(D))

    def forward(self, age):
        present = torch.isfinite(age)
        x = torch.nan_to_num(age, nan=0.0)[:, None]
        features = math.sqrt(2) * torch.cos(2 * math.pi * (x * self.freqs[None] + self.phases[None]))
        h = self.fc2(torch.nn.functional.silu(self.fc1(features)))
        return torch.where(present[:, None], h, self.null[None].expand_as(h))


class Scm(torch.nn.Module):
    def __init__(self, parents):
        super().__init__()
        self.parents = parents
        self.embed = torch.nn.ModuleDict()
        for name, k in VARIABLES:
            if name == "age":
                self.embed[name] = AgeEmbedding()
            else:
                m = torch.nn.Module()
                m.table = torch.nn.Parameter(torch.randn(k + 1, D))
                self.embed[name] = m
        self.flow = torch.nn.ModuleDict({name: Flow(k) for name, k in VARIABLES})

    def embedding(self, i, labels, age):
        name = VARIABLES[i][0]
        if name == "age":
            return self.embed[name](age)
        return self.embed[name].table[labels[:, i]]

    def target(self, i, labels, age):
        name, k = VARIABLES[i]
        if name == "age":
            present = torch.isfinite(age)
            return torch.nan_to_num(age, nan=0.0)[:, None], present.float()
        ids = labels[:, i]
        present = ids > 0
        x = torch.nn.functional.one_hot((ids - 1).clamp(min=0), k).float() * present[:, None].float()
        return x, present.float()

    def forward(self, labels, age, t, noise):
        embeds = [self.embedding(j, labels, age) for j in range(len(VARIABLES))]
        velocities, terms = [], []
        b = labels.shape[0]
        for i, (name, k) in enumerate(VARIABLES):
            ps = self.parents[i]
            c = sum(embeds[p] for p in ps) / math.sqrt(len(ps)) if ps else torch.zeros(b, D)
            x1, mask = self.target(i, labels, age)
            ti = t[:, i]
            u = noise[name]
            xt = (1 - ti[:, None]) * u + ti[:, None] * x1
            v = self.flow[name](ti, xt, c)
            velocities.append(v)
            terms.append((((v - (x1 - u)) ** 2).sum(1) * mask).sum() / b)
        return velocities, terms


def graph_parents():
    root = Path(__file__).resolve().parents[2]
    text = (root / "models/src/scm/default_graph.toml").read_text()
    parents = tomllib.loads(text)["parents"]
    names = [n for n, _ in VARIABLES]
    return [[names.index(p) for p in parents.get(n, [])] for n in names]


def export(out, seed):
    torch.manual_seed(int(seed))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = Scm(graph_parents())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "weights.safetensors"))
    b = 12
    labels = torch.zeros(b, 18, dtype=torch.int64)
    for i, (name, k) in enumerate(VARIABLES[:18]):
        labels[:, i] = torch.randint(0, k + 1, (b,))  # 0: missing
    age = torch.rand(b) * 0.9
    age[[1, 5]] = float("nan")
    t = torch.rand(b, 19)
    noise = {name: torch.randn(b, k) for name, k in VARIABLES}
    inputs = {"labels": labels, "age": age, "t": t}
    inputs.update({f"noise.{n}": v for n, v in noise.items()})
    save_file(inputs, str(out / "inputs.safetensors"))
    velocities, terms = model(labels, age, t, noise)
    loss = sum(terms)
    loss.backward()
    reference = {"loss": loss.detach().reshape(1)}
    for (name, _), v, term in zip(VARIABLES, velocities, terms):
        reference[f"v.{name}"] = v.detach().contiguous()
        reference[f"term.{name}"] = term.detach().reshape(1)
    for k, p in model.named_parameters():
        # a table no child reads (a leaf or a root without children) gets no gradient: zero
        reference[f"grad.{k}"] = (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
    save_file(reference, str(out / "reference.safetensors"))


if __name__ == "__main__":
    {"export": export}[sys.argv[1]](*sys.argv[2:])

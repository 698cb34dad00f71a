"""The ResNet metadata predictor's trunk twin: torchvision's own ResNet with Bottleneck blocks, in eval mode (its
batch norms on their running statistics, as radit keeps them frozen), never radit's code.

    make OUT BLOCKS         a torchvision ResNet (Bottleneck, BLOCKS per stage, e.g. 1,1,1,1; base width 64) with
                            every batch norm's weight, bias, running mean and running variance random, saved as
                            its state dict (OUT/resnet.safetensors, torchvision's names, fc included), seeded input
                            images OUT/x.safetensors ([2, 3, 64, 64]) and the trunk's pooled features for them
                            (OUT/features.safetensors, [2, 2048])
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchvision.models.resnet import Bottleneck, ResNet


def make(out, blocks):
    torch.manual_seed(0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = ResNet(Bottleneck, [int(b) for b in blocks.split(",")])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "resnet.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        features = model(x)
    save_file({"x": x}, str(out / "x.safetensors"))
    save_file({"features": features.contiguous()}, str(out / "features.safetensors"))


if __name__ == "__main__":
    {"make": make}[sys.argv[1]](*sys.argv[2:])

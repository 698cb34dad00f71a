#!/usr/bin/env python3
"""The FID Inception weights (TensorFlow's 2015-12-05 Inception as pytorch-fid and torchmetrics load it,
`pt_inception-2015-12-05-6726825d.pth`, the file the user has) as the safetensors file `radit eval features --net`
loads: the state dict's tensors by torchvision name, `fc.*` and the BatchNorm step counters left out, with
`radit_network = fid-inception-v3` and the source's sha256 in the metadata.

The file is checked as torch.hub checks it: its sha256 must start with the 8 hex digits in its name (6726825d).
`--any-weights` skips that, for tests with random weights of the same shapes.

    python scripts/export-fid-inception.py pt_inception-2015-12-05-6726825d.pth fid-inception.safetensors
"""

import argparse
import hashlib
import sys

import torch
from safetensors.torch import save_file

PINNED_PREFIX = "6726825d"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pth")
    ap.add_argument("out")
    ap.add_argument("--any-weights", action="store_true", help="skip the sha256 check (random test weights)")
    a = ap.parse_args()
    digest = hashlib.sha256(open(a.pth, "rb").read()).hexdigest()
    if not a.any_weights and not digest.startswith(PINNED_PREFIX):
        sys.exit(f"{a.pth}: sha256 {digest} does not start with {PINNED_PREFIX}: not the FID Inception weights "
                 "(pt_inception-2015-12-05-6726825d.pth)")
    state = torch.load(a.pth, map_location="cpu", weights_only=True)
    tensors = {k: v.contiguous().float() for k, v in state.items()
               if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    if "Mixed_7c.branch_pool.conv.weight" not in tensors:
        sys.exit(f"{a.pth}: no Mixed_7c.branch_pool: not an Inception-v3 state dict")
    save_file(tensors, a.out, metadata={"radit_network": "fid-inception-v3", "source_sha256": digest})
    print(f"{len(tensors)} tensors -> {a.out} (source sha256 {digest})")


if __name__ == "__main__":
    main()

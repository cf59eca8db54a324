"""Regenerate the small .pth fixtures of tests/test_torch_pickle.py (needs torch==2.13.0).

  python tests/data/make_pth_fixtures.py

Writes tiny_zip.pth (the zip format of torch >= 1.6) and tiny_legacy.pth (the legacy format the
2020 DETR model-zoo files use) holding the same object, and tiny_expected.npz with its arrays.
"""
import argparse
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


def make():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    sd = OrderedDict([
        ("conv.weight", torch.randn(3, 2, 3, 3, generator=g)),
        ("linear.weight", base.t()),  # non-contiguous view
        ("linear.bias", base[1, 2:5]),  # offset view sharing the storage
        ("double", torch.randn(5, generator=g, dtype=torch.float64)),
        ("half", torch.randn(2, 3, generator=g).half()),
        ("bf16", torch.randn(3, generator=g).bfloat16()),
        ("long", torch.arange(7)),
        ("flag", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(3.5)),
        ("param", torch.nn.Parameter(torch.ones(2, 2))),
    ])
    obj = {"model": sd, "epoch": 499, "args": argparse.Namespace(lr=1e-4, backbone="resnet50")}
    torch.save(obj, HERE / "tiny_zip.pth")
    torch.save(obj, HERE / "tiny_legacy.pth", _use_new_zipfile_serialization=False)
    expected = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy() for k, v in sd.items()}
    np.savez(HERE / "tiny_expected.npz", **expected)


if __name__ == "__main__":
    make()

"""Helpers of the reference tests that need no OpenMMLab package."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFEST = FIXTURES / "released_keys.json"


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (buffers kept): 1-D ~ N(0, 0.2) (LayerNorm weights 1 + that),
    n-D ~ N(0, 1 / fan_in), Swin V2 logit scales log 10 + N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("logit_scale"):
                v = math.log(10.0) + 0.3 * r
            elif p.dim() == 1:
                v = 0.2 * r + (1.0 if name.endswith("weight") else 0.0)
            else:
                v = r / math.sqrt(max(p[0].numel(), 1))
            p.copy_(v.to(p.dtype))
    return module


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def meta_release(entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Meta tensors with the manifest's names, shapes and dtypes (no memory)."""
    return {
        k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta")
        for k, v in entries.items()
    }


def small_release(entries: dict[str, dict], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the manifest's names, shapes and dtypes (for the tiny sizes)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in entries.items():
        if v["dtype"].startswith("int"):
            out[k] = torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"]))
        else:
            out[k] = torch.randn(v["shape"], generator=g) * 0.05
    return out

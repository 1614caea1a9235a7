"""Fixtures of the encoder tests: tiny-preset models and batches that follow the contract."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def make_batch(
    B: int = 2,
    T2: int = 3,
    T1: int = 2,
    hr: int = 128,
    s: int = 16,
    modalities=("hr", "s2", "s1"),
    generator: torch.Generator | None = None,
) -> dict:
    """A random batch for the tiny preset's geometry (HR 128 px over S 16 px by default)."""
    g = generator or torch.Generator().manual_seed(1)
    batch: dict = {}
    if "hr" in modalities:
        batch["hr"] = torch.randn(B, 3, hr, hr, generator=g)
        batch["hr_doy"] = torch.randint(1, 367, (B,), generator=g)
    for m, T, C in (("s2", T2, 10), ("s1", T1, 2)):
        if m in modalities:
            batch[m] = torch.randn(B, T, C, s, s, generator=g)
            batch[f"{m}_doy"] = torch.randint(1, 367, (B, T), generator=g)
            valid = torch.ones(B, T, dtype=torch.bool)
            if T > 1:
                valid[0, -1] = False  # one padded step in the first sample
                batch[f"{m}_doy"][0, -1] = 0
            batch[f"{m}_valid"] = valid
    lat = torch.rand(B, generator=g) * 180 - 90
    lon = torch.rand(B, generator=g) * 360 - 180
    batch["latlon"] = torch.stack([lat, lon], dim=1)
    if B > 1:
        batch["latlon"][-1] = float("nan")  # last sample has no location
    return batch


@pytest.fixture
def tiny():
    from skysense.encoders import build_skysense

    torch.manual_seed(0)
    return build_skysense("tiny").eval()

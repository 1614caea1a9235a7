"""A small stand-in for the SkySense encoder that keeps the output contract of docs/contracts.md
(``hr_stages``, ``s2_taps``/``s1_taps``, ``tokens_*``, ``valid_*``, ``fused``, ``geo``), so the
downstream heads, loops, inference and export can be tested without the real encoder's cost.
The tests at the bottom check that the stand-in itself keeps the contract; the integration tests
use the real tiny preset.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.unit


class _Stage(nn.Module):
    def __init__(self, c_in, c_out, depth, down):
        super().__init__()
        self.downsample = nn.Conv2d(c_in, c_out, 2, 2) if down else nn.Conv2d(c_in, c_out, 1)
        self.blocks = nn.ModuleList(nn.Conv2d(c_out, c_out, 3, padding=1) for _ in range(depth))

    def forward(self, x):
        x = self.downsample(x)
        for b in self.blocks:
            x = x + F.gelu(b(x))
        return x


class _SeriesViT(nn.Module):
    def __init__(self, bands, dim, patch, n_taps):
        super().__init__()
        self.bands = bands
        self.patch_embed = nn.Conv2d(bands, dim, patch, patch)
        self.blocks = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(n_taps))

    def forward(self, x):  # (B, T, C, h, w) -> tuple of (B, T, D, h/p, w/p)
        b, t = x.shape[:2]
        y = self.patch_embed(x.flatten(0, 1))
        taps = []
        for blk in self.blocks:
            y = y + F.gelu(blk(y))
            taps.append(y.unflatten(0, (b, t)))
        return tuple(taps)


class StandInSkySense(nn.Module):
    """Contract-shaped outputs from a few convolutions. Channels: HR stages ``hr_dims``, ViT
    taps ``vit_dim``, grid ``grid_dim``, fused ``fusion_dim`` (geo = 2 x fusion_dim)."""

    def __init__(
        self,
        hr_dims=(8, 16, 24, 32),
        vit_dim=12,
        patch=4,
        n_taps=4,
        grid_dim=20,
        fusion_dim=16,
        upscale=1,
    ):
        super().__init__()
        self.patch, self.upscale = patch, upscale
        self.hr = nn.Module()
        self.hr.patch_embed = nn.Conv2d(3, hr_dims[0], 4, 4)
        self.hr.stages = nn.ModuleList(
            _Stage(hr_dims[max(i - 1, 0)], d, 1 + (i == 2), i > 0) for i, d in enumerate(hr_dims)
        )
        self.s2 = _SeriesViT(10, vit_dim, patch, n_taps)
        self.s1 = _SeriesViT(2, vit_dim, patch, n_taps)
        self.grid_hr = nn.Conv2d(hr_dims[-1], grid_dim, 1)
        self.grid_s = nn.Conv2d(vit_dim, grid_dim * upscale * upscale, 1)
        self.dtpe = nn.Parameter(torch.zeros(365, grid_dim))
        self.fusion = nn.Module()
        self.fusion.proj = nn.Linear(grid_dim, fusion_dim)
        self.fusion.layers = nn.ModuleList(nn.Linear(fusion_dim, fusion_dim) for _ in range(2))

    def forward(self, batch):
        mods = [m for m in ("hr", "s2", "s1") if m in batch]
        if not mods:
            raise ValueError(f"batch holds none of hr, s2, s1 (keys {sorted(batch)})")
        out, tokens, valids = {}, [], []
        if "hr" in batch:
            x = batch["hr"]
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"hr: expected (B, 3, H, W), got {tuple(x.shape)}")
            y = self.hr.patch_embed(x)
            stages = []
            for s in self.hr.stages:
                y = s(y)
                stages.append(y)
            out["hr_stages"] = tuple(stages)
            t = self.grid_hr(stages[-1])[:, None]
            out["tokens_hr"] = t
            out["valid_hr"] = torch.ones(x.shape[0], 1, dtype=torch.bool)
            tokens.append(t)
            valids.append(out["valid_hr"])
        for m, vit in (("s2", self.s2), ("s1", self.s1)):
            if m not in batch:
                continue
            x = batch[m]
            if x.ndim != 5 or x.shape[2] != vit.bands:
                raise ValueError(f"{m}: expected (B, T, {vit.bands}, h, w), got {tuple(x.shape)}")
            taps = vit(x)
            out[f"{m}_taps"] = taps
            b, t = x.shape[:2]
            g = self.grid_s(taps[-1].flatten(0, 1))
            g = F.pixel_shuffle(g, self.upscale).unflatten(0, (b, t))
            doy = batch.get(f"{m}_doy")
            if doy is not None:
                table = torch.cat([torch.zeros_like(self.dtpe[:1]), self.dtpe])
                g = g + table[doy.clamp(0, 365)][..., None, None]
            out[f"tokens_{m}"] = g
            v = batch.get(f"{m}_valid", torch.ones(b, t, dtype=torch.bool))
            out[f"valid_{m}"] = v
            tokens.append(g)
            valids.append(v)
        grids = {tuple(t.shape[-2:]) for t in tokens}
        if len(grids) != 1:
            raise ValueError(f"modalities {mods} do not align on one fusion grid: {sorted(grids)}")
        tok = torch.cat(tokens, 1)  # (B, N, C_g, h, w)
        w = torch.cat(valids, 1).to(tok.dtype)[:, :, None, None, None]
        mean = (tok * w).sum(1) / w.sum(1).clamp_min(1.0)
        f = self.fusion.proj(mean.permute(0, 2, 3, 1))
        for layer in self.fusion.layers:
            f = f + F.gelu(layer(f))
        fused = f.permute(0, 3, 1, 2)
        out["fused"] = fused
        out["geo"] = torch.cat([fused, torch.zeros_like(fused)], 1)
        out["region"] = torch.full((fused.shape[0],), -1, dtype=torch.int64)
        return out


def build_standin(preset="tiny", **overrides):
    """Same call shape as ``skysense.encoders.build_skysense``."""
    return StandInSkySense(**overrides)


def make_batch(b=2, hr=64, s=8, t2=3, t1=2, mods=("hr", "s2", "s1"), label=None):
    g = torch.Generator().manual_seed(0)
    batch = {}
    if "hr" in mods:
        batch["hr"] = torch.randn(b, 3, hr, hr, generator=g)
    if "s2" in mods:
        batch["s2"] = torch.randn(b, t2, 10, s, s, generator=g)
        batch["s2_doy"] = torch.randint(1, 366, (b, t2), generator=g)
        batch["s2_valid"] = torch.ones(b, t2, dtype=torch.bool)
    if "s1" in mods:
        batch["s1"] = torch.randn(b, t1, 2, s, s, generator=g)
        batch["s1_doy"] = torch.randint(1, 366, (b, t1), generator=g)
        batch["s1_valid"] = torch.ones(b, t1, dtype=torch.bool)
    if label is not None:
        batch["label"] = label
    return batch


def test_standin_keeps_the_output_contract():
    enc = StandInSkySense()
    out = enc(make_batch(hr=64, s=8))  # HR / 32 = 2 = 8 / 4 * 1
    assert [tuple(s.shape) for s in out["hr_stages"]] == [
        (2, 8, 16, 16),
        (2, 16, 8, 8),
        (2, 24, 4, 4),
        (2, 32, 2, 2),
    ]
    assert len(out["s2_taps"]) == 4 and out["s2_taps"][0].shape == (2, 3, 12, 2, 2)
    assert out["s1_taps"][-1].shape == (2, 2, 12, 2, 2)
    assert out["fused"].shape == (2, 16, 2, 2) and out["geo"].shape == (2, 32, 2, 2)
    assert out["tokens_s2"].shape == (2, 3, 20, 2, 2)
    s2_only = enc(make_batch(s=12, mods=("s2",)))
    assert set(s2_only) >= {"s2_taps", "fused"} and "hr_stages" not in s2_only


def test_standin_rejects_bad_input():
    enc = StandInSkySense()
    with pytest.raises(ValueError, match="s2: expected"):
        enc({"s2": torch.zeros(1, 2, 9, 8, 8)})
    with pytest.raises(ValueError, match="fusion grid"):
        enc(make_batch(hr=64, s=16))

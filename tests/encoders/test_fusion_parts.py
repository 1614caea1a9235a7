"""Grid alignment against Conv2d + PixelShuffle, the DTPE lookup, and the temporal fusion
against a literal reference (DTPE added before the projection, dense masked attention)."""

from __future__ import annotations

import pytest
import torch
from encoders_reference import block_reference
from torch import nn

from skysense.encoders.dtpe import DateSpecificTemporalEncoding
from skysense.encoders.grid_align import GridAlign
from skysense.encoders.temporal_fusion import TemporalFusion

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("u", [1, 2, 4])
def test_grid_align_matches_conv_pixelshuffle(u):
    head = GridAlign(6, 5, u).double()
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)  # (N, h, w, D), odd grid
    ref = nn.Sequential(nn.Conv2d(6, 5 * u * u, 1), nn.PixelShuffle(u)).double()
    ref[0].load_state_dict(head.proj.state_dict())
    expected = ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(head(x), expected)


def test_dtpe_lookup():
    dtpe = DateSpecificTemporalEncoding(4, days=365)
    doy = torch.tensor([[1, 2, 365, 366, 0, 100]])
    e = dtpe(doy)
    table = dtpe.table.detach()
    assert e.shape == (1, 6, 4)
    torch.testing.assert_close(e[0, 0], table[0])
    torch.testing.assert_close(e[0, 1], table[1])
    torch.testing.assert_close(e[0, 2], table[364])
    torch.testing.assert_close(e[0, 3], table[364])  # 366 shares the last row
    assert (e[0, 4] == 0).all()  # unknown / padded adds nothing
    torch.testing.assert_close(e[0, 5], table[99])
    assert dtpe.table.shape == (365, 4)


def _fusion_reference(f: TemporalFusion, tokens, valid, doy):
    """Literal: per location, [extra, x_m + DTPE(doy)] -> projection -> masked blocks."""
    B, _, h, w, _ = tokens[0].shape
    outs = torch.zeros(B, h, w, f.dim, dtype=tokens[0].dtype)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                seq, pad = [], [False]
                for x, ok, d in zip(tokens, valid, doy):
                    for t in range(x.shape[1]):
                        tok = x[b, t, i, j]
                        if d is not None and d[b, t] > 0:
                            tok = tok + f.dtpe.table[min(int(d[b, t]), 365) - 1]
                        seq.append(f.proj(tok))
                        pad.append(not bool(ok[b, t]))
                z = torch.cat([f.extra_token[0], torch.stack(seq)])[None]
                kpm = torch.tensor(pad)[None]
                for blk in f.blocks:
                    z = block_reference(blk, z, kpm)
                if f.norm is not None:
                    z = f.norm(z)
                outs[b, i, j] = z[0, 0]
    return outs


@pytest.mark.parametrize("final_norm", [False, True])
def test_fusion_matches_literal_reference(final_norm):
    torch.manual_seed(3)
    f = TemporalFusion(6, 8, depth=2, num_heads=2, final_norm=final_norm).double().eval()
    B, h, w = 2, 2, 3
    tokens = [
        torch.randn(B, 1, h, w, 6, dtype=torch.float64),
        torch.randn(B, 4, h, w, 6, dtype=torch.float64),
        torch.randn(B, 2, h, w, 6, dtype=torch.float64),
    ]
    valid = [
        torch.ones(B, 1, dtype=torch.bool),
        torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]).bool(),
        torch.tensor([[0, 0], [1, 0]]).bool(),  # sample 0: S1 all missing
    ]
    doy = [torch.tensor([[5], [0]]), torch.tensor([[1, 0, 366, 0], [30, 31, 200, 365]]), None]
    ours = f(tokens, valid, doy)
    torch.testing.assert_close(ours, _fusion_reference(f, tokens, valid, doy))


def test_fusion_masked_steps_do_not_matter_and_all_padding_still_fuses():
    torch.manual_seed(4)
    f = TemporalFusion(6, 8, depth=2, num_heads=2).double().eval()
    x = torch.randn(1, 3, 2, 2, 6, dtype=torch.float64)
    valid = torch.tensor([[True, False, True]])
    doy = torch.tensor([[10, 0, 20]])
    a = f([x], [valid], [doy])
    y = x.clone()
    y[:, 1] = torch.randn(2, 2, 6) * 100  # garbage in the padded step
    torch.testing.assert_close(f([y], [valid], [doy]), a)
    none = f([x], [torch.zeros(1, 3, dtype=torch.bool)], [doy])  # the extra token alone
    assert torch.isfinite(none).all()
    # with nothing valid every location sees only the extra token: same F_fus everywhere
    torch.testing.assert_close(none[0, 0, 0].expand_as(none[0]), none[0])

"""Numerical equivalence with the release's code at reduced width and depth, float64.

Random weights in the reference modules (mmpretrain's SwinTransformerV2; mmseg's ViT and
TransformerEncoderLayer rebuilt from mmcv-lite's bricks, see mm_reference.py) are saved under
the release's names, mapped by :func:`skysense.encoders.checkpoint_filter.match_to_model`,
loaded into this project's modules with ``strict=True``, and both run on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from refutil import randomise
from torch import nn

from skysense.encoders.checkpoint_filter import match_to_model
from skysense.encoders.grid_align import GridAlign
from skysense.encoders.swin_v2 import SwinTransformerV2
from skysense.encoders.temporal_fusion import TemporalFusion
from skysense.encoders.vit import VisionTransformer

pytestmark = pytest.mark.reference

# mmpretrain computes its relative_coords_table buffer in float32 at construction; .double()
# keeps those float32 values, so the Swin differs by ~4e-7 (1e-14 with a float64 table).
TOL = 1e-5
MAX_DIFFS: dict[str, float] = {}  # filled as the tests run; printed by test_zz_report


class Holder(nn.Module):
    """Our modules under SkySense's top-level names, so that the mapping sees them as parts."""

    def __init__(self, **parts):
        super().__init__()
        for k, v in parts.items():
            setattr(self, k, v)


def load_released(release: dict, holder: nn.Module) -> None:
    mapped, report = match_to_model(release, holder)
    assert report.ok, report.table()
    assert report.absent == []
    holder.load_state_dict(mapped, strict=True)  # every key of ours, nothing left over


def prefixed(module: nn.Module, prefix: str) -> dict:
    return {f"{prefix}.{k}": v.clone() for k, v in module.state_dict().items()}


def record(name: str, ours, ref) -> float:
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
    MAX_DIFFS[name] = max(diff, MAX_DIFFS.get(name, 0.0))
    return diff


SWIN = dict(embed=16, depths=(2, 2, 6, 2), heads=(1, 2, 4, 8), extra_norm_every=3)


def _swin_pair(mm, window: int, prefix: str = "backbone_gep", window_mode: str = "masked"):
    ref = randomise(mm.ref_swin(window=window, img_size=128, **SWIN)).double()
    ref.eval()  # mmpretrain's train() returns None: no chaining
    ours = SwinTransformerV2(
        embed_dim=SWIN["embed"],
        depths=SWIN["depths"],
        num_heads=SWIN["heads"],
        window_size=window,
        extra_norm_period=SWIN["extra_norm_every"],
        window_mode=window_mode,
    )
    holder = Holder(hr_encoder=ours).double().eval()
    load_released(prefixed(ref, prefix), holder)
    return ref, ours


@pytest.mark.parametrize(
    "window, size, prefix",
    [
        (4, (128, 128), "backbone_gep"),  # stage maps 32, 16, 8, 4: the last is one window
        (3, (192, 288), "backbone_hr"),  # odd, non-square: 48x72 ... 6x9, shifted everywhere
    ],
)
def test_swin_v2_every_stage(mm, window, size, prefix):
    """Every stage of the pyramid (with the extra norms every 3 blocks and the output norms)."""
    torch.manual_seed(0)
    ref, ours = _swin_pair(mm, window, prefix)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        assert g.shape == w.shape
    diff = record(f"swin window {window} input {size}", got, want)
    assert diff < TOL, diff


# Window 3 at sizes whose stage maps the window does not tile (stage maps in brackets).
EDGE_SIZES = [
    ((96, 192), "stage 4 is 3 x 6 tokens: one side equals the window"),  # 24x48 .. 3x6
    ((192, 320), "stage 1 is 48 x 80 tokens: 80 is not a multiple of the window"),
    ((160, 224), "no stage a multiple of the window: 40x56, 20x28, 10x14, 5x7"),
    ((96, 96), "stage 4 is 3 x 3 tokens: one unshifted window"),
    ((224, 96), "portrait, 56x24 .. 7x3: the shorter side equals the window"),
]


@pytest.mark.parametrize("size, what", EDGE_SIZES, ids=[f"{h}x{w}" for (h, w), _ in EDGE_SIZES])
def test_swin_v2_release_mode_at_edge_sizes(mm, size, what):
    """swin_window_mode="release" is mmpretrain's ShiftWindowMSA at the sizes where it differs
    from the default mode: zero padding attended to, no shift once a side equals the window."""
    torch.manual_seed(0)
    ref, ours = _swin_pair(mm, 3, window_mode="release")
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
    diff = record(f"swin window 3 input {size}, release mode [{what}]", got, want)
    assert diff < TOL, diff


def _float64_coords_tables(ref: nn.Module) -> None:
    """Rebuild mmpretrain's float32 ``relative_coords_table`` buffers in float64 from their
    formula (offsets in [-(w-1), w-1] / (w-1) * 8, then sign(t) log2(1 + |t|) / 3)."""
    for name, buf in ref.named_buffers():
        if name.endswith("relative_coords_table"):
            wh, ww = (buf.shape[1] + 1) // 2, (buf.shape[2] + 1) // 2
            dy = torch.arange(1 - wh, wh, dtype=torch.float64) / max(wh - 1, 1) * 8
            dx = torch.arange(1 - ww, ww, dtype=torch.float64) / max(ww - 1, 1) * 8
            t = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1)[None]
            t = torch.sign(t) * torch.log2(t.abs() + 1.0) / 3.0
            assert torch.allclose(buf, t, atol=1e-6)  # the same table, float32 rounded
            buf.copy_(t)


def test_swin_v2_release_mode_with_the_largest_logit_scale(mm):
    """Logit scales at their clamp (100), the sharpest softmax, at sizes no stage tiles. The
    sharp softmax amplifies the reference's float32 coordinate table to ~1e-4 over 12 blocks,
    so the reference gets that table in float64 here (then the two agree to ~1e-11). (Random
    weights rarely make the release's -100 shift mask differ from an exclusion; the test
    against ShiftWindowMSA below builds inputs where it does.)"""
    torch.manual_seed(0)
    ref, ours = _swin_pair(mm, 3, window_mode="release")
    with torch.no_grad():
        _float64_coords_tables(ref)
        for m in (ref, ours):
            for name, p in m.named_parameters():
                if name.endswith("logit_scale"):
                    p.fill_(5.0)  # > log 100: clamped to 100 on both sides
    x = torch.randn(1, 3, 160, 224, dtype=torch.float64)
    with torch.no_grad():
        name = "swin window 3 input (160, 224), release mode, logit scale 100, float64 table"
        diff = record(name, ours(x), ref(x))
    assert diff < TOL, diff


@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_release_shift_mask_against_shift_window_msa(mm, size):
    """One shifted-window attention against mmpretrain's ShiftWindowMSA(WindowMSAV2) on inputs
    built so that the regions a shifted window must keep apart matter: queries read channel 0,
    keys channel 1, which is +1 on the tokens that the roll wraps (the first row and column)
    and -1 elsewhere. With logit scale 100, a query's own region gives logits near -100 and
    the wrapped tokens near 0 after the release's -100 mask: the release's output is mostly
    the wrapped tokens' values, where an excluding mask (default mode) gives none of them."""
    from mmpretrain.models.utils import ShiftWindowMSA, WindowMSAV2

    from skysense.encoders.window_attention import WindowAttentionV2

    dim = 4
    ref = ShiftWindowMSA(dim, 1, 3, shift_size=1, window_msa=WindowMSAV2, cpb_mlp_hidden_dims=16)
    ref = randomise(ref).double().eval()
    with torch.no_grad():
        w = torch.zeros(3 * dim, dim, dtype=torch.float64)
        w[0, 0] = 1.0  # q = (x0, 0, 0, 0) + q_bias
        w[dim, 1] = 1.0  # k = (x1, 0, 0, 0): cosine logits are +-1 times the scale
        w[2 * dim :] = torch.randn(dim, dim, dtype=torch.float64)  # v: random
        ref.w_msa.qkv.weight.copy_(w)
        ref.w_msa.q_bias.zero_()
        ref.w_msa.logit_scale.fill_(5.0)  # clamped to log 100
    state = {k.removeprefix("w_msa."): v for k, v in ref.state_dict().items()}
    state = {k: v for k, v in state.items() if "relative_" not in k}  # buffers: ours are tables
    H, W = size
    x = torch.zeros(2, H, W, dim, dtype=torch.float64)
    x[..., 0] = 1.0
    x[..., 1] = -1.0
    x[:, :1, :, 1] = 1.0  # rows and columns wrapped by the roll of 1
    x[:, :, :1, 1] = 1.0
    x[..., 2:] = torch.randn(2, H, W, dim - 2, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x.reshape(2, H * W, dim), (H, W)).view(2, H, W, dim)
        got = {}
        for mode in ("release", "masked"):
            ours = WindowAttentionV2(dim, 1, (3, 3), shift=True, cpb_hidden=16, mode=mode)
            ours = ours.double().eval()
            ours.load_state_dict(state, strict=True)
            got[mode] = ours(x)
    diff = record(
        f"ShiftWindowMSA alone {size}, release mode, regions that matter", [got["release"]], [want]
    )
    assert diff < TOL, diff
    assert float((got["masked"] - want).abs().max()) > 0.1


@pytest.mark.parametrize("size, what", EDGE_SIZES[:3], ids=["3x6", "48x80", "40x56"])
def test_swin_v2_masked_mode_differs_at_edge_sizes(mm, size, what):
    """The default mode (padding masked out, the longer side of a small map shifted) is not
    the release's at these sizes: the same weights give different outputs."""
    torch.manual_seed(0)
    ref, ours = _swin_pair(mm, 3, window_mode="masked")
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(ours(x), ref(x)))
    MAX_DIFFS[f"swin window 3 input {size}, masked mode (differs by design) [{what}]"] = diff
    assert diff > 1e-3, diff


def test_swin_v2_release_refuses_maps_below_the_window(mm):
    """mmpretrain (pad_small_map=False) refuses a map shorter than the window; release mode
    runs it (that side clipped to one window, nothing shifted): no reference to compare."""
    torch.manual_seed(0)
    ref, ours = _swin_pair(mm, 3, window_mode="release")
    x = torch.randn(1, 3, 64, 128, dtype=torch.float64)  # stage 4 is 2 x 4 tokens
    with torch.no_grad(), pytest.raises(AssertionError, match="smaller than the window"):
        ref(x)
    with torch.no_grad():
        out = ours(x)
    assert out[3].shape == (1, 8 * SWIN["embed"], 2, 4)
    assert all(torch.isfinite(o).all() for o in out)


VIT = dict(img_size=16, patch=4, dims=32, layers=4, heads=2, out_indices=(0, 1, 2, 3))


@pytest.mark.parametrize("with_cls_token", [True, False])
@pytest.mark.parametrize("final_norm", [True, False])
@pytest.mark.parametrize("size", [(16, 16), (20, 28)])
def test_vit_every_tap(mm, with_cls_token, final_norm, size):
    """Every tap of the S2 ViT, with and without the class token and final norm; 20 x 28
    pixels give a 5 x 7 grid, so the 4 x 4 position grid is resized (bicubic) on both sides."""
    ref = mm.RefViT(10, with_cls_token=with_cls_token, final_norm=final_norm, **VIT)
    ref = randomise(ref).double().eval()
    ours = VisionTransformer(
        10,
        img_size=VIT["img_size"],
        patch_size=VIT["patch"],
        dim=VIT["dims"],
        depth=VIT["layers"],
        num_heads=VIT["heads"],
        taps=VIT["out_indices"],
        cls_token=with_cls_token,
        final_norm=final_norm,
    )
    holder = Holder(s2_encoder=ours).double().eval()
    load_released(prefixed(ref, "backbone_s2"), holder)
    x = torch.randn(3, 10, *size, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
        got = ours(x)
    assert len(got) == len(want) == 4
    name = f"vit cls={with_cls_token} final_norm={final_norm} input {size}"
    diff = record(name, got, want)
    assert diff < TOL, diff


def test_grid_head_matches_uphead(mm):
    """head_s2 (Conv2d 1x1 + PixelShuffle) against our channels-last GridAlign."""
    ref = randomise(mm.RefUPHead(32, 24, 2)).double().eval()
    ours = GridAlign(32, 24, 2)
    holder = Holder(grid_s2=ours).double().eval()
    load_released(prefixed(ref, "head_s2"), holder)
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        want = ref.decoder(x)
        got = ours(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    diff = record("grid head (UPHead) 5 x 7, upscale 2", [got], [want])
    assert diff < TOL, diff


@pytest.mark.parametrize("padded", [False, True])
def test_one_fusion_layer_with_ctpe(mm, padded):
    """One fusion layer (mmseg TransformerEncoderLayer, LN eps 1e-5) with porj_linear, the
    class token and the calendar table ``ctpe`` added to the tokens before the projection."""
    c_g, dim, T = 48, 32, 5
    ref = randomise(mm.RefFusion(c_g, dim, layers=1, heads=2)).double().eval()
    ctpe = nn.Parameter(torch.randn(1, 365, c_g, dtype=torch.float64))
    ours = TemporalFusion(c_g, dim, depth=1, num_heads=2, final_norm=False, norm_eps=1e-5)
    holder = Holder(fusion=ours).double().eval()
    load_released({**prefixed(ref, "fusion"), "ctpe": ctpe.detach().clone()}, holder)

    B, h, w = 2, 3, 2
    tokens = torch.randn(B, T, h, w, c_g, dtype=torch.float64)
    doy = torch.randint(1, 366, (B, T))
    valid = torch.ones(B, T, dtype=torch.bool)
    if padded:
        valid[0, 3:] = False
        valid[1, 0] = False
    with torch.no_grad():
        got = ours([tokens], [valid], [doy])  # (B, h, w, dim)
        seq = tokens + ctpe[0, doy - 1][:, :, None, None]  # (B, T, h, w, C_g)
        seq = seq.permute(0, 2, 3, 1, 4).reshape(B * h * w, T, c_g)
        pad = torch.cat([torch.zeros(B, 1, dtype=torch.bool), ~valid], dim=1)
        pad = pad[:, None].expand(B, h * w, T + 1).reshape(B * h * w, T + 1)
        want = ref(seq, key_padding_mask=pad if padded else None).view(B, h, w, dim)
    diff = record(f"fusion 1 layer + ctpe, padded={padded}", [got], [want])
    assert diff < TOL, diff


def test_zz_report(capsys):
    """Print the largest differences measured above (run with -s to see them)."""
    assert MAX_DIFFS, "no equivalence test ran"
    with capsys.disabled():
        print("\nreference tier, max |ours - reference| (float64):")
        for name, d in sorted(MAX_DIFFS.items()):
            print(f"  {d:.3e}  {name}")

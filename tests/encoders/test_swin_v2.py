"""Swin V2: window attention (plain, shifted, padded, shrunk) against a dense reference; patch
merging against nn.Unfold; the block's post-norm; stage outputs; the extra-norm placement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from encoders_reference import cpb_coord, window_attention_reference

from skysense.encoders.checkpoint_filter import unfold_to_channels_last
from skysense.encoders.swin_v2 import PatchMerging, SwinTransformerV2, SwinV2Block
from skysense.encoders.window_attention import (
    WindowAttentionV2,
    log_spaced_coords,
    relative_position_index,
    window_mask,
    window_partition,
    window_reverse,
)

pytestmark = pytest.mark.unit


def _randomise(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere (zero biases would hide q/v bias mix-ups)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize(
    "H, W, window, shift",
    [
        (8, 8, 4, False),
        (8, 8, 4, True),
        (12, 8, 4, True),  # several windows, rectangular map
        (7, 10, 4, True),  # padding on both axes, with shift
        (9, 5, 4, False),  # padding without shift
        (3, 6, 4, True),  # map shorter than the window: one unshifted window along H
        (4, 4, 4, True),  # map equal to the window: no shift at all
        (10, 9, 3, True),  # odd window
    ],
)
def test_window_attention_matches_dense_reference(H, W, window, shift):
    attn = WindowAttentionV2(12, 3, (window, window), shift=shift, cpb_hidden=16).double()
    _randomise(attn)
    with torch.no_grad():
        attn.logit_scale[0] = math.log(300.0)  # above the clamp: the clamp must bite
    x = torch.randn(2, H, W, 12, dtype=torch.float64)
    ours = attn(x)
    ref = window_attention_reference(attn, x)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_window_attention_gradients_match_reference():
    attn = WindowAttentionV2(8, 2, (4, 4), shift=True, cpb_hidden=8).double()
    _randomise(attn)
    x = torch.randn(1, 7, 9, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 7, 9, 8, dtype=torch.float64)
    grads = torch.autograd.grad((attn(x) * g).sum(), [x, *attn.parameters()])
    ref = torch.autograd.grad(
        (window_attention_reference(attn, x) * g).sum(), [x, *attn.parameters()]
    )
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_log_spaced_coords_and_index_against_loops():
    wh, ww = 3, 4
    coords = log_spaced_coords(wh, ww, (5, 4), dtype=torch.float64)
    idx = relative_position_index(wh, ww)
    pos = [(y, x) for y in range(wh) for x in range(ww)]
    for i, (yi, xi) in enumerate(pos):
        for j, (yj, xj) in enumerate(pos):
            c = coords[idx[i, j]]
            assert c[0].item() == pytest.approx(cpb_coord(yi - yj, 5))
            assert c[1].item() == pytest.approx(cpb_coord(xi - xj, 4))


def test_mask_is_none_only_when_nothing_to_mask():
    assert window_mask(8, 8, 4, 4, 0, 0) is None
    m = window_mask(8, 8, 4, 4, 2, 2)
    assert m.shape == (4, 16, 16)
    assert (m[0] == 0).all()  # the top-left window is never split by the roll
    assert (m[-1] != 0).any()  # the bottom-right one holds wrapped pieces
    assert window_mask(7, 8, 4, 4, 0, 0).shape == (4, 16, 16)  # padding alone


def test_partition_reverse_roundtrip_and_order():
    x = torch.arange(2 * 4 * 6 * 1).reshape(2, 4, 6, 1)
    w = window_partition(x, 2, 3)
    assert w.shape == (2 * 2 * 2, 6, 1)
    assert w[1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]  # image 0, window (0, 1)
    assert w[4, 0, 0].item() == 24  # image-major: window index = b * nW + w
    assert torch.equal(window_reverse(w, 2, 3, 4, 6), x)


def test_patch_merging_with_released_weights_matches_unfold():
    """The release gathers 2 x 2 patches with nn.Unfold (channel-major); its reduction weight,
    permuted by the checkpoint filter, must give the same tokens through our gather."""
    pm = PatchMerging(5).double()
    _randomise(pm)
    released = torch.randn(10, 20, dtype=torch.float64)
    with torch.no_grad():
        pm.reduction.weight.copy_(unfold_to_channels_last(released))
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    cols = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # (B, 4C, L)
    ref = pm.norm(cols.transpose(1, 2) @ released.T).reshape(2, 3, 2, 10)
    torch.testing.assert_close(pm(x), ref)


def test_cached_tables_serve_inference_then_training():
    window_mask.cache_clear()
    attn = WindowAttentionV2(8, 2, (4, 4), shift=True, cpb_hidden=8)
    x = torch.randn(1, 8, 8, 8)
    with torch.inference_mode():
        y0 = attn(x)  # builds and caches the mask and the tables
    y = attn(x)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), y0)
    assert window_mask(8, 8, 4, 4, 2, 2) is window_mask(8, 8, 4, 4, 2, 2)


def test_block_is_post_norm_with_extra_norm():
    blk = SwinV2Block(8, 2, (4, 4), shift=True, extra_norm=True, cpb_hidden=8).double().eval()
    _randomise(blk)
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    y = x + blk.norm1(window_attention_reference(blk.attn, x))
    y = y + blk.norm2(blk.mlp.fc2(F.gelu(blk.mlp.fc1(y))))
    torch.testing.assert_close(blk(x), blk.norm3(y))


@pytest.mark.parametrize("H, W", [(128, 128), (96, 160)])
def test_stage_outputs(H, W):
    swin = SwinTransformerV2(3, 16, (1, 1, 2, 1), (1, 2, 2, 4), window_size=4, cpb_hidden=8)
    outs = swin(torch.randn(2, 3, H, W))
    assert len(outs) == 4
    for i, o in enumerate(outs):
        assert o.shape == (2, 16 * 2**i, H // 2 ** (i + 2), W // 2 ** (i + 2))
        assert o.dtype == torch.float32 and torch.isfinite(o).all()


def test_input_size_errors_name_the_shape():
    swin = SwinTransformerV2(3, 16, (1, 1, 1, 1), (1, 1, 1, 1), window_size=4, cpb_hidden=8)
    with pytest.raises(ValueError, match=r"multiples of 32.*\(1, 3, 100, 128\)"):
        swin(torch.randn(1, 3, 100, 128))
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\); got \(1, 4, 128, 128\)"):
        swin(torch.randn(1, 4, 128, 128))


def test_extra_norm_every_six_blocks_on_huge():
    with torch.device("meta"):
        swin = SwinTransformerV2(3, 352, (2, 2, 18, 2), (8, 16, 32, 64), extra_norm_period=6)
    with_norm3 = [
        (s, b)
        for s, stage in enumerate(swin.stages)
        for b, blk in enumerate(stage.blocks)
        if blk.norm3 is not None
    ]
    assert with_norm3 == [(2, 5), (2, 11), (2, 17)]
    assert [blk.attn.shift for blk in swin.stages[2].blocks[:4]] == [False, True, False, True]


@pytest.mark.triton
def test_window_attention_through_the_triton_kernel_matches_reference():
    """The periodic (nW, 1, N, N) mask layout as the fused kernel reads it (interpreter on CPU)."""
    pytest.importorskip("triton")
    from skysense.kernels import force_backend, last_backend

    attn = WindowAttentionV2(8, 2, (4, 4), shift=True, cpb_hidden=8)
    _randomise(attn)
    x = torch.randn(2, 7, 8, 8)
    with force_backend("attention", "triton"):
        ours = attn(x)
        assert last_backend("attention") == "triton"
    ref = window_attention_reference(attn.double(), x.double()).float()
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-4)

"""Swin V2: window attention (plain, shifted, padded, shrunk) against a dense reference, and in
release mode against a literal pad-roll-partition reference; patch merging against nn.Unfold;
the block's post-norm; stage outputs; the extra-norm placement."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from encoders_reference import cpb_coord, window_attention_reference

from skysense.encoders.checkpoint_filter import unfold_to_channels_last
from skysense.encoders.swin_v2 import PatchMerging, SwinTransformerV2, SwinV2Block
from skysense.encoders.window_attention import (
    RELEASE_MASKED,
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


# --- release mode (swin_window_mode="release"): the released weights' mmpretrain behaviour ----


def _region_slices(n: int, win: int, shift: int) -> list[slice]:
    """Regions of a rolled, padded axis of n positions: everything but the last window, the
    last window's unwrapped part, and the ``shift`` wrapped positions."""
    return [slice(0, n - win), slice(n - win, n - shift), slice(n - shift, n)]


def release_window_reference(attn, x: torch.Tensor) -> torch.Tensor:
    """Release-mode window attention written out literally, window by window: zero-pad to a
    multiple of the window, roll, and attend inside each window to every token, padding
    included, adding ``RELEASE_MASKED`` between the regions the roll brings together. No shift
    when a side of the map is no longer than the window (a shorter side is one window)."""
    B, H, W, C = x.shape
    wh, ww = attn.window_size
    small = wh >= H or ww >= W
    eh, ew = min(wh, H), min(ww, W)
    sh, sw = (wh // 2, ww // 2) if attn.shift and not small else (0, 0)
    Hp, Wp = -(-H // eh) * eh, -(-W // ew) * ew
    xp = x.new_zeros(B, Hp, Wp, C)
    xp[:, :H, :W] = x
    xp = torch.roll(xp, (-sh, -sw), (1, 2))
    region = torch.zeros(Hp, Wp)
    if sh or sw:
        for i, hs in enumerate(_region_slices(Hp, eh, sh)):
            for j, ws in enumerate(_region_slices(Wp, ew, sw)):
                region[hs, ws] = 3 * i + j
    nh, hd = attn.num_heads, attn.head_dim
    bias_qkv = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    q, k, v = F.linear(xp, attn.qkv.weight, bias_qkv).view(B, Hp, Wp, 3, nh, hd).unbind(3)
    scale = attn.logit_scale.clamp(max=math.log(100.0)).exp().view(nh, 1, 1)
    out = torch.zeros_like(xp)
    for y0 in range(0, Hp, eh):
        for x0 in range(0, Wp, ew):
            pos = [(y0 + a, x0 + b) for a in range(eh) for b in range(ew)]
            ys, xs = torch.tensor([p[0] for p in pos]), torch.tensor([p[1] for p in pos])
            coords = torch.tensor(
                [
                    [cpb_coord(yi - yj, wh), cpb_coord(xi - xj, ww)]
                    for yi, xi in pos
                    for yj, xj in pos
                ],
                dtype=x.dtype,
            )
            bias = 16 * torch.sigmoid(attn.cpb_mlp(coords)).view(len(pos), len(pos), nh)
            lab = region[ys, xs]
            apart = (lab[:, None] != lab[None, :]).to(x.dtype) * RELEASE_MASKED
            qw = F.normalize(q[:, ys, xs].transpose(1, 2), dim=-1)  # (B, nh, N, hd)
            kw = F.normalize(k[:, ys, xs].transpose(1, 2), dim=-1)
            logits = scale * qw @ kw.transpose(-1, -2) + bias.permute(2, 0, 1) + apart
            o = torch.softmax(logits, -1) @ v[:, ys, xs].transpose(1, 2)
            out[:, ys, xs] = attn.proj(o.transpose(1, 2).reshape(B, len(pos), C))
    return torch.roll(out, (sh, sw), (1, 2))[:, :H, :W]


@pytest.mark.parametrize(
    "H, W, window, shift",
    [
        (8, 8, 4, True),  # tiled: as masked mode
        (7, 10, 4, True),  # padding on both axes, attended to, with shift
        (9, 5, 4, False),  # padding without shift
        (4, 9, 4, True),  # a side equal to the window: no shift at all, W padded to 12
        (3, 6, 4, True),  # a side below it: clipped to one window, no shift, W padded
        (10, 9, 3, True),  # odd window
        (6, 3, 3, True),  # portrait, width equal to the window
    ],
)
def test_release_mode_matches_literal_reference(H, W, window, shift):
    attn = WindowAttentionV2(12, 3, (window, window), shift, cpb_hidden=16, mode="release")
    attn = attn.double()
    _randomise(attn)
    with torch.no_grad():
        attn.logit_scale[0] = math.log(300.0)  # above the clamp: the clamp must bite
    x = torch.randn(2, H, W, 12, dtype=torch.float64)
    torch.testing.assert_close(attn(x), release_window_reference(attn, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("H, W, same", [(8, 12, True), (7, 10, False), (4, 9, False)])
def test_modes_agree_exactly_where_the_window_tiles_the_map(H, W, same):
    masked = WindowAttentionV2(8, 2, (4, 4), shift=True, cpb_hidden=8).double()
    _randomise(masked)
    release = WindowAttentionV2(8, 2, (4, 4), shift=True, cpb_hidden=8, mode="release").double()
    release.load_state_dict(masked.state_dict())
    x = torch.randn(1, H, W, 8, dtype=torch.float64)
    with torch.no_grad():
        diff = float((masked(x) - release(x)).abs().max())
    assert (diff < 1e-12) == same, diff


def test_release_mask_values_and_when_there_is_none():
    assert window_mask(5, 8, 4, 4, 0, 0, None, torch.float32, "release") is None  # pad alone
    m = window_mask(5, 8, 4, 4, 2, 2, None, torch.float32, "release")
    assert m.shape == (2 * 2, 16, 16)
    assert set(m.unique().tolist()) == {0.0, RELEASE_MASKED}
    # the top-left rolled window holds original rows 2..5 (row 5 padding), no wrapped token:
    # whole in release mode, its padding row kept apart in masked mode
    assert (m[0] == 0).all()
    assert (window_mask(5, 8, 4, 4, 2, 2)[0] != 0).any()


def test_unknown_window_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        WindowAttentionV2(8, 2, (4, 4), mode="padded")


def test_the_config_field_reaches_every_block():
    from skysense.encoders import build_skysense

    model = build_skysense("tiny", swin_window_mode="release", modalities=("hr",))
    modes = {b.attn.mode for s in model.hr_encoder.stages for b in s.blocks}
    assert modes == {"release"} and model.cfg.swin_window_mode == "release"
    assert {
        b.attn.mode
        for s in build_skysense("tiny", modalities=("hr",)).hr_encoder.stages
        for b in s.blocks
    } == {"masked"}
    with pytest.raises(ValueError, match="swin_window_mode must be one of"):
        build_skysense("tiny", swin_window_mode="padded")


@pytest.mark.triton
def test_release_mode_through_the_triton_kernel_matches_reference():
    """Release mode's -100 shift mask and attended padding as the fused kernel reads them."""
    pytest.importorskip("triton")
    from skysense.kernels import force_backend, last_backend

    attn = WindowAttentionV2(8, 2, (4, 4), shift=True, cpb_hidden=8, mode="release")
    _randomise(attn)
    x = torch.randn(2, 7, 10, 8)
    with force_backend("attention", "triton"):
        ours = attn(x)
        assert last_backend("attention") == "triton"
    ref = release_window_reference(attn.double(), x.double()).float()
    torch.testing.assert_close(ours, ref, rtol=2e-4, atol=2e-4)

"""Self-attention and the pre-norm block against head-by-head references (with and without a
key padding mask, eager and the compile-time bias form); the ViT's taps, final norm and
position-embedding resize."""

from __future__ import annotations

import pytest
import torch
from encoders_reference import block_reference, self_attention_reference

from skysense.encoders.attention import Attention
from skysense.encoders.block import Block
from skysense.encoders.vit import VisionTransformer

pytestmark = pytest.mark.unit


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("N", [1, 7, 17])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_reference(N, masked):
    attn = Attention(12, 3).double()
    _randomise(attn)
    x = torch.randn(3, N, 12, dtype=torch.float64)
    kpm = None
    if masked:
        kpm = torch.rand(3, N) < 0.4
        kpm[:, 0] = False  # every row keeps a key, as the fusion's extra token guarantees
    torch.testing.assert_close(attn(x, kpm), self_attention_reference(attn, x, kpm))


def test_attention_compile_form_of_the_mask_is_the_same(monkeypatch):
    attn = Attention(8, 2).double()
    _randomise(attn)
    x = torch.randn(4, 9, 8, dtype=torch.float64)
    kpm = torch.rand(4, 9) < 0.5
    kpm[:, 0] = False
    eager = attn(x, kpm)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(attn(x, kpm), eager)


def test_block_matches_reference():
    blk = Block(16, 4, mlp_ratio=2.0).double().eval()
    _randomise(blk)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 5:] = True
    torch.testing.assert_close(blk(x, kpm), block_reference(blk, x, kpm))


def test_drop_path_drops_whole_samples_in_training_only():
    blk = Block(8, 2, drop_path=0.5)
    x = torch.randn(64, 3, 8)
    blk.eval()
    torch.testing.assert_close(blk(x), block_reference(blk, x))
    blk.train()
    y = blk(x)
    # a dropped sample went through neither branch: its output equals its input
    same = (y - x).abs().amax(dim=(1, 2)) == 0
    assert 5 < int(same.sum()) < 59


def test_vit_taps_and_final_norm():
    vit = VisionTransformer(
        10, img_size=16, patch_size=4, dim=32, depth=4, num_heads=2, taps=(1, 3)
    )
    x = torch.randn(5, 10, 16, 16)
    taps, last = vit.forward_channels_last(x)
    assert [t.shape for t in taps] == [(5, 4, 4, 32)] * 2
    assert last is taps[-1]
    # the last tap is normed (release habit): zero mean, unit variance per token
    torch.testing.assert_close(last.mean(-1), torch.zeros(5, 4, 4), atol=1e-5, rtol=0)
    # reference: patches by hand, class token, position embedding, blocks
    p = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (5, 10, 4, 4, 4, 4)
    p = p.permute(0, 2, 3, 1, 4, 5).reshape(5, 16, 160)
    t = p @ vit.patch_embed.weight.reshape(32, 160).T + vit.patch_embed.bias
    t = torch.cat([vit.cls_token.expand(5, -1, -1), t], 1) + vit.pos_embed
    outs = []
    for i, blk in enumerate(vit.blocks):
        t = blk(t)
        if i == 3:
            t = vit.norm(t)
        outs.append(t[:, 1:].reshape(5, 4, 4, 32))
    torch.testing.assert_close(taps[0], outs[1])
    torch.testing.assert_close(taps[1], outs[3])
    chw = vit(x)
    assert chw[0].shape == (5, 32, 4, 4)


def test_vit_other_sizes_resize_the_position_embedding():
    vit = VisionTransformer(2, img_size=16, patch_size=4, dim=16, depth=2, num_heads=2, taps=(1,))
    taps, last = vit.forward_channels_last(torch.randn(2, 2, 24, 32))
    assert last.shape == (2, 6, 8, 16)
    pe = vit._pos_embed(4, 4)
    assert pe is vit.pos_embed  # the default grid uses the table as it is
    with pytest.raises(ValueError, match=r"expected \(N, 2, H, W\); got \(2, 3, 16, 16\)"):
        vit(torch.randn(2, 3, 16, 16))


def test_vit_no_class_token_and_tap_validation():
    vit = VisionTransformer(
        2, img_size=8, patch_size=4, dim=16, depth=3, num_heads=2, taps=(0, 1), cls_token=False
    )
    taps, last = vit.forward_channels_last(torch.randn(1, 2, 8, 8))
    assert vit.pos_embed.shape == (1, 4, 16) and last.shape == (1, 2, 2, 16)
    assert last is not taps[-1]  # block 2 is not tapped, but feeds the grid head
    with pytest.raises(ValueError, match="taps"):
        VisionTransformer(2, img_size=8, patch_size=4, dim=16, depth=3, num_heads=2, taps=(3,))


@pytest.mark.parametrize("n", [1, 3])
def test_block_head_equals_the_first_tokens_of_the_full_block(n):
    blk = Block(16, 4).double().eval()
    _randomise(blk)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    kpm = torch.rand(3, 7) < 0.4
    kpm[:, 0] = False
    torch.testing.assert_close(blk.forward_head(x, kpm, n), blk(x, kpm)[:, :n])
    no_bias = Attention(8, 2, qkv_bias=False).double()
    y = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(no_bias(y, num_queries=2), no_bias(y)[:, :2])


def test_vit_patch_matmul_equals_the_convolution():
    vit = VisionTransformer(10, img_size=16, patch_size=4, dim=24, depth=1, num_heads=2, taps=(0,))
    x = torch.randn(3, 10, 16, 20)
    conv = vit.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(vit._embed_patches(x, 4, 5), conv, rtol=1e-5, atol=1e-5)

"""The release's modules, from the OpenMMLab packages in .venv-ref (`make reference`).

- HR: mmpretrain 1.2.0 ``SwinTransformerV2`` itself (the mmcls Swin V2 the release used).
- S2/S1 ViTs and the fusion: mmsegmentation cannot be imported here (importing ``mmseg``
  pulls ``mmcv.ops``, compiled and absent from mmcv-lite), so mmseg's ``VisionTransformer`` /
  ``TransformerEncoderLayer`` are rebuilt below from mmcv-lite's own bricks,
  ``mmcv.cnn.bricks.transformer.MultiheadAttention`` (``attn.attn.in_proj_*``,
  ``attn.attn.out_proj``) and ``FFN`` (``ffn.layers.0.0``, ``ffn.layers.1``), wrapped as mmseg
  wraps them (``ln1``, ``attn``, ``ln2``, ``ffn``; the ViT's ``patch_embed.projection``,
  ``cls_token``, ``pos_embed`` with the class token's row, optional final ``ln1``; the
  SkySense++ fusion's ``porj_linear``, ``cls_token``, ``layers``). The wrappers follow mmseg
  1.2's documented forward (class token always concatenated and position-embedded, dropped
  before the layers when ``with_cls_token=False``; bicubic ``align_corners=False`` resize of
  the position grid; taps without the class token) and are written here, not copied.

Only the tests of this folder import this module, after the ``mm`` fixture has put .venv-ref
at the end of ``sys.path``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import FFN, MultiheadAttention
from torch import nn


@contextlib.contextmanager
def linspace_on_cpu():
    """mmpretrain calls ``torch.linspace(...)[i].item()`` for drop-path rates, which the meta
    device refuses: build those few floats on the CPU."""
    orig = torch.linspace
    torch.linspace = lambda *a, **k: orig(*a, **{**k, "device": "cpu"})
    try:
        yield
    finally:
        torch.linspace = orig


def ref_swin(
    embed: int,
    depths,
    heads,
    window: int,
    extra_norm_every: int = 0,
    img_size: int = 256,
    pad_small_map: bool = False,
):
    """mmpretrain's SwinTransformerV2, four stages out, no drop path, patch 4."""
    from mmpretrain.models.backbones import SwinTransformerV2

    with linspace_on_cpu():
        return SwinTransformerV2(
            arch=dict(
                embed_dims=embed,
                depths=list(depths),
                num_heads=list(heads),
                extra_norm_every_n_blocks=extra_norm_every,
            ),
            img_size=img_size,
            patch_size=4,
            in_channels=3,
            window_size=[window] * len(depths),
            drop_path_rate=0.0,
            out_indices=tuple(range(len(depths))),
            pad_small_map=pad_small_map,
            pretrained_window_sizes=[0] * len(depths),
        )


class EncoderLayer(nn.Module):
    """mmseg's ``TransformerEncoderLayer`` from mmcv-lite's bricks: pre-norm,
    x + attn(ln1(x)), then x + ffn(ln2(x)) (the bricks add the identity)."""

    def __init__(self, dims: int, heads: int, ffn_dims: int, eps: float, qkv_bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(dims, eps=eps)
        self.attn = MultiheadAttention(dims, heads, batch_first=True, bias=qkv_bias)
        self.ln2 = nn.LayerNorm(dims, eps=eps)
        self.ffn = FFN(
            embed_dims=dims,
            feedforward_channels=ffn_dims,
            num_fcs=2,
            act_cfg=dict(type="GELU"),
            add_identity=True,
        )

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        x = self.attn(self.ln1(x), identity=x, key_padding_mask=key_padding_mask)
        return self.ffn(self.ln2(x), identity=x)


class _PatchEmbed(nn.Module):
    def __init__(self, in_ch: int, dims: int, patch: int):
        super().__init__()
        self.projection = nn.Conv2d(in_ch, dims, kernel_size=patch, stride=patch)


class RefViT(nn.Module):
    """mmseg 1.2 ``VisionTransformer`` (patch_norm=False, pre_norm=False), names included."""

    def __init__(
        self,
        in_ch: int,
        img_size: int,
        patch: int,
        dims: int,
        layers: int,
        heads: int,
        out_indices,
        with_cls_token: bool = True,
        final_norm: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.grid = img_size // patch
        self.out_indices = tuple(out_indices)
        self.with_cls_token = with_cls_token
        self.final_norm = final_norm
        self.patch_embed = _PatchEmbed(in_ch, dims, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2 + 1, dims))
        self.layers = nn.ModuleList(EncoderLayer(dims, heads, 4 * dims, eps) for _ in range(layers))
        if final_norm:
            self.ln1 = nn.LayerNorm(dims, eps=eps)

    def _pos(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed
        if (h, w) == (self.grid, self.grid):
            return pos
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, H, W) -> taps (B, dims, H / patch, W / patch)."""
        B = x.shape[0]
        x = self.patch_embed.projection(x)
        h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self._pos(h, w)
        if not self.with_cls_token:
            x = x[:, 1:]
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                out = x[:, 1:] if self.with_cls_token else x
                outs.append(out.reshape(B, h, w, -1).permute(0, 3, 1, 2))
        return outs


class RefFusion(nn.Module):
    """SkySense++'s fusion neck (``TransformerEncoder``): ``porj_linear`` (sic), a prepended
    ``cls_token``, mmseg layers, no final norm; LayerNorm eps 1e-5 (its config: ``type='LN'``)."""

    def __init__(self, in_dims: int, dims: int, layers: int, heads: int, eps: float = 1e-5):
        super().__init__()
        self.porj_linear = nn.Linear(in_dims, dims)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims))
        self.layers = nn.ModuleList(EncoderLayer(dims, heads, 4 * dims, eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
        """x (B, N, in_dims) -> the class token's output (B, dims)."""
        x = self.porj_linear(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return x[:, 0]


class RefUPHead(nn.Module):
    """SkySense++'s ``UPHead``: ``decoder`` = Conv2d(in, up^2 * out, 1) + PixelShuffle(up)."""

    def __init__(self, in_dim: int, out_dim: int, up: int):
        super().__init__()
        self.decoder = nn.Sequential(nn.Conv2d(in_dim, up**2 * out_dim, 1), nn.PixelShuffle(up))


class RefRelease(nn.Module):
    """The release's top-level names: ``backbone_gep`` (HR), ``backbone_s2``, ``backbone_s1``,
    ``head_s2``, ``head_s1``, ``fusion`` and ``ctpe`` (1, days, C_g)."""

    def __init__(
        self,
        swin: dict,
        vit: dict,
        fusion: dict,
        upscale: int,
        days: int = 365,
        hr_prefix: str = "backbone_gep",
    ):
        super().__init__()
        c_g = swin["embed"] * 2 ** (len(swin["depths"]) - 1)
        self.add_module(hr_prefix, ref_swin(**swin))
        self.backbone_s2 = RefViT(10, **vit)
        self.backbone_s1 = RefViT(2, **vit)
        self.head_s2 = RefUPHead(vit["dims"], c_g, upscale)
        self.head_s1 = RefUPHead(vit["dims"], c_g, upscale)
        self.fusion = RefFusion(c_g, **fusion)
        self.ctpe = nn.Parameter(torch.zeros(1, days, c_g))


# The paper's size: Swin V2-H (embed 352, depths 2-2-18-2, heads 8-16-32-64, window 8,
# patch 4, extra norm every 6 blocks), ViT-L (patch 4, 1024 wide, 24 layers, 16 heads, taps
# 5/11/17/23, no final norm, img_size 16 as in the SkySense++ config), fusion 2816 -> 1024,
# 24 layers, 16 heads, UPHead upscale 4, ctpe (1, 365, 2816).
HUGE = dict(
    swin=dict(embed=352, depths=(2, 2, 18, 2), heads=(8, 16, 32, 64), window=8, extra_norm_every=6),
    vit=dict(
        img_size=16,
        patch=4,
        dims=1024,
        layers=24,
        heads=16,
        out_indices=(5, 11, 17, 23),
        with_cls_token=False,
        final_norm=False,
    ),
    fusion=dict(dims=1024, layers=24, heads=16),
    upscale=4,
)
# The tiny preset's sizes with the release's structure (a synthetic release for the CLI tests).
TINY = dict(
    swin=dict(embed=32, depths=(1, 1, 2, 1), heads=(1, 2, 4, 8), window=4, extra_norm_every=0),
    vit=dict(
        img_size=16,
        patch=4,
        dims=64,
        layers=4,
        heads=2,
        out_indices=(0, 1, 2, 3),
        with_cls_token=False,
        final_norm=False,
    ),
    fusion=dict(dims=64, layers=2, heads=2),
    upscale=1,
)


def manifest(sizes: dict) -> dict[str, dict]:
    """{name: {"shape": [...], "dtype": "float32" | "int64"}} of every parameter and buffer of
    :class:`RefRelease` at ``sizes``, built on the meta device."""
    with torch.device("meta"):
        model = RefRelease(**sizes)
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in model.state_dict().items()
    }


NOTES = [
    "Names and shapes of every parameter and buffer of the released SkySense checkpoint "
    "layout, built on the meta device from the reference code (see tests/reference/"
    "mm_reference.py): backbone_gep = mmpretrain 1.2.0 SwinTransformerV2 (arch huge: embed 352, "
    "depths 2-2-18-2, heads 8-16-32-64, extra norm every 6 blocks; window 8, patch 4; "
    "SkySense++ calls this prefix backbone_hr, accepted too).",
    "backbone_s2 / backbone_s1: mmseg 1.2 VisionTransformer names rebuilt from mmcv-lite 2.1.0 "
    "MultiheadAttention + FFN (mmseg itself cannot be imported without mmcv.ops): patch 4, "
    "1024 wide, 24 layers, 16 heads; in channels 10 / 2; no final norm (ln1) and "
    "with_cls_token=False as in the SkySense++ config (cls_token and the class row of "
    "pos_embed are stored all the same); pos_embed for img_size 16 (1, 17, 1024): the real "
    "files' grid is not known here, any square grid is accepted and resized.",
    "fusion: SkySense++ lib/models/necks/transformer_encoder.py TransformerEncoder: porj_linear "
    "(sic) 2816 -> 1024, cls_token (1, 1, 1024), 24 mmseg TransformerEncoderLayer (LN eps "
    "1e-5), no final norm. ctpe: SkySense++ skysense_pp_pipeline.py, nn.Parameter (1, "
    "calendar_time 365, necks.input_dims 2816). head_s2 / head_s1: UPHead decoder = "
    "Conv2d(1024, 4^2 * 2816, 1) + PixelShuffle(4).",
    "Per-file releases (skysense_model_backbone_hr.pth, ..._s2, ..._s1, ..._head_s2, "
    "..._head_s1, ..._fusion.pth in the SkySense++ config) may hold these keys without the "
    "prefix: skysense convert takes the prefix from the file name.",
]


def manifest_document() -> dict:
    """The committed fixture's content (tests/reference/fixtures/released_keys.json)."""
    from importlib.metadata import version

    return {
        "about": NOTES,
        "reference": {p: version(p) for p in ("mmpretrain", "mmengine", "mmcv-lite")},
        "huge": {"sizes": _jsonable(HUGE), "keys": manifest(HUGE)},
        "tiny": {"sizes": _jsonable(TINY), "keys": manifest(TINY)},
    }


def dump_manifest(doc: dict) -> str:
    """JSON with one line per key (readable diffs)."""
    import json

    lines = ["{"]
    lines.append(f' "about": {json.dumps(doc["about"], indent=2)},')
    lines.append(f' "reference": {json.dumps(doc["reference"])},')
    for i, size in enumerate(("huge", "tiny")):
        lines.append(f' "{size}": {{')
        lines.append(f'  "sizes": {json.dumps(doc[size]["sizes"])},')
        lines.append('  "keys": {')
        items = list(doc[size]["keys"].items())
        for j, (k, v) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            lines.append(f"   {json.dumps(k)}: {json.dumps(v)}{comma}")
        lines.append("  }")
        lines.append(" }" + ("," if i == 0 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    return x


if (
    __name__ == "__main__"
):  # regenerate: PYTHONPATH=.venv-ref .venv/bin/python tests/reference/mm_reference.py
    import sys
    from pathlib import Path

    out = Path(__file__).resolve().parent / "fixtures" / "released_keys.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(dump_manifest(manifest_document()))
    print(f"wrote {out}", file=sys.stderr)

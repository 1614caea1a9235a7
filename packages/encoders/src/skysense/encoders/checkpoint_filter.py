"""Map the released SkySense checkpoints' keys onto this project's module names.

The release (research licence; users bring the files) ships the HR Swin V2 under
``backbone_gep``, the two ViTs under ``backbone_s2`` / ``backbone_s1``, the temporal fusion
under ``fusion``, the DTPE as the parameter ``ctpe`` (1, 365, 2816), and heads under
``head_gep`` / ``head*``.

What the mapping rests on (no released file was available to this project):

- Checked by the reference test tier (tests/reference, `make reference`): every parameter and
  buffer name and shape of the release's modules, built from the OpenMMLab code it was trained
  with (mmpretrain 1.2.0 ``SwinTransformerV2``; mmseg's ``VisionTransformer`` /
  ``TransformerEncoderLayer`` names rebuilt from mmcv-lite's ``MultiheadAttention`` and
  ``FFN`` bricks, mmseg itself needing the compiled ``mmcv.ops``), is committed as
  tests/reference/fixtures/released_keys.json; the paper-size model takes all of it strictly;
  random weights under those names give this project's modules the reference outputs in
  float64 (every Swin stage, every ViT tap, the grid head, a fusion layer with ``ctpe``).
  Patch merging's 4C order (``nn.Unfold``: channel-major (c, row, col)) is permuted here to
  (row, col, c); relative-position tables and indices (recomputed here) are dropped.
- Read from the released SkySense++ code (names only): the fusion's ``porj_linear`` (sic),
  ``cls_token`` and mmseg layers without a final norm, LayerNorm eps 1e-5; ``ctpe`` (1, 365,
  2816); the grid heads ``head_s2``/``head_s1`` as ``decoder.0`` (Conv2d) + PixelShuffle; ViTs
  run with ``with_cls_token=False`` and without ``final_norm`` (the ``release`` fields of
  ``skysense convert``).
- Inferred: that the CVPR release uses these names under the prefixes above (``backbone_gep``
  for HR; SkySense++ calls it ``backbone_hr``, accepted too); its ViTs' position grid (any
  square grid is resized); that ``ctpe`` is the DTPE of every token (the paper) rather than
  of S2 only (SkySense++): the mapping is the same, the config's ``dtpe_mode`` decides.
  ``head_gep`` and other ``head*`` keys (pre-training heads) have no counterpart in the
  encoder and are reported as unexpected.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from skysense.kernels.modalities import SERIES

log = logging.getLogger(__name__)

# (released prefix, our module) pairs; the rules for the part after the prefix follow.
PREFIXES = (
    ("backbone_gep.", "hr_encoder.", "swin"),
    ("backbone_hr.", "hr_encoder.", "swin"),
    ("backbone_s2.", "s2_encoder.", "vit"),
    ("backbone_s1.", "s1_encoder.", "vit"),
    ("fusion.", "fusion.", "fusion"),
    ("head_s2.decoder.0.", "grid_s2.proj.", "head"),
    ("head_s1.decoder.0.", "grid_s1.proj.", "head"),
)
OURS = ("hr_encoder.", "s2_encoder.", "s1_encoder.", "grid_s2.", "grid_s1.", "geo_context.")
_OUR_FUSION = ("blocks.", "proj.", "dtpe.", "extra_token", "norm.")

_DROP = re.compile(r"attn\.w_msa\.(relative_coords_table|relative_position_index)$")
_DROP_NAMES = "relative_coords_table, relative_position_index"
_BLOCK = [
    (r"^layers\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^layers\.(\d+)\.attn\.attn\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^layers\.(\d+)\.attn\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.ffn\.layers\.0\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.ffn\.layers\.1\.", r"blocks.\1.mlp.fc2."),
]
RULES: dict[str, list[tuple[str, str]]] = {
    "swin": [
        (r"^patch_embed\.projection\.", "patch_embed.proj."),
        (r"^patch_embed\.norm\.", "patch_embed.norm."),
        (
            r"^stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$",
            r"stages.\1.downsample.\2",
        ),
        (
            r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\."
            r"(qkv\.weight|q_bias|v_bias|logit_scale|cpb_mlp\.0\.weight|cpb_mlp\.0\.bias"
            r"|cpb_mlp\.2\.weight|proj\.weight|proj\.bias)$",
            r"stages.\1.blocks.\2.attn.\3",
        ),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.(norm[123])\.", r"stages.\1.blocks.\2.\3."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.", r"stages.\1.blocks.\2.mlp.fc2."),
        (r"^norm(\d+)\.", r"out_norms.\1."),
    ],
    "vit": [
        (r"^patch_embed\.projection\.", "patch_embed."),
        (r"^cls_token$", "cls_token"),
        (r"^pos_embed$", "pos_embed"),
        *_BLOCK,
        (r"^ln1\.", "norm."),
    ],
    "fusion": [
        (r"^porj_linear\.", "proj."),
        (r"^cls_token$", "extra_token"),
        *_BLOCK,
    ],
    "head": [(r"^(weight|bias)$", r"\1")],
}


# This project's name -> the release's (for messages: a missing key is named both ways). The
# reference tier checks that RULES map every released key back onto these names.
_VIT_BACK = [
    (r"blocks\.(\d+)\.norm([12])\.", r"layers.\1.ln\2."),
    (r"blocks\.(\d+)\.attn\.qkv\.weight$", r"layers.\1.attn.attn.in_proj_weight"),
    (r"blocks\.(\d+)\.attn\.qkv\.bias$", r"layers.\1.attn.attn.in_proj_bias"),
    (r"blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attn.attn.out_proj."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"layers.\1.ffn.layers.0.0."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"layers.\1.ffn.layers.1."),
]


def _shift(repl: str) -> str:
    """Group references one up (the s1/s2 variants capture the modality first)."""
    return re.sub(r"\\(\d)", lambda m: "\\" + str(int(m.group(1)) + 1), repl)


_BACK = [
    (r"^hr_encoder\.patch_embed\.proj\.", "backbone_gep.patch_embed.projection."),
    (r"^hr_encoder\.(stages\.\d+\.blocks\.\d+)\.attn\.", r"backbone_gep.\1.attn.w_msa."),
    (r"^hr_encoder\.(stages\.\d+\.blocks\.\d+)\.mlp\.fc1\.", r"backbone_gep.\1.ffn.layers.0.0."),
    (r"^hr_encoder\.(stages\.\d+\.blocks\.\d+)\.mlp\.fc2\.", r"backbone_gep.\1.ffn.layers.1."),
    (r"^hr_encoder\.out_norms\.(\d+)\.", r"backbone_gep.norm\1."),
    (r"^hr_encoder\.", "backbone_gep."),
    (r"^(s[12])_encoder\.patch_embed\.", r"backbone_\1.patch_embed.projection."),
    (r"^(s[12])_encoder\.norm\.", r"backbone_\1.ln1."),
    *[(r"^(s[12])_encoder\." + a, r"backbone_\1." + _shift(b)) for a, b in _VIT_BACK],
    (r"^(s[12])_encoder\.", r"backbone_\1."),
    (r"^grid_(s[12])\.proj\.", r"head_\1.decoder.0."),
    (r"^fusion\.proj\.", "fusion.porj_linear."),
    (r"^fusion\.extra_token$", "fusion.cls_token"),
    (r"^fusion\.dtpe\.table$", "ctpe"),
    *[(r"^fusion\." + a, "fusion." + b) for a, b in _VIT_BACK],
]


def release_name(key: str) -> str | None:
    """The release's name of one of this project's keys (None where the release has none)."""
    for pattern, repl in _BACK:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def _rename(rest: str, kind: str) -> str | None:
    for pattern, repl in RULES[kind]:
        new, n = re.subn(pattern, repl, rest)
        if n:
            return new
    return None


def unfold_to_channels_last(weight: torch.Tensor) -> torch.Tensor:
    """Patch-merging reduction (out, 4 C): columns in ``nn.Unfold`` order (c, row, col) ->
    (row, col, c), the order of :class:`~skysense.encoders.swin_v2.PatchMerging`."""
    out, four_c = weight.shape
    return weight.reshape(out, four_c // 4, 4).transpose(1, 2).reshape(out, four_c)


def map_released_keys(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename released keys. Returns (mapped state dict, unmapped keys, dropped keys).

    Keys already in this project's naming pass through; ``ctpe`` (1, days, C) becomes
    ``fusion.dtpe.table`` (days, C); recomputed buffers are dropped.
    """
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key == "ctpe":
            mapped["fusion.dtpe.table"] = value.reshape(value.shape[-2], value.shape[-1])
            continue
        if _DROP.search(key):
            dropped.append(key)
            continue
        new, released = None, False
        for prefix, ours, kind in PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                renamed = _rename(rest, kind)
                if renamed is not None:
                    new, released = ours + renamed, True
                elif kind == "fusion" and rest.startswith(_OUR_FUSION):
                    new = key  # already this project's name
                break
        else:
            if key.startswith(OURS):
                new = key
        if new is None:
            unmapped.append(key)
        elif released and kind == "swin" and new.endswith("downsample.reduction.weight"):
            mapped[new] = unfold_to_channels_last(value)
        else:
            mapped[new] = value
    return mapped, unmapped, dropped


def unwrap_state_dict(obj: Mapping) -> dict:
    """``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and a DDP ``module.`` prefix off."""
    for wrapper in ("state_dict", "model"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    return {k.removeprefix("module."): v for k, v in obj.items()}


def checkpoint_filter_fn(state_dict: Mapping, model: torch.nn.Module | None = None) -> dict:
    """A released SkySense state dict -> this project's names (timm's habit).

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and a DDP ``module.`` prefix, renames
    (see the module docstring for what is checked and what inferred), logs the keys it could
    not map, and, given ``model``, fits the ViTs' position embeddings to it: the class token's
    row and ``cls_token`` are dropped when the model's ViT has no class token (the release's
    mmseg ViT always stores both; SkySense++ runs it with ``with_cls_token=False``), and the
    grid is resized to the model's (bicubic, as at run time). For a strict, reported load use
    :func:`match_to_model`; otherwise load the result with ``strict=False`` and read its
    missing keys (the prototypes, and anything the release lacks).
    """
    mapped, unmapped, dropped = map_released_keys(unwrap_state_dict(state_dict))
    if unmapped:
        log.warning("checkpoint_filter_fn: %d key(s) not mapped: %s", len(unmapped), unmapped)
    if dropped:
        log.info("checkpoint_filter_fn: dropped %d recomputed buffer(s)", len(dropped))
    if model is not None:
        _fit_vits(mapped, model, [])
    return mapped


def _fit_vits(mapped: dict, model: torch.nn.Module, notes: list[str]) -> None:
    for m in SERIES:
        key = f"{m}_encoder.pos_embed"
        enc = getattr(model, f"{m}_encoder", None)
        if key not in mapped or enc is None:
            continue
        pos = mapped[key]
        if enc.num_prefix == 0 and f"{m}_encoder.cls_token" in mapped:
            del mapped[f"{m}_encoder.cls_token"]
            pos = pos[:, 1:]  # the class token's row: mmseg stores it whether used or not
            notes.append(f"{m}_encoder.cls_token (the model's ViT has no class token)")
        if tuple(pos.shape) != tuple(enc.pos_embed.shape):
            pos = _resize_pos_embed(pos, enc.num_prefix, enc.grid)
            notes.append(f"{key} resized to the {enc.grid} x {enc.grid} grid")
        mapped[key] = pos


def _resize_pos_embed(pos: torch.Tensor, num_prefix: int, grid: int) -> torch.Tensor:
    """(1, num_prefix + g * g, C) -> (1, num_prefix + grid * grid, C), bicubic on the grid."""
    prefix, rest = pos[:, :num_prefix], pos[:, num_prefix:]
    old = int(round(rest.shape[1] ** 0.5))
    if old * old != rest.shape[1]:
        raise ValueError(f"pos_embed {tuple(pos.shape)}: the patch grid is not square")
    dtype = pos.dtype if pos.dtype == torch.float64 else torch.float32
    rest = rest.reshape(1, old, old, -1).permute(0, 3, 1, 2).to(dtype)
    rest = F.interpolate(rest, size=(grid, grid), mode="bicubic", align_corners=False)
    rest = rest.flatten(2).transpose(1, 2).to(pos.dtype)
    return torch.cat([prefix, rest], dim=1)


# Top-level modules of SkySense, each loaded whole or not at all ("parts"): a release may hold
# some of them (the three backbone files, say); a part it touches must be complete.
PARTS = ("hr_encoder", "s2_encoder", "s1_encoder", "grid_s2", "grid_s1", "fusion", "geo_context")
# Pre-training state that no release holds (the GCPL prototypes, updated by EMA).
NOT_RELEASED = ("geo_context.prototypes",)


@dataclass
class MatchReport:
    """How a state dict fits a model (:func:`match_to_model`).

    ``missing``: model keys of a part the source touches but does not complete;
    ``unexpected``: source keys with no place in the model (or no mapping);
    ``shape``: keys whose shapes differ ("key: source (..) vs model (..)");
    ``absent``: parts the source holds nothing of (they keep their initialisation);
    ``skipped``: source keys of parts the model was built without (``modalities``);
    ``dropped``: recomputed buffers (counted) and other documented drops and resizes.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mis-shaped."""
        return not (self.missing or self.unexpected or self.shape)

    def rows(self) -> list[tuple[str, str]]:
        """(kind, key) for every reported key, errors first."""
        out = []
        for kind in ("missing", "unexpected", "shape", "absent", "skipped", "dropped"):
            out += [(kind, k) for k in getattr(self, kind)]
        return out

    def table(self) -> str:
        """The report as an aligned two-column table (kind, key)."""
        rows = self.rows()
        if not rows:
            return "every key matched"
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{kind:<{w}}  {key}" for kind, key in rows)

    def error(self, source: str, limit: int = 20) -> str:
        """One line naming ``source`` and the offending keys (the first ``limit`` of a kind)."""
        parts = []
        for kind in ("missing", "unexpected", "shape"):
            keys = getattr(self, kind)
            if kind == "missing":
                keys = [f"{k} (release: {release_name(k)})" if release_name(k) else k for k in keys]
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{len(keys)} {kind}: " + ", ".join(keys[:limit]) + more)
        return f"{source} does not match the model: " + "; ".join(parts)


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def match_to_model(
    state_dict: Mapping, model: torch.nn.Module
) -> tuple[dict[str, torch.Tensor], MatchReport]:
    """Map a state dict (the release's names, this project's, or a mix) onto ``model`` and
    report, part by part, what does not fit.

    ``model`` may live on the meta device (only its keys, shapes and ViT geometry are read).
    Returns (state dict in the model's names, report); load it with ``strict=False`` after
    checking ``report.ok`` (the absent parts and :data:`NOT_RELEASED` are then the only keys
    the load leaves alone).
    """
    mapped, unmapped, dropped = map_released_keys(unwrap_state_dict(state_dict))
    notes: list[str] = []
    _fit_vits(mapped, model, notes)
    own = model.state_dict()
    built = {_part(k) for k in own}
    buffers = [f"{len(dropped)} Swin V2 buffers recomputed here ({_DROP_NAMES})"] if dropped else []
    report = MatchReport(unexpected=sorted(unmapped), dropped=buffers + notes)
    present = set()
    for k in list(mapped):
        part = _part(k)
        if k in own:
            present.add(part)
            if tuple(mapped[k].shape) != tuple(own[k].shape):
                report.shape.append(
                    f"{k}: source {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
                )
        elif part in PARTS and part not in built:
            report.skipped.append(k)
            del mapped[k]
        else:
            report.unexpected.append(k)
    report.unexpected.sort()
    report.missing = sorted(
        k for k in own if _part(k) in present and k not in mapped and k not in NOT_RELEASED
    )
    report.absent = [p for p in PARTS if p in built and p not in present and p != "geo_context"]
    return mapped, report


def to_release(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's SkySense state dict -> the release's names and layouts (the inverse of
    :func:`map_released_keys` on every key the release has): patch-merging columns back to
    ``nn.Unfold`` order, the DTPE table as ``ctpe`` (1, days, C). Keys the release has no
    name for (the prototypes) are left out. The ViTs' class token stays as it is: a model
    built without one gives a release without ``cls_token``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        name = release_name(k)
        if name is None:
            continue
        if name == "ctpe":
            v = v[None]
        elif k.startswith("hr_encoder.") and k.endswith("downsample.reduction.weight"):
            o, four_c = v.shape
            v = v.reshape(o, 4, four_c // 4).transpose(1, 2).reshape(o, four_c)
        out[name] = v
    return out

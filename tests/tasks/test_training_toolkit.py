"""The training toolkit that pre-training and fine-tuning share: parameter groups (no-decay rule,
layer-decay depth rule), the lr scaling rule, the warm-up + cosine schedule, device / seed /
threads. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from skysense.tasks.errors import ConfigError
from skysense.tasks.training.optim import (
    build_optimizer,
    encoder_depths,
    is_no_decay,
    param_groups,
    scaled_lr,
    set_lr_wd,
)
from skysense.tasks.training.runtime import resolve_device, seed_everything, set_threads
from skysense.tasks.training.schedules import cosine, warmup_cosine

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


# ----------------------------------------------------------------------------- schedules


def test_warmup_cosine_at_given_steps():
    # total 100, warm-up 10: the lr climbs by peak / 10 per step to the peak at step 9, then
    # a cosine over the remaining 90 steps: lr = final + (peak - final) / 2 (1 + cos(pi t / 90)).
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(4, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)  # t = 45/90, cos = 0
    assert warmup_cosine(40, 100, 10, 1.0, 0.1) == pytest.approx(0.775)  # t = 1/3: 0.1 + .45 * 1.5
    assert warmup_cosine(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(150, 100, 10, 1.0, 0.1) == pytest.approx(0.1)  # clamped after the end
    # No warm-up: the cosine starts at the peak on step 0.
    assert warmup_cosine(0, 100, 0, 2.0, 0.0) == pytest.approx(2.0)
    assert warmup_cosine(50, 100, 0, 2.0, 0.0) == pytest.approx(1.0)
    # Warm-up as long as the run: the cosine part has one step.
    assert warmup_cosine(3, 4, 4, 1.0, 0.0) == pytest.approx(1.0)


def test_cosine_interpolates_and_clamps():
    assert cosine(0, 10, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine(5, 10, 0.99, 1.0) == pytest.approx(0.995)  # cos(pi / 2) = 0: the mid-point
    assert cosine(10, 10, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine(20, 10, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine(3, 0, 0.04, 0.2) == 0.2  # an empty schedule is at its end


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2, 2))

    def forward(self, batch):
        return (batch["x"] @ self.w).sum()


def test_finetune_trainer_follows_the_shared_schedule():
    """The fine-tuning loop's lr per step is warmup_cosine's, times each group's scale."""
    from skysense.tasks.downstream.trainer import train

    model = _Scale()
    opt = torch.optim.AdamW([{"params": [model.w], "lr_scale": 0.5, "wd_scale": 1.0}], lr=1.0)
    batches = [{"x": torch.ones(1, 2)} for _ in range(4)]
    seen = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    hist = train(model, lambda out, b: out, "classification", batches, opt, 4, 1.0, 0.0, 2)
    # Warm-up 2: 0.5, 1.0; then a cosine over 2 steps: t = 0 -> 1.0, t = 1/2 -> 0.5.
    assert [h["lr"] for h in hist] == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert seen == pytest.approx([0.25, 0.5, 0.5, 0.25])


# ---------------------------------------------------------------------- parameter groups


class _Attn(nn.Module):
    """Swin-V2 attention's parameters: qkv, a learned temperature and the position-bias MLP."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.logit_scale = nn.Parameter(torch.ones(1, 1, 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1, bias=False))


class _SwinBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(4)
        self.attn = _Attn()


class _Stage(nn.Module):
    def __init__(self, downsample: bool):
        super().__init__()
        self.downsample = nn.Linear(16, 4) if downsample else None
        self.blocks = nn.ModuleList([_SwinBlock()])


class _Swin(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.stages = nn.ModuleList([_Stage(False), _Stage(True)])
        self.norm = nn.LayerNorm(4)


class _ViT(nn.Module):
    def __init__(self, depth: int, token: str = "cls_token"):
        super().__init__()
        setattr(self, token, nn.Parameter(torch.zeros(1, 1, 4)))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.patch_embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(4)


class _Fusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.extra_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.dtpe = nn.Module()
        self.dtpe.table = nn.Parameter(torch.zeros(366, 4))
        self.proj = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(4)


class _Encoder(nn.Module):
    """SkySense's layout in miniature: an HR Swin and an S2 ViT side by side, the S2 grid
    alignment, then the fusion encoder on their tokens."""

    def __init__(self):
        super().__init__()
        self.hr_encoder = _Swin()
        self.s2_encoder = _ViT(2)
        self.grid_s2 = nn.Linear(4, 4)
        self.fusion = _Fusion()


class _TaskModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()
        self.head = nn.Linear(4, 3)


# Depths (worked out from the registration order, see encoder_depths):
#   hr_encoder: patch_embed 0, stages.0.blocks.0 1, stages.1 (downsample) 2, stages.1.blocks.0 3,
#               norm 4 (the deepest spatial branch: 4)
#   s2_encoder: cls_token, pos_embed, patch_embed 0, blocks.0 1, blocks.1 2, norm 3
#   grid_s2:    5 (after the deepest spatial branch)
#   fusion:     extra_token, dtpe, proj 6, blocks.0 7, blocks.1 8, norm 9 = top
# lr scale = layer_decay ** (top + 1 - depth); the head (outside the encoder) 1.
DEPTH = {
    "hr_encoder.patch_embed.weight": 0,
    "hr_encoder.stages.0.blocks.0.attn.qkv.weight": 1,
    "hr_encoder.stages.0.blocks.0.attn.cpb_mlp.0.weight": 1,
    "hr_encoder.stages.1.downsample.weight": 2,
    "hr_encoder.stages.1.blocks.0.norm1.weight": 3,
    "hr_encoder.norm.weight": 4,
    "s2_encoder.cls_token": 0,
    "s2_encoder.patch_embed.weight": 0,
    "s2_encoder.blocks.0.0.weight": 1,
    "s2_encoder.blocks.1.0.weight": 2,
    "s2_encoder.norm.bias": 3,
    "grid_s2.weight": 5,
    "fusion.dtpe.table": 6,
    "fusion.proj.weight": 6,
    "fusion.blocks.0.0.weight": 7,
    "fusion.blocks.1.0.weight": 8,
    "fusion.norm.weight": 9,
}


def _by_param(groups):
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    return scale, wd


def test_encoder_depths_follow_the_forward_order():
    depth, top = encoder_depths(_Encoder())
    assert top == 9
    for name, d in DEPTH.items():
        assert depth[name] == d, name


def test_layer_decay_scales_by_depth_and_fusion_comes_after_the_spatial_encoders():
    m = _TaskModel()
    groups = param_groups(m, weight_decay=0.05, layer_decay=0.5)
    scale, _ = _by_param(groups)
    params = dict(m.encoder.named_parameters())
    for name, d in DEPTH.items():
        assert scale[id(params[name])] == pytest.approx(0.5 ** (10 - d)), name
    assert scale[id(m.head.weight)] == 1.0 and scale[id(m.head.bias)] == 1.0
    # Every fusion block trains faster than every spatial block (its input is their output).
    spatial = [scale[id(p)] for n, p in params.items() if n.split(".")[0].endswith("_encoder")]
    fusion_blocks = [scale[id(p)] for n, p in params.items() if n.startswith("fusion.blocks")]
    assert min(fusion_blocks) > max(spatial)
    # The two spatial encoders run side by side: their first blocks share a depth.
    hr0 = m.encoder.hr_encoder.stages[0].blocks[0].attn.qkv.weight
    assert scale[id(hr0)] == scale[id(m.encoder.s2_encoder.blocks[0][0].weight)]
    # Groups come by increasing lr scale and hold every trainable parameter once.
    assert [g["lr_scale"] for g in groups] == sorted(g["lr_scale"] for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))


def test_no_decay_rule():
    m = _TaskModel()
    groups = param_groups(m, weight_decay=0.05)
    assert {g["lr_scale"] for g in groups} == {1.0}  # layer decay off
    _, wd = _by_param(groups)
    enc = m.encoder
    attn = enc.hr_encoder.stages[0].blocks[0].attn
    no_decay = [
        attn.cpb_mlp[0].weight,  # Swin-V2's position-bias MLP, 2-d, not decayed (Swin-V2/timm)
        attn.cpb_mlp[0].bias,
        attn.cpb_mlp[2].weight,
        attn.logit_scale,  # learned temperature
        attn.qkv.bias,  # biases
        enc.hr_encoder.stages[0].blocks[0].norm1.weight,  # norms
        enc.hr_encoder.patch_embed.bias,
        enc.s2_encoder.cls_token,  # tokens and tables
        enc.s2_encoder.pos_embed,
        enc.fusion.extra_token,
        enc.fusion.dtpe.table,
        m.head.bias,
    ]
    decay = [
        attn.qkv.weight,
        enc.hr_encoder.patch_embed.weight,
        enc.hr_encoder.stages[1].downsample.weight,
        enc.s2_encoder.blocks[0][0].weight,
        enc.grid_s2.weight,
        enc.fusion.proj.weight,
        enc.fusion.blocks[1][0].weight,
        m.head.weight,
    ]
    assert [wd[id(p)] for p in no_decay] == [0.0] * len(no_decay)
    assert [wd[id(p)] for p in decay] == [0.05] * len(decay)
    assert {g["wd_scale"] for g in groups} == {0.0, 1.0}
    assert is_no_decay("loss.heads.hr.prototypes", torch.zeros(8, 4))
    assert not is_no_decay("loss.heads.hr.mlp.0.weight", torch.zeros(8, 4))


def test_frozen_parameters_are_left_out():
    m = _TaskModel()
    m.encoder.requires_grad_(False)
    groups = param_groups(m, 0.05, layer_decay=0.9)
    assert sum(len(g["params"]) for g in groups) == 2  # the head's weight and bias


def test_layer_decay_without_an_encoder_is_an_error():
    with pytest.raises(ValueError, match="named 'encoder'"):
        param_groups(nn.Sequential(nn.Linear(2, 2)), 0.05, layer_decay=0.9)
    assert len(param_groups(nn.Sequential(nn.Linear(2, 2)), 0.05)) == 2  # no decay: fine


def test_real_encoder_cpb_mlp_and_fusion_depth():
    """The tiny SkySense preset: Swin-V2's cpb_mlp takes no decay, and the fusion encoder's
    blocks lie deeper than every block of the HR Swin and the S2/S1 ViTs."""
    from skysense.encoders import build_skysense

    m = nn.Module()
    m.encoder = build_skysense("tiny")
    m.head = nn.Linear(4, 2)
    groups = param_groups(m, 0.05, layer_decay=0.9)
    scale, wd = _by_param(groups)
    named = dict(m.named_parameters())
    cpb = [p for n, p in named.items() if "cpb_mlp" in n and p.ndim == 2]
    assert cpb and all(wd[id(p)] == 0.0 for p in cpb)
    fusion = [scale[id(p)] for n, p in named.items() if n.startswith("encoder.fusion.blocks.")]
    spatial = [
        scale[id(p)]
        for n, p in named.items()
        if n.startswith(("encoder.hr_encoder.", "encoder.s2_encoder.", "encoder.s1_encoder."))
    ]
    assert fusion and spatial and min(fusion) > max(spatial)


# ------------------------------------------------------------ optimizer, lr and wd per step


def test_build_optimizer_and_set_lr_wd():
    m = _TaskModel()
    cfg = OmegaConf.create(
        {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.99], "layer_decay": 0.5}
    )
    opt = build_optimizer(m, cfg)
    assert opt.defaults["betas"] == (0.9, 0.99)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_scale"])
    # Fine-tuning: another lr and no layer decay (a frozen encoder); wd stays the config's.
    flat = build_optimizer(m, cfg, lr=2e-3, layer_decay=1.0)
    assert {g["lr"] for g in flat.param_groups} == {2e-3}
    set_lr_wd(opt, 0.1)
    assert all(g["lr"] == pytest.approx(0.1 * g["lr_scale"]) for g in opt.param_groups)
    assert all(g["weight_decay"] == pytest.approx(0.05 * g["wd_scale"]) for g in opt.param_groups)
    set_lr_wd(opt, 0.2, 0.3)  # pre-training's scheduled weight decay
    assert all(g["weight_decay"] == pytest.approx(0.3 * g["wd_scale"]) for g in opt.param_groups)


def test_scaled_lr():
    def o(**kw):
        return OmegaConf.create({"lr": 1e-3, **kw})

    assert scaled_lr(o(), 1024) == 1e-3  # none by default
    assert scaled_lr(o(lr_scaling="linear", ref_batch=256), 512) == pytest.approx(2e-3)
    assert scaled_lr(o(lr_scaling="linear"), 64) == pytest.approx(0.25e-3)  # ref_batch 256
    assert scaled_lr(o(lr_scaling="sqrt", ref_batch=256), 1024) == pytest.approx(2e-3)
    assert scaled_lr(o(lr_scaling="sqrt", ref_batch=100), 25) == pytest.approx(0.5e-3)
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        scaled_lr(o(lr_scaling="cube"), 8)
    with pytest.raises(ConfigError, match="optim.ref_batch"):
        scaled_lr(o(lr_scaling="linear", ref_batch=0), 8)


# ------------------------------------------------------------------ device, seed, threads


def test_resolve_device():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="trainer.device.*not a device"):
        resolve_device("abacus", "trainer.device")
    with pytest.raises(ConfigError, match="device.*only auto, cpu and cuda"):
        resolve_device("meta", "device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.device.*CUDA is not available"):
            resolve_device("cuda:0")


def test_seed_everything_repeats_every_stream():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))  # noqa: NPY002

    seed_everything(3)
    a = draws()
    seed_everything(3)
    assert draws() == a
    seed_everything(4)
    assert draws() != a


def test_set_threads():
    n = torch.get_num_threads()
    other = 1 if n != 1 else 2  # a value set_threads must actually set
    try:
        set_threads(None)  # None: torch's setting left as it is
        assert torch.get_num_threads() == n
        set_threads(other)
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(n)

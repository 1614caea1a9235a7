"""Parts of the pre-training loop: schedules, parameter groups, atomic checkpoints."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from skysense.tasks.training import checkpoint as ckpt
from skysense.tasks.training.optim import param_groups, relative_depths
from skysense.tasks.training.schedules import cosine, warmup_cosine

pytestmark = pytest.mark.unit


def test_schedules():
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    mid = warmup_cosine(55, 100, 10, 1.0, 0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert cosine(0, 10, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine(10, 10, 0.99, 1.0) == pytest.approx(1.0)


class Tower(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.patch_embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(n)
        )
        self.norm = nn.LayerNorm(4)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = Tower(3)
        self.fusion = Tower(1)
        self.head = nn.Linear(4, 2)


def test_relative_depths_and_layer_decay():
    m = Model()
    depth, n = relative_depths([k for k, _ in m.named_parameters()])
    assert n == 3
    assert depth["vit.patch_embed.weight"] == 0.0
    assert depth["vit.blocks.0.0.weight"] == pytest.approx(1 / 4)
    assert depth["vit.blocks.2.0.weight"] == pytest.approx(3 / 4)
    assert depth["fusion.blocks.0.0.weight"] == pytest.approx(1 / 2)
    assert depth["head.weight"] == 1.0
    groups = param_groups(m, weight_decay=0.1, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(m.head.weight)] == 1.0
    assert scale[id(m.vit.patch_embed.weight)] == pytest.approx(0.5**4)
    assert scale[id(m.vit.blocks[0][0].weight)] == pytest.approx(0.5**3)
    assert wd[id(m.vit.blocks[0][0].weight)] == 0.1
    assert wd[id(m.vit.blocks[0][0].bias)] == 0.0  # biases take no decay
    assert wd[id(m.vit.blocks[0][1].weight)] == 0.0  # nor norms
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_checkpoint_roundtrip_and_pruning(tmp_path):
    for step in (1, 2, 3):
        ckpt.save(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == [
        "step_0000002.pt",
        "step_0000003.pt",
    ]
    latest = ckpt.latest(tmp_path)
    assert latest.name == "step_0000003.pt"
    assert torch.equal(ckpt.load(latest)["w"], torch.full((3,), 3.0))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """A real process killed (SIGKILL) in the middle of writing a large checkpoint."""
    ckpt.save(tmp_path, 1, {"step": 1})
    script = textwrap.dedent(f"""
        import torch, sys
        from skysense.tasks.training import checkpoint as ckpt
        class Slow:
            def __reduce__(self):
                print("writing", flush=True)
                import time; time.sleep(30)
                return (int, (0,))
        ckpt.save({str(tmp_path)!r}, 2, {{"big": torch.zeros(1_000_000), "slow": Slow()}})
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert ckpt.latest(tmp_path).name == "step_0000001.pt"
    assert ckpt.load(ckpt.latest(tmp_path)) == {"step": 1}
    assert not (tmp_path / "step_0000002.pt").exists()
    ckpt.save(tmp_path, 3, {"step": 3})
    assert not list(tmp_path.glob(".*.tmp")), "the killed save's temporary file was not cleaned"

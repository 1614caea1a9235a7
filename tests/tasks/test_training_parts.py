"""Parts of the pre-training loop: atomic checkpoints (schedules and parameter groups: see
test_training_toolkit.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from skysense.tasks.training import checkpoint as ckpt

pytestmark = pytest.mark.unit


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

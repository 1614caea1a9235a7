"""The student/teacher meta-architecture of SkySense pre-training (the one place where they are
wired; the losses only compute).

- ``Student``: the SkySense encoder plus the loss module, which owns the student projection heads
  and the teacher centres. Its forward runs the encoder on both views and returns the loss; it is
  the module DDP/FSDP wraps.
- ``Teacher``: an exponential moving average of the student's encoder and heads, never trained
  by gradients.
- The geo-context prototypes (``encoder.geo_context.prototypes``) are updated by GCPL's EMA after
  each optimizer step from the teacher's F_fus, then copied to the teacher, so both towers read
  the same bank.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Student(nn.Module):
    def __init__(self, encoder: nn.Module, loss: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    def forward(
        self,
        views: list[dict],
        teacher_outs: list[dict],
        teacher_heads: nn.Module,
        step: int | None = None,
    ):
        """The loss of the student on ``views`` against the teacher's outputs; ``step`` (the
        optimizer step) drives the teacher-temperature warm-up."""
        outs = [self.encoder(v) for v in views]
        return self.loss(
            student=outs, teacher=teacher_outs, views=views, teacher_heads=teacher_heads, step=step
        )


class Teacher(nn.Module):
    """EMA copy of the student's encoder and heads (parameters frozen), always in eval mode:
    no stochastic depth nor dropout on the teacher side (DINO's teacher has none), so its
    targets are a deterministic function of its weights and the views."""

    def __init__(self, student: Student):
        super().__init__()
        self.encoder = copy.deepcopy(student.encoder)
        self.heads = copy.deepcopy(student.loss.heads)
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, views: list[dict]) -> list[dict]:
        return [self.encoder(v) for v in views]


def _pairs(student: Student, teacher: Teacher):
    s = dict(student.encoder.named_parameters())
    s.update({f"heads.{k}": v for k, v in student.loss.heads.named_parameters()})
    t = dict(teacher.encoder.named_parameters())
    t.update({f"heads.{k}": v for k, v in teacher.heads.named_parameters()})
    names = sorted(set(s) & set(t))
    if len(names) != len(t):
        missing = sorted(set(t) - set(s))[:5]
        raise RuntimeError(f"teacher parameters without a student counterpart: {missing}")
    return [t[n] for n in names], [s[n] for n in names]


@torch.no_grad()
def ema_update(teacher: Teacher, student: Student, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over encoder and heads."""
    t, s = _pairs(student, teacher)
    t_local = [getattr(p, "_local_tensor", p) for p in t]
    s_local = [getattr(p, "_local_tensor", p).detach() for p in s]
    torch._foreach_lerp_(t_local, s_local, 1.0 - momentum)

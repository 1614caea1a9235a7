"""The student/teacher meta-architecture of SkySense pre-training (DINOv2's SSLMetaArch shape):
the one place where the two towers, their heads and every schedule are wired; the losses only
compute (``skysense.losses.SkySenseLoss``).

- ``Student``: the SkySense encoder plus the loss module, which owns the student projection heads
  and the teacher centres. Its forward runs the encoder on the views and returns the loss; it is
  the module DDP/FSDP wraps (so it also gives DDP its idle parameters, see ``forward``).
- ``Teacher``: an exponential moving average of the student's encoder and heads, never trained
  by gradients.
- ``StepAccumulator``: the loss protocol of one optimizer step over its micro-batches (and
  processes): MGCL rows normalised over all of them, the teacher centres moved once.
- ``MetaArch``: both towers, the optimizer and one optimizer step with its schedules (lr, weight
  decay, teacher momentum, teacher temperature), gradient accumulation, clipping, the teacher EMA
  and the GCPL prototype update: the geo-context prototypes (``encoder.geo_context.prototypes``)
  move by GCPL's EMA after each optimizer step from the teacher's F_fus, then are copied to the
  teacher, so both towers read the same bank.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn

from skysense.losses import SkySenseLoss, SkySenseLossOutput
from skysense.tasks.training import dist as D
from skysense.tasks.training.optim import build_optimizer, scaled_lr, set_lr_wd
from skysense.tasks.training.schedules import cosine, warmup_cosine

# The fields of the ``loss`` config group that are the meta-architecture's (the teacher
# temperature's warm-up); every other field is a keyword argument of SkySenseLoss.
TEACHER_SCHEDULE_FIELDS = ("warmup_teacher_temp", "warmup_teacher_temp_steps")


def _world() -> int:
    """Processes in the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def teacher_temperature(
    step: int | None, final: float, warmup_start: float, warmup_steps: int
) -> float:
    """The teacher temperature at optimizer step ``step``: linear from ``warmup_start`` to
    ``final`` over ``warmup_steps`` steps, ``final`` afterwards (and when ``step`` is None)."""
    if step is None or warmup_steps <= 0 or step >= warmup_steps:
        return float(final)
    return float(warmup_start + (final - warmup_start) * max(step, 0) / warmup_steps)


def loss_config_fields() -> set[str]:
    """The fields the ``loss`` config group may hold."""
    return SkySenseLoss.config_fields() | set(TEACHER_SCHEDULE_FIELDS)


def build_loss(loss_cfg: Mapping, encoder: nn.Module) -> tuple[SkySenseLoss, dict]:
    """SkySenseLoss for ``encoder`` (C_g and D_f from its config) from the ``loss`` config group,
    and the teacher-temperature schedule's fields (``TEACHER_SCHEDULE_FIELDS``, defaults
    DINOv2's: 0.04 over 30 epochs of 1250 steps)."""
    if isinstance(loss_cfg, DictConfig):
        loss_cfg = OmegaConf.to_container(loss_cfg, resolve=True)
    cfg = dict(loss_cfg)
    schedule = {"warmup_teacher_temp": 0.04, "warmup_teacher_temp_steps": 37500}
    schedule.update({k: cfg.pop(k) for k in TEACHER_SCHEDULE_FIELDS if k in cfg})
    loss = SkySenseLoss.from_config(cfg, encoder.cfg.grid_dim, encoder.cfg.fusion_dim)
    return loss, schedule


class Student(nn.Module):
    def __init__(self, encoder: nn.Module, loss: SkySenseLoss):
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    def forward(
        self,
        views: list[dict],
        teacher_outs: list[dict],
        teacher_heads: nn.Module,
        teacher_temp: float,
        row_norm: Mapping[str, float] | None = None,
    ) -> SkySenseLossOutput:
        """The loss of the student on ``views`` against the teacher's outputs (see
        :meth:`SkySenseLoss.forward`).

        Distributed, DDP expects a gradient for every parameter on every process: a head or
        projection whose modality is absent from this process's batch gets an exact zero
        instead of none (the average over processes is then the right one)."""
        outs = [self.encoder(v) for v in views]
        out = self.loss(
            outs, teacher_outs, views, teacher_heads, teacher_temp=teacher_temp, row_norm=row_norm
        )
        idle = idle_parameters(self.loss, out) if _world() > 1 else []
        if idle:
            out.total = out.total + 0.0 * sum(p.sum() for p in idle)
        return out


def idle_parameters(loss: SkySenseLoss, out: SkySenseLossOutput) -> list[torch.Tensor]:
    """The trainable parameters of ``loss`` that no term of ``out`` used (the heads and CMA
    projections of the modalities absent from the batch)."""
    used = {f"heads.{k.split('/')[1]}." for k in out.terms if k.startswith("mgcl/")}
    used |= {f"cma.proj.{m}." for k in out.terms if k.startswith("cma/") for m in k[4:].split("-")}
    return [
        p
        for n, p in loss.named_parameters()
        if p.requires_grad and not any(n.startswith(u) for u in used)
    ]


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


class StepAccumulator:
    """The loss protocol of ONE optimizer step whose forward calls (micro-batches, and the
    processes whose gradients DDP/FSDP average) each backward ``total / n_calls``.

    - Every MGCL level is normalised by the rows of all the calls of all the processes
      (``row_norm``, passed to each forward): its term is the call's sum over rows divided by
      the mean rows per call, so the average over calls and processes is the mean over the
      whole batch, as one call on the whole batch gives. A lone call of one process keeps its
      own mean (``row_norm`` None).
    - The teacher centres move once, in :meth:`finish`, from the statistics of every call (one
      all-reduce), in training mode; nothing moves if the step is abandoned.

    CMA is not decomposable: each call's InfoNCE takes its negatives from that call's rows (and,
    with ``cma_gather``, the same call of the other processes).

    Args:
        loss: the loss module.
        teachers: for each call, the teacher's output of each view (only the keys the loss reads
            are needed: ``tokens_*``, ``valid_*``, ``fused``).
        views: for each call, its views.

    Distributed, one all-reduce here (when ``row_norm`` is needed) and one in :meth:`finish`,
    on every process; every process must make the same number of calls.
    """

    def __init__(
        self,
        loss: SkySenseLoss,
        teachers: Sequence[Sequence[Mapping[str, torch.Tensor]]],
        views: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    ):
        if len(teachers) != len(views) or not teachers:
            raise ValueError(
                f"StepAccumulator: {len(teachers)} teacher outputs for {len(views)} "
                "micro-batches of views (needs the same number, >= 1)"
            )
        self.loss = loss
        self.n_calls = len(teachers)
        self.row_norm: dict[str, float] | None = None
        self.rows_expected: int | None = None
        self.rows_seen = 0
        self._stats: dict[str, tuple[torch.Tensor, int]] = {}
        world = _world()
        if self.n_calls == 1 and world == 1:
            return
        names = loss.centering.names
        per_call = [loss.mgcl_row_counts(t, v) for t, v in zip(teachers, views)]
        rows = [float(sum(c[n] for c in per_call)) for n in names]
        self.rows_expected = int(sum(rows))
        device = loss.centering.center.device
        total = torch.tensor(rows, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(total)
        total = total.tolist()
        self.row_norm = {n: t / (world * self.n_calls) for n, t in zip(names, total) if t > 0}

    def add(self, out: SkySenseLossOutput) -> None:
        """Note one call's output (its rows and teacher-centre statistics)."""
        self.rows_seen += sum(out.rows.values())
        for name, (s, n) in out.stats.items():
            if self.n_calls > 1:  # summed in float64, as the centres' own statistics are
                s = s.detach().double()
            if name in self._stats:
                s0, n0 = self._stats[name]
                s, n = s0 + s, n0 + n
            self._stats[name] = (s, n)

    @torch.no_grad()
    def finish(self, teacher_heads: nn.ModuleDict) -> None:
        """End of the step: the centres move once (training mode), from every call's statistics
        and the teacher heads' prototypes; the rows run must be those announced."""
        if self.loss.training:

            def weight(name: str) -> torch.Tensor:
                return teacher_heads[name.split("/")[0]].prototype_weight().detach()

            self.loss.centering.update(self._stats, weight)
        if self.rows_expected is not None and self.rows_seen != self.rows_expected:
            raise RuntimeError(
                f"StepAccumulator: the forward calls averaged over {self.rows_seen} MGCL rows, "
                f"the teacher outputs given hold {self.rows_expected}: give the teacher outputs "
                "of the same micro-batches"
            )


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return batch


def _loss_inputs(outputs: list[dict]) -> list[dict]:
    """The keys of the teacher's outputs that the loss and the GCPL update read (the taps and
    stages of every micro-batch need not be held through the step)."""
    keep = ("tokens_", "valid_")
    return [
        {k: v for k, v in o.items() if k.startswith(keep) or k in ("fused", "region")}
        for o in outputs
    ]


def split_micro(views: dict, n: int) -> list[list[dict]]:
    """Split a views batch {"view1": b, "view2": b} into ``n`` equal micro-batches (list of
    [view1, view2])."""
    out = []
    for i in range(n):
        pair = []
        for key in ("view1", "view2"):
            b = views[key]
            if n == 1:
                pair.append(b)
                continue
            size = next(v.shape[0] for v in b.values() if torch.is_tensor(v))
            chunk = size // n
            sl = slice(i * chunk, (i + 1) * chunk)
            pair.append({k: (v[sl] if torch.is_tensor(v) else v) for k, v in b.items()})
        out.append(pair)
    return out


class MetaArch:
    """Student, teacher, optimizer, every schedule and one optimizer step, built from the
    config (``optim``, ``trainer``, ``loss``).

    ``step(views, step)`` runs the teacher on every micro-batch, the student and the loss on
    each (under a :class:`StepAccumulator`), backward, clipping, the AdamW step with the
    scheduled lr and weight decay, the teacher EMA and the GCPL prototype update. The loop, the
    benchmarks and the tests share it. With ``trainer.grad_accum`` > 1 the step's MGCL terms,
    gradients and teacher-centre update are those of the whole batch (CMA's InfoNCE takes its
    negatives from each micro-batch).
    """

    def __init__(self, cfg: DictConfig, info: D.DistInfo, encoder: nn.Module):
        self.cfg, self.info = cfg, info
        self.tcfg, self.ocfg = cfg.trainer, cfg.optim
        device = info.device
        loss, self.teacher_schedule = build_loss(cfg.loss, encoder)
        self.student = Student(encoder.to(device), loss.to(device))
        self.teacher = Teacher(self.student).to(device)
        self.optimizer = build_optimizer(self.student, self.ocfg)
        self.peak_lr = scaled_lr(self.ocfg, self.tcfg.batch_size)
        use_bf16 = self.tcfg.precision == "bf16" or (
            self.tcfg.precision == "auto" and device.type == "cuda"
        )
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.wrapped = self.student

    def distribute(self) -> None:
        """Wrap for DDP/FSDP and compile, before any checkpoint is loaded (loading goes through
        the distributed state-dict API, which shards a full checkpoint as the wrapping says)."""
        self.wrapped = D.wrap(self.student, self.tcfg.strategy, self.info)
        if self.tcfg.strategy == "fsdp" and self.info.distributed:
            D.wrap(self.teacher, "fsdp", self.info)
            # fully_shard replaces every parameter with a sharded one: an optimizer built on
            # the old tensors would step on copies the model no longer reads.
            self.optimizer = build_optimizer(self.student, self.ocfg)
        if self.tcfg.compile:
            self.student.encoder.compile()
            self.teacher.encoder.compile()

    def autocast(self):
        """The precision context of the forward passes (bf16 autocast, or none)."""
        return torch.autocast(
            self.info.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def teacher_temp(self, step: int) -> float:
        """The teacher temperature at optimizer step ``step`` (warm-up, then the loss's)."""
        s = self.teacher_schedule
        return teacher_temperature(
            step,
            self.student.loss.teacher_temp,
            s["warmup_teacher_temp"],
            s["warmup_teacher_temp_steps"],
        )

    def schedules(self, step: int) -> tuple[float, float, float]:
        """(lr, weight decay, teacher momentum) at optimizer step ``step``."""
        t, o = self.tcfg, self.ocfg
        lr = warmup_cosine(step, t.max_steps, o.warmup_steps, self.peak_lr, o.min_lr)
        wd = cosine(step, t.max_steps, o.weight_decay, o.weight_decay_end)
        momentum = cosine(step, t.max_steps, t.teacher_momentum, 1.0)
        return lr, wd, momentum

    def step(self, views: dict, step: int) -> dict:
        """One optimizer step on a views batch (this process's share of the global batch)."""
        lr, wd, momentum = self.schedules(step)
        temp = self.teacher_temp(step)
        set_lr_wd(self.optimizer, lr, wd)
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.tcfg.grad_accum
        micros = split_micro(views, accum)
        # The teacher's outputs of every micro-batch first: the accumulator normalises each
        # MGCL level by the rows of the whole step.
        with self.autocast():
            teacher_all = [_loss_inputs(self.teacher(m)) for m in micros]
        acc = StepAccumulator(self.student.loss, teacher_all, micros)
        terms_acc: dict[str, float] = {}
        total_acc = 0.0
        fused = []
        for micro, teacher_outs in zip(micros, teacher_all):
            with self.autocast():
                out = self.wrapped(micro, teacher_outs, self.teacher.heads, temp, acc.row_norm)
            total, terms = out["total"], out["terms"]
            if not torch.isfinite(total.detach()):
                bad = [k for k, v in terms.items() if not math.isfinite(float(v))]
                raise FloatingPointError(
                    f"step {step + 1}: loss is {float(total.detach())}; terms that went "
                    f"bad: {bad or ['total']} (nothing was saved for this step)"
                )
            acc.add(out)
            (total / accum).backward()
            total_acc += float(total.detach()) / accum
            for k, v in terms.items():
                terms_acc[k] = terms_acc.get(k, 0.0) + float(v) / accum
            fused += [(o["fused"].float(), o["region"]) for o in teacher_outs if "fused" in o]
        with self.autocast():
            acc.finish(self.teacher.heads)
        gnorm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.ocfg.grad_clip)
        self.optimizer.step()
        D.reshard(self.teacher)  # FSDP: the EMA works on the shards
        ema_update(self.teacher, self.student, momentum)
        self.update_prototypes(fused)
        return {
            "loss": total_acc,
            "terms": terms_acc,
            "lr": lr,
            "wd": wd,
            "momentum": momentum,
            "teacher_temp": temp,
            "grad_norm": float(gnorm),
        }

    @torch.no_grad()
    def update_prototypes(self, fused: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """GCPL: EMA of the region prototypes towards the teacher's F_fus of this step (both
        views), accumulated across processes, then shared with the teacher."""
        geo = getattr(self.student.encoder, "geo_context", None)
        if geo is None or not fused:
            return
        f = torch.cat([x for x, _ in fused])
        r = torch.cat([r for _, r in fused])
        self.student.loss.gcpl.update(geo.prototypes, f, r)
        self.teacher.encoder.geo_context.prototypes.copy_(geo.prototypes)


__all__ = [
    "MetaArch",
    "Student",
    "Teacher",
    "StepAccumulator",
    "build_loss",
    "ema_update",
    "idle_parameters",
    "loss_config_fields",
    "teacher_temperature",
]

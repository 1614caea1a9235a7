"""The SkySense pre-training objective: MGCL + CMA, weighted, with every term by name; and the
GCPL prototype update the training loop calls after each optimizer step.

Wiring (done by the tasks package, not here): the student encoder and the teacher encoder (EMA)
each encode both views; the teacher heads are an EMA copy of ``SkySenseLoss.heads``::

    loss_fn = SkySenseLoss.from_config(cfg.loss, grid_dim=C_g, fusion_dim=D_f)
    teacher_heads = copy.deepcopy(loss_fn.heads).requires_grad_(False)
    out = loss_fn(
        student=[student(v1), student(v2)],
        teacher=[teacher(v1), teacher(v2)],   # under torch.no_grad()
        views=[v1, v2],
        teacher_heads=teacher_heads,
        step=step,
    )
    out.total.backward(); optimizer.step()
    ema_(teacher_heads, loss_fn.heads); ema_(teacher_encoder, student_encoder)
    loss_fn.gcpl.update(teacher.geo_context.prototypes,
                        torch.cat([t1["fused"], t2["fused"]]),
                        torch.cat([t1["region"], t2["region"]]), momentum)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from skysense.losses.cross_modal_alignment import CrossModalAlignment
from skysense.losses.dino_head import DINOHead
from skysense.losses.distributed import all_reduce_, is_distributed
from skysense.losses.features import FAMILIES, MODALITIES, family_features
from skysense.losses.gcpl import GeoContextPrototypeLearning
from skysense.losses.mgcl import LEVELS, MultiGranularityContrastiveLoss
from skysense.losses.teacher_centering import TeacherCentering, teacher_temperature

log = logging.getLogger(__name__)


@dataclass
class SkySenseLossOutput:
    """What :class:`SkySenseLoss` returns.

    Attributes:
        total: scalar with grad, ``mgcl * L_MGCL + cma * L_CMA``.
        terms: name -> detached scalar, for logging: "mgcl/<family>/<level>" (family in hr, s2,
            s1, fused; level in pixel, object, image), "cma/<a>-<b>", "mgcl" and "cma"
            (unweighted sums), "total". Terms of modalities absent from the batch are absent.
            Distributed or under ``accumulation``, each MGCL term is this call's share: the
            average over processes (and micro-batches) is the whole batch's term.
        teacher_temp: the teacher temperature used.
        rows: MGCL term name -> number of (student, teacher) rows it averaged over (the N of
            its (N, K) logits, which the fused kernel never stores).
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_temp: float = 0.0
    rows: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, key: str):
        return getattr(self, key)


@dataclass
class _Accumulation:
    """What ``SkySenseLoss.accumulation`` hands its forward calls."""

    row_norm: dict[str, float]  # logit set -> mean rows per call over calls and processes
    rows_seen: int = 0
    teacher_weight: Callable[[str], torch.Tensor] | None = None


class SkySenseLoss(nn.Module):
    """MGCL over hr, s2, s1 and F_fus at three granularities, plus CMA over modality pairs.

    Owns the student projection heads (``heads``: one :class:`DINOHead` per family), the CMA
    projections (``cma.proj``), and the teacher centres (buffers of ``centering``). The
    teacher heads are the caller's EMA copy of ``heads``.

    Args:
        grid_dim: C_g, width of ``tokens_*``.
        fusion_dim: D_f, width of ``fused``.
        mgcl: weight of L_MGCL in the total.
        cma: weight of L_CMA in the total.
        n_prototypes: K of every DINO head (65536 in DINO/DINOv2).
        head_hidden_dim, head_bottleneck_dim, head_n_layers: DINO head MLP (DINOv2: 2048, 256, 3).
        student_temp: student softmax temperature (DINOv2: 0.1).
        teacher_temp: teacher temperature after warm-up (DINOv2: 0.07).
        warmup_teacher_temp: teacher temperature at step 0 (DINOv2: 0.04).
        warmup_teacher_temp_steps: linear warm-up length in optimizer steps (DINOv2: 30 epochs
            of 1250 steps = 37500).
        center_momentum: EMA momentum of the teacher centres (DINOv2: 0.9).
        pixel_weight, object_weight, image_weight: weights of the three MGCL levels (the paper
            sums them: 1, 1, 1).
        n_clusters: N_C object centres per image (paper: not given; 8 is a choice).
        cluster_rounds: k-means rounds of the object clustering.
        sinkhorn_iters, sinkhorn_epsilon: Sinkhorn-Knopp of the object clustering.
        max_pixel_pairs: cap of pixel pairs per sample and direction (None: all).
        pixel_sampling: "nearest" or "bilinear" read-out of the teacher's pixel features.
        cma_dim: CMA projection width (None: no projection).
        cma_temperature: CMA InfoNCE temperature.
        cma_gather: gather CMA negatives across processes when distributed.
        gcpl_momentum, gcpl_sinkhorn_iters, gcpl_epsilon: the GCPL prototype update.
    """

    def __init__(
        self,
        grid_dim: int,
        fusion_dim: int,
        *,
        mgcl: float = 1.0,
        cma: float = 1.0,
        n_prototypes: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_n_layers: int = 3,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 37500,
        center_momentum: float = 0.9,
        pixel_weight: float = 1.0,
        object_weight: float = 1.0,
        image_weight: float = 1.0,
        n_clusters: int = 8,
        cluster_rounds: int = 3,
        sinkhorn_iters: int = 3,
        sinkhorn_epsilon: float = 0.05,
        max_pixel_pairs: int | None = None,
        pixel_sampling: str = "nearest",
        cma_dim: int | None = 256,
        cma_temperature: float = 0.1,
        cma_gather: bool = True,
        gcpl_momentum: float = 0.99,
        gcpl_sinkhorn_iters: int = 3,
        gcpl_epsilon: float = 0.05,
    ):
        super().__init__()
        self.weights = {"mgcl": float(mgcl), "cma": float(cma)}
        self.level_weights = {
            "pixel": float(pixel_weight),
            "object": float(object_weight),
            "image": float(image_weight),
        }
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.heads = nn.ModuleDict(
            {
                f: DINOHead(
                    fusion_dim if f == "fused" else grid_dim,
                    n_prototypes,
                    head_hidden_dim,
                    head_bottleneck_dim,
                    head_n_layers,
                )
                for f in FAMILIES
            }
        )
        self.centering = TeacherCentering(
            [f"{f}/{lvl}" for f in FAMILIES for lvl in LEVELS],
            n_prototypes,
            head_bottleneck_dim,
            center_momentum,
        )
        self.mgcl = MultiGranularityContrastiveLoss(
            n_clusters=n_clusters,
            cluster_rounds=cluster_rounds,
            sinkhorn_iters=sinkhorn_iters,
            sinkhorn_epsilon=sinkhorn_epsilon,
            max_pixel_pairs=max_pixel_pairs,
            pixel_sampling=pixel_sampling,
            student_temp=student_temp,
        )
        self.cma = CrossModalAlignment(
            grid_dim, proj_dim=cma_dim, temperature=cma_temperature, gather=cma_gather
        )
        self.gcpl = GeoContextPrototypeLearning(
            momentum=gcpl_momentum, sinkhorn_iters=gcpl_sinkhorn_iters, epsilon=gcpl_epsilon
        )
        # Training-mode forward calls so far (optimizer steps under ``accumulation``): the
        # warm-up clock when the caller gives no step (persistent, so a resumed run continues
        # its schedule).
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._accum: _Accumulation | None = None

    @classmethod
    def config_fields(cls) -> set[str]:
        """The fields the ``loss`` config group may hold (the keyword arguments)."""
        import inspect

        return set(inspect.signature(cls.__init__).parameters) - {"self", "grid_dim", "fusion_dim"}

    @classmethod
    def from_config(cls, cfg: Mapping, grid_dim: int, fusion_dim: int) -> SkySenseLoss:
        """Build from the ``loss`` config group (a mapping of the keyword arguments)."""
        known = cls.config_fields()
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"loss config: unknown field(s) {unknown}; SkySenseLoss takes {sorted(known)}"
            )
        return cls(grid_dim, fusion_dim, **dict(cfg))

    @classmethod
    def from_encoder(cls, encoder: nn.Module, **cfg) -> SkySenseLoss:
        """Build for ``encoder`` (read duck-typed, no import of skysense.encoders): C_g and D_f
        come from its ``grid_dim`` and ``fusion_dim`` attributes (or those of its ``config`` /
        ``cfg``); ``cfg`` is the ``loss`` config group."""
        dims = {}
        for name in ("grid_dim", "fusion_dim"):
            for src in (encoder, getattr(encoder, "config", None), getattr(encoder, "cfg", None)):
                if src is None:
                    continue
                val = src.get(name) if isinstance(src, Mapping) else getattr(src, name, None)
                if val is not None:
                    dims[name] = int(val)
                    break
            else:
                raise ValueError(
                    f"SkySenseLoss.from_encoder: {type(encoder).__name__} exposes no '{name}' "
                    f"(nor config.{name}); pass grid_dim and fusion_dim to SkySenseLoss.from_config"
                )
        return cls.from_config(cfg, dims["grid_dim"], dims["fusion_dim"])

    def teacher_temp_at(self, step: int | None) -> float:
        """Teacher temperature at optimizer step ``step`` (linear warm-up, then constant)."""
        return teacher_temperature(
            step, self.teacher_temp, self.warmup_teacher_temp, self.warmup_teacher_temp_steps
        )

    def forward(
        self,
        student: Sequence[Mapping[str, torch.Tensor]],
        teacher: Sequence[Mapping[str, torch.Tensor]],
        views: Sequence[Mapping[str, torch.Tensor]],
        teacher_heads: nn.ModuleDict | None = None,
        *,
        step: int | None = None,
        teacher_temp: float | None = None,
    ) -> SkySenseLossOutput:
        """The loss of one batch of views.

        Args:
            student: the student encoder's output dict for each view (V >= 2 views).
            teacher: the teacher encoder's output dict for each view (no grad needed).
            views: each view's batch; ``view_affine`` (B, 2, 3) and, for the series present,
                ``s2_index``/``s1_index`` (B, T) are read.
            teacher_heads: the EMA copy of ``heads``; None uses ``heads`` themselves as the
                teacher (no gradient flows through the teacher side either way).
            step: optimizer step, for the teacher-temperature warm-up (None: the number of
                training-mode calls so far, exact without gradient accumulation).
            teacher_temp: overrides the schedule.

        Any modality may be absent from the batch (its keys absent from every output): its terms
        are absent. In training mode the teacher centres are updated (one all-reduce when
        distributed, on every call, whatever the batch holds; deferred under
        :meth:`accumulation`).

        Distributed (more than one process), each MGCL level's mean over this process's rows
        is multiplied by n_local * world / n_global (one fixed-size all-reduce of the row
        counts of every level, on every call), so that the average over processes that
        DDP/FSDP apply to the gradients, and the logs to the terms, is the mean over the
        global batch's rows, whatever number of rows each process holds.
        """
        n_views = len(student)
        if n_views < 2 or len(teacher) != n_views or len(views) != n_views:
            raise ValueError(
                f"SkySenseLoss needs the same number (>= 2) of student outputs, teacher outputs "
                f"and views; got {len(student)}, {len(teacher)}, {len(views)}"
            )
        for i, v in enumerate(views):
            if "view_affine" not in v:
                raise ValueError(f"view {i + 1} lacks 'view_affine' (B, 2, 3)")
        t_heads = self.heads if teacher_heads is None else teacher_heads
        missing = [f for f in FAMILIES if f not in t_heads]
        if missing:
            raise ValueError(f"teacher_heads lacks the heads {missing}")
        if step is None:
            step = int(self.calls)
        tt = float(teacher_temp) if teacher_temp is not None else self.teacher_temp_at(step)
        affines = [v["view_affine"] for v in views]

        # Teacher prototype matrices (K, D) by family: computed once, used by the loss and by the
        # centre update (the kernel keeps them for its backward anyway).
        t_weights: dict[str, torch.Tensor] = {}

        def teacher_weight(fam: str) -> torch.Tensor:
            if fam not in t_weights:
                with torch.no_grad():
                    t_weights[fam] = t_heads[fam].prototype_weight().detach()
            return t_weights[fam]

        terms: dict[str, torch.Tensor] = {}
        mgcl_total = None
        mgcl_terms: dict[str, torch.Tensor] = {}
        stats: dict[str, tuple[torch.Tensor, int]] = {}
        for fam in FAMILIES:
            s_f = [
                family_features(o, v, fam, f"student view {i + 1}")
                for i, (o, v) in enumerate(zip(student, views))
            ]
            t_f = [
                family_features(o, v, fam, f"teacher view {i + 1}")
                for i, (o, v) in enumerate(zip(teacher, views))
            ]
            for i, (s, t) in enumerate(zip(s_f, t_f)):
                if (s is None) != (t is None):
                    side = "student" if s is None else "teacher"
                    raise ValueError(
                        f"view {i + 1}: the {side} output lacks the {fam} features the other has"
                    )
            if all(s is None for s in s_f):
                continue
            losses, fam_stats = self.mgcl(
                s_f,
                t_f,
                affines,
                self.heads[fam],
                t_heads[fam],
                # Copies: the centres are updated in place below, before the backward, and the
                # loss's backward may read the centre it was given.
                {lvl: self.centering.get(f"{fam}/{lvl}").clone() for lvl in LEVELS},
                tt,
                teacher_weight(fam),
            )
            mgcl_terms.update({f"{fam}/{lvl}": loss for lvl, loss in losses.items()})
            stats.update({f"{fam}/{lvl}": st for lvl, st in fam_stats.items()})

        # Each level is the mean over this call's rows; rescaled so that the average over the
        # calls whose gradients are averaged (DDP/FSDP processes, accumulated micro-batches)
        # is the mean over all their rows.
        scales = self._row_scales({name: n for name, (_, n) in stats.items()})
        for name, loss in mgcl_terms.items():
            if scales is not None:
                loss = loss * scales[name]
            terms[f"mgcl/{name}"] = loss
            weighted = self.level_weights[name.split("/")[1]] * loss
            mgcl_total = weighted if mgcl_total is None else mgcl_total + weighted

        cma_total = None
        for name, loss in self.cma(student, views).items():
            terms[f"cma/{name}"] = loss
            cma_total = loss if cma_total is None else cma_total + loss

        if self._accum is not None:
            self._accum.rows_seen += sum(n for _, n in stats.values())
        if self.training:
            with torch.no_grad():
                if self._accum is not None:  # applied once, when the accumulation ends
                    self.centering.accumulate(stats)
                    self._accum.teacher_weight = teacher_weight
                else:
                    self.centering.update(stats, lambda name: teacher_weight(name.split("/")[0]))
                    self.calls += 1

        total = None
        for key, part in (("mgcl", mgcl_total), ("cma", cma_total)):
            if part is None:
                continue
            terms[key] = part
            total = self.weights[key] * part if total is None else total + self.weights[key] * part
        if total is None:
            raise ValueError(
                "SkySenseLoss: no term could be computed (no modality present, or no pair of "
                "views shares a valid step)"
            )
        if is_distributed():
            # DDP expects a gradient for every parameter on every process; a head or projection
            # whose modality is absent from this process's batch gets an exact zero instead of
            # none (the average over processes is then the right one).
            used = {f"heads.{k.split('/')[1]}." for k in terms if k.startswith("mgcl/")}
            used |= {
                f"cma.proj.{m}." for k in terms if k.startswith("cma/") for m in k[4:].split("-")
            }
            idle = [
                p
                for n, p in self.named_parameters()
                if p.requires_grad and not any(n.startswith(u) for u in used)
            ]
            if idle:
                total = total + 0.0 * sum(p.sum() for p in idle)
        terms["total"] = total
        return SkySenseLossOutput(
            total=total,
            terms={k: v.detach() for k, v in terms.items()},
            teacher_temp=tt,
            rows={f"mgcl/{name}": int(n) for name, (_, n) in stats.items()},
        )

    def mgcl_row_counts(
        self,
        outputs: Sequence[Mapping[str, torch.Tensor]],
        views: Sequence[Mapping[str, torch.Tensor]],
    ) -> dict[str, int]:
        """MGCL logit set ("<family>/<level>") -> the number of rows a forward call on these
        views will average over, read from one side's outputs (the teacher's, say: the student
        has the same steps, validity and grids). Cheap: no head, no clustering, no random
        draw, no collective."""
        affines = [v["view_affine"] for v in views]
        counts = dict.fromkeys(self.centering.names, 0)
        for fam in FAMILIES:
            feats = [
                family_features(o, v, fam, f"view {i + 1}")
                for i, (o, v) in enumerate(zip(outputs, views))
            ]
            if all(f is None for f in feats):
                continue
            for lvl, n in self.mgcl.row_counts(feats, affines).items():
                counts[f"{fam}/{lvl}"] = n
        return counts

    @contextlib.contextmanager
    def accumulation(
        self,
        teacher: Sequence[Sequence[Mapping[str, torch.Tensor]]],
        views: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    ):
        """Gradient accumulation: the forward calls made inside are the micro-batches of ONE
        optimizer step, whose backwards of ``total / n_calls`` add up.

        - Every MGCL level is normalised by the rows of all the calls (and, distributed, of
          every process): its term is the sum over the call's rows divided by the mean number
          of rows per call, so the average over calls (and processes) is the mean over the
          whole batch, as one call on the whole batch gives.
        - In training mode the teacher centres are updated once, on leaving, from the
          statistics of all the calls (one all-reduce), and the warm-up clock ``calls``
          advances by one.

        CMA is not decomposable: each call's InfoNCE takes its negatives from that call's rows
        (and, with ``cma_gather``, the same call of the other processes).

        Args:
            teacher: for each call, the teacher's output of each view (only the keys the loss
                reads are needed: ``tokens_*``, ``valid_*``, ``fused``).
            views: for each call, its views.

        One all-reduce on entering and one on leaving (when distributed), on every process;
        every process must make the same number of calls. On an exception nothing is
        applied.
        """
        if self._accum is not None:
            raise RuntimeError("SkySenseLoss.accumulation: already accumulating")
        if len(teacher) != len(views) or not teacher:
            raise ValueError(
                f"SkySenseLoss.accumulation: {len(teacher)} teacher outputs for {len(views)} "
                "micro-batches of views (needs the same number, >= 1)"
            )
        names = self.centering.names
        per_call = [self.mgcl_row_counts(outs, vs) for outs, vs in zip(teacher, views)]
        rows = [float(sum(c[n] for c in per_call)) for n in names]
        rows_expected = int(sum(rows))
        local = torch.tensor(rows, dtype=torch.float64, device=self.centering.center.device)
        world = dist.get_world_size() if is_distributed() else 1
        total = all_reduce_(local).tolist()
        state = _Accumulation(
            {n: t / (world * len(teacher)) for n, t in zip(names, total) if t > 0}
        )
        self._accum = state
        self.centering.discard()
        try:
            yield self
        except BaseException:
            self._accum = None
            self.centering.discard()
            raise
        self._accum = None
        if self.training:

            def weight(name: str) -> torch.Tensor:
                if state.teacher_weight is None:
                    raise RuntimeError(
                        "SkySenseLoss.accumulation: no forward call in training mode to take "
                        "the teacher prototypes from"
                    )
                return state.teacher_weight(name.split("/")[0])

            self.centering.apply(weight)
            self.calls += 1
        if state.rows_seen != rows_expected:
            raise RuntimeError(
                f"SkySenseLoss.accumulation: the forward calls averaged over "
                f"{state.rows_seen} MGCL rows, the teacher outputs given on entering hold "
                f"{rows_expected}: give the teacher outputs of the same micro-batches"
            )

    def _row_scales(self, local: Mapping[str, int]) -> dict[str, torch.Tensor | float] | None:
        """Per MGCL logit set, the factor that turns this call's mean into its share of the
        mean over every call whose gradients are averaged: n_local / (mean rows per call).
        None for a lone call (one process, no accumulation): the mean itself."""
        if self._accum is not None:
            norm = self._accum.row_norm
            missing = sorted(n for n, c in local.items() if c > 0 and n not in norm)
            if missing:
                raise RuntimeError(
                    f"SkySenseLoss.accumulation: this call has rows for {missing}, which the "
                    "teacher outputs given on entering have none of"
                )
            return {n: c / norm[n] for n, c in local.items() if c > 0}
        if not is_distributed():
            return None
        # ONE fixed-size all-reduce of every logit set's row count (zeros for those absent
        # here), on every call of every process: none can be skipped, so none can hang.
        names = self.centering.names
        counts = torch.tensor(
            [float(local.get(n, 0)) for n in names],
            dtype=torch.float64,
            device=self.centering.center.device,
        )
        total = all_reduce_(counts.clone())
        factor = (counts * dist.get_world_size() / total.clamp_min(1)).float()
        return {n: factor[i] for i, n in enumerate(names) if local.get(n, 0) > 0}

    @torch.no_grad()
    def update_prototypes(
        self,
        prototypes: torch.Tensor,
        fused: torch.Tensor,
        region: torch.Tensor,
        momentum: float | None = None,
    ) -> dict[str, float]:
        """The GCPL EMA update of the geo-context prototypes, in place (see
        :meth:`GeoContextPrototypeLearning.update`; call it with the teacher's F_fus)."""
        return self.gcpl.update(prototypes, fused, region, momentum)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, levels={self.level_weights}, modalities={MODALITIES}"

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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from skysense.losses.cross_modal_alignment import CrossModalAlignment
from skysense.losses.dino_head import DINOHead
from skysense.losses.distributed import is_distributed
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
        # Training-mode forward calls so far: the warm-up clock when the caller gives no step
        # (persistent, so a resumed run continues its schedule).
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg: Mapping, grid_dim: int, fusion_dim: int) -> SkySenseLoss:
        """Build from the ``loss`` config group (a mapping of the keyword arguments)."""
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) - {"self", "grid_dim", "fusion_dim"}
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
        distributed, on every call, whatever the batch holds).
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
            for lvl, loss in losses.items():
                terms[f"mgcl/{fam}/{lvl}"] = loss
                weighted = self.level_weights[lvl] * loss
                mgcl_total = weighted if mgcl_total is None else mgcl_total + weighted
            stats.update({f"{fam}/{lvl}": st for lvl, st in fam_stats.items()})

        cma_total = None
        for name, loss in self.cma(student, views).items():
            terms[f"cma/{name}"] = loss
            cma_total = loss if cma_total is None else cma_total + loss

        if self.training:
            with torch.no_grad():
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

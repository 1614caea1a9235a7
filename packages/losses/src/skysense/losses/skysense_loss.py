"""The SkySense pre-training objective: MGCL + CMA, weighted, with every term by name, computed
from the student's and the teacher's features (and the GCPL prototype update beside it).

The student/teacher business (teacher EMA, teacher-temperature schedule, when the teacher
centres move, gradient accumulation, DDP's idle parameters, the GCPL update after each step)
is the meta-architecture's (``skysense.tasks.training.meta_arch``); this module only computes::

    loss_fn = SkySenseLoss.from_config(cfg.loss, grid_dim=C_g, fusion_dim=D_f)
    out = loss_fn(
        student=[student(v1), student(v2)],
        teacher=[teacher(v1), teacher(v2)],   # under torch.no_grad()
        views=[v1, v2],
        teacher_heads=teacher_heads,           # the EMA copy of loss_fn.heads
        teacher_temp=0.04,
    )
    out.total.backward()
    loss_fn.centering.update(out.stats, teacher_weight)   # when the caller says so
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from skysense.losses.cross_modal_alignment import CrossModalAlignment
from skysense.losses.dino_head import DINOHead
from skysense.losses.features import (
    FAMILIES,
    MODALITIES,
    family_features,
    paired_family_features,
)
from skysense.losses.gcpl import GeoContextPrototypeLearning
from skysense.losses.mgcl import LEVELS, MultiGranularityContrastiveLoss
from skysense.losses.teacher_centering import TeacherCentering


@dataclass
class SkySenseLossOutput:
    """What :class:`SkySenseLoss` returns.

    Attributes:
        total: scalar with grad, ``mgcl * L_MGCL + cma * L_CMA``.
        terms: name -> detached scalar, for logging: "mgcl/<family>/<level>" (family in hr, s2,
            s1, fused; level in pixel, object, image), "cma/<a>-<b>", "mgcl" and "cma"
            (unweighted sums), "total". Terms of modalities absent from the batch are absent.
            With ``row_norm``, each MGCL term is this call's share (see ``forward``).
        teacher_temp: the teacher temperature used.
        stats: logit set "<family>/<level>" -> (sum over its rows of the teacher's normalised
            bottleneck features (D,), number of rows): what the teacher-centre update reads
            (:meth:`TeacherCentering.update`). No gradient.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_temp: float = 0.0
    stats: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)

    @property
    def rows(self) -> dict[str, int]:
        """MGCL term name -> number of (student, teacher) rows it averaged over (the N of its
        (N, K) logits, which the fused kernel never stores), read from ``stats``."""
        return {f"mgcl/{name}": int(n) for name, (_, n) in self.stats.items()}

    def __getitem__(self, key: str):
        return getattr(self, key)


class SkySenseLoss(nn.Module):
    """MGCL over hr, s2, s1 and F_fus at three granularities, plus CMA over modality pairs.

    Owns the student projection heads (``heads``: one :class:`DINOHead` per family), the CMA
    projections (``cma.proj``), and the teacher centres (buffers of ``centering``, which the
    forward reads and never moves: the caller updates them from ``stats``, once per optimizer
    step). The teacher heads are the caller's EMA copy of ``heads``.

    Args:
        grid_dim: C_g, width of ``tokens_*``.
        fusion_dim: D_f, width of ``fused``.
        mgcl: weight of L_MGCL in the total.
        cma: weight of L_CMA in the total.
        n_prototypes: K of every DINO head (65536 in DINO/DINOv2).
        head_hidden_dim, head_bottleneck_dim, head_n_layers: DINO head MLP (DINOv2: 2048, 256, 3).
        student_temp: student softmax temperature (DINOv2: 0.1).
        teacher_temp: teacher temperature when the caller gives none (DINOv2's after warm-up:
            0.07; the warm-up schedule is the meta-architecture's).
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

    @classmethod
    def config_fields(cls) -> set[str]:
        """The keyword arguments (fields of the ``loss`` config group)."""
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

    def forward(
        self,
        student: Sequence[Mapping[str, torch.Tensor]],
        teacher: Sequence[Mapping[str, torch.Tensor]],
        views: Sequence[Mapping[str, torch.Tensor]],
        teacher_heads: nn.ModuleDict | None = None,
        *,
        teacher_temp: float | None = None,
        row_norm: Mapping[str, float] | None = None,
    ) -> SkySenseLossOutput:
        """The loss of one batch of views.

        Args:
            student: the student encoder's output dict for each view (V >= 2 views).
            teacher: the teacher encoder's output dict for each view (no grad needed).
            views: each view's batch; ``view_affine`` (B, 2, 3) and, for the series present,
                ``s2_index``/``s1_index`` (B, T) are read.
            teacher_heads: the EMA copy of ``heads``; None uses ``heads`` themselves as the
                teacher (no gradient flows through the teacher side either way).
            teacher_temp: the teacher temperature (None: the constructor's ``teacher_temp``).
            row_norm: MGCL logit set "<family>/<level>" -> the number of rows to divide that
                level's row sum by, in place of this call's own count (None: each level is the
                mean over this call's rows). The meta-architecture passes the mean rows per
                call over the calls whose gradients are averaged (DDP processes, accumulated
                micro-batches), so that their average is the mean over all their rows.

        Any modality may be absent from the batch (its keys absent from every output): its terms
        are absent. Nothing is updated: the centres are read (copies), the statistics of their
        update returned in ``stats``.
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
        tt = float(self.teacher_temp if teacher_temp is None else teacher_temp)
        affines = [v["view_affine"] for v in views]

        # Teacher prototype matrices (K, D) by family, computed once per call.
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
            pair = paired_family_features(student, teacher, views, fam)
            if pair is None:
                continue
            losses, fam_stats = self.mgcl(
                *pair,
                affines,
                self.heads[fam],
                t_heads[fam],
                # Copies: the caller may update the centres in place before the backward, which
                # may read the centre it was given.
                {lvl: self.centering.get(f"{fam}/{lvl}").clone() for lvl in LEVELS},
                tt,
                teacher_weight(fam),
            )
            mgcl_terms.update({f"{fam}/{lvl}": loss for lvl, loss in losses.items()})
            stats.update({f"{fam}/{lvl}": st for lvl, st in fam_stats.items()})

        for name, loss in mgcl_terms.items():
            if row_norm is not None:
                loss = loss * self._row_scale(name, stats[name][1], row_norm)
            terms[f"mgcl/{name}"] = loss
            weighted = self.level_weights[name.split("/")[1]] * loss
            mgcl_total = weighted if mgcl_total is None else mgcl_total + weighted

        cma_total = None
        for name, loss in self.cma(student, views).items():
            terms[f"cma/{name}"] = loss
            cma_total = loss if cma_total is None else cma_total + loss

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
        terms["total"] = total
        return SkySenseLossOutput(
            total=total,
            terms={k: v.detach() for k, v in terms.items()},
            teacher_temp=tt,
            stats=stats,
        )

    @staticmethod
    def _row_scale(name: str, n_local: int, row_norm: Mapping[str, float]) -> float:
        """n_local / row_norm[name]: turns this call's mean into its share of the mean over
        every call whose gradients are averaged."""
        if name not in row_norm:
            raise RuntimeError(
                f"SkySenseLoss: this call has rows for {name}, which row_norm (from the teacher "
                "outputs of the step) has none of"
            )
        return n_local / row_norm[name]

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

    def extra_repr(self) -> str:
        return f"weights={self.weights}, levels={self.level_weights}, modalities={MODALITIES}"

"""Multi-granularity contrastive learning (MGCL): student features of one view against the
teacher's features of the other view at three granularities, through the DINO loss.

- pixel: the features at the same ground location and acquisition (see ``correspondence``);
- object: each image's paired pixels clustered into N_C centres by Sinkhorn-Knopp on the
  teacher's features; the same soft assignment pools the student's paired pixels, so student
  centre c and teacher centre c cover the same ground and are matched by construction;
- image: each view's grid average-pooled, per matched acquisition.

Every row that enters a mean is a real (matched, valid) pair: padded or invalid steps, unmatched
steps and points outside the other view are never gathered, so they add nothing and do not
dilute the means (each level is the mean over its rows, both cross-view directions together).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skysense.kernels import prototype_cross_entropy, sinkhorn_knopp
from skysense.losses.correspondence import (
    SAMPLING_MODES,
    PixelCorrespondence,
    StepMatch,
    match_steps,
    pixel_correspondence,
    sample_cells,
)
from skysense.losses.dino_head import DINOHead
from skysense.losses.features import FamilyFeatures

LEVELS = ("pixel", "object", "image")


def cap_per_group(groups: torch.Tensor, cap: int, generator=None) -> torch.Tensor:
    """Indices of a uniformly random subset of at most ``cap`` rows of each group.

    Args:
        groups: (N,) int64 group of each row (the sample).
    Returns:
        (N',) int64 indices of the kept rows, in increasing order.
    """
    n = groups.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=groups.device)
    prio = torch.rand(n, generator=generator, device=groups.device, dtype=torch.float64)
    # Sort by group, then by random priority: the rank inside the group decides.
    order = torch.argsort(groups.double() * 2 + prio)
    g_sorted = groups[order]
    start = torch.ones_like(g_sorted, dtype=torch.bool)
    start[1:] = g_sorted[1:] != g_sorted[:-1]
    pos = torch.arange(n, device=groups.device)
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=0).values
    keep = order[(pos - first) < cap]
    return torch.sort(keep).values


@torch.no_grad()
def cluster_assignments(
    x: torch.Tensor,
    mask: torch.Tensor,
    n_clusters: int,
    n_rounds: int = 3,
    sinkhorn_iters: int = 3,
    epsilon: float = 0.05,
) -> torch.Tensor:
    """Balanced soft clustering of each image's pixels (Sinkhorn-Knopp k-means on the sphere).

    Centres start at ``n_clusters`` valid pixels spread evenly through the image's row-major
    order (deterministic), then ``n_rounds`` times: cosine scores to the centres, Sinkhorn-Knopp
    with uniform marginals over the image's valid pixels, centres <- normalised weighted means.

    Args:
        x: (M, P, C) float pixel features of M images.
        mask: (M, P) bool, the pixels that take part (each image needs at least one).
    Returns:
        (M, P, n_clusters) assignments in x.dtype; each valid pixel's row sums to 1, invalid
        pixels' rows are 0.
    """
    # Float32 throughout, also under autocast: the Sinkhorn exponent is 1 / epsilon (20) times
    # a cosine, which bfloat16's 8 bits would round to a different assignment.
    with torch.autocast(x.device.type, enabled=False):
        return _cluster_assignments(x, mask, n_clusters, n_rounds, sinkhorn_iters, epsilon).to(
            x.dtype
        )


def _cluster_assignments(x, mask, n_clusters, n_rounds, sinkhorn_iters, epsilon):
    m, p, _ = x.shape
    xn = F.normalize(x.float(), dim=-1)
    n_valid = mask.sum(dim=1)
    if (n_valid == 0).any():
        raise ValueError("cluster_assignments: an image has no valid pixel")
    cum = mask.long().cumsum(dim=1)
    # The (k * n / N_C)-th valid pixel (1-based count) starts centre k.
    target = torch.arange(n_clusters, device=x.device)[None] * n_valid[:, None] // n_clusters + 1
    pos = torch.searchsorted(cum, target)
    centres = torch.gather(xn, 1, pos[..., None].expand(-1, -1, xn.shape[-1]))
    rows_m, rows_p = torch.nonzero(mask, as_tuple=True)
    assign = torch.zeros(m, p, n_clusters, dtype=xn.dtype, device=x.device)
    for r in range(n_rounds):
        scores = torch.bmm(xn, centres.transpose(1, 2))  # (M, P, N_C)
        assign[rows_m, rows_p] = sinkhorn_knopp(
            scores[rows_m, rows_p], sinkhorn_iters, epsilon, groups=rows_m, n_groups=m
        )
        if r < n_rounds - 1:
            centres = F.normalize(torch.bmm(assign.transpose(1, 2), xn), dim=-1)
    return assign


def _geometry(
    a: FamilyFeatures, b: FamilyFeatures, affine_a: torch.Tensor, affine_b: torch.Tensor
) -> tuple[StepMatch, PixelCorrespondence]:
    """The matched steps of views a and b, and where view a's cells fall in view b."""
    match = match_steps(a.index, a.valid, b.index, b.valid)
    corr = pixel_correspondence(
        affine_a, affine_b, tuple(a.tokens.shape[-2:]), tuple(b.tokens.shape[-2:])
    )
    return match, corr


class MultiGranularityContrastiveLoss(nn.Module):
    """MGCL for one feature family at a time; the heads and centres are passed in.

    Args:
        n_clusters: N_C, object centres per image (the paper leaves it open: a choice).
        cluster_rounds: k-means rounds of the object clustering.
        sinkhorn_iters, sinkhorn_epsilon: Sinkhorn-Knopp of the object clustering (SwAV's 3 and
            0.05).
        max_pixel_pairs: at most this many pixel pairs per sample and cross-view direction,
            drawn at random (None: all; a cap keeps the CPU preset quick).
        pixel_sampling: "nearest" or "bilinear" read-out of the teacher's features at the mapped
            points (see ``correspondence``).
        student_temp: DINO student temperature (0.1).
    """

    def __init__(
        self,
        n_clusters: int = 8,
        cluster_rounds: int = 3,
        sinkhorn_iters: int = 3,
        sinkhorn_epsilon: float = 0.05,
        max_pixel_pairs: int | None = None,
        pixel_sampling: str = "nearest",
        student_temp: float = 0.1,
    ):
        super().__init__()
        if pixel_sampling not in SAMPLING_MODES:
            raise ValueError(
                f"pixel_sampling must be one of {SAMPLING_MODES}, got {pixel_sampling!r}"
            )
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
        if max_pixel_pairs is not None and max_pixel_pairs < 1:
            raise ValueError(f"max_pixel_pairs must be >= 1 or None, got {max_pixel_pairs}")
        self.n_clusters = n_clusters
        self.cluster_rounds = cluster_rounds
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.max_pixel_pairs = max_pixel_pairs
        self.pixel_sampling = pixel_sampling
        self.student_temp = student_temp

    def pairs(
        self,
        student: FamilyFeatures,
        teacher: FamilyFeatures,
        affine_s: torch.Tensor,
        affine_t: torch.Tensor,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The (student, teacher) feature rows of one cross-view direction, per level.

        Args:
            student: the family in the student's view a, tokens (B, T_a, C, h_a, w_a).
            teacher: the family in the teacher's view b, tokens (B, T_b, C, h_b, w_b).
            affine_s, affine_t: (B, 2, 3) ``view_affine`` of views a and b.
        Returns:
            level -> ((N, C) student rows with grad, (N, C) teacher rows detached).
        """
        s_tok, t_tok = student.tokens, teacher.tokens.detach()
        if s_tok.shape[0] != t_tok.shape[0] or s_tok.shape[2] != t_tok.shape[2]:
            raise ValueError(
                f"student tokens {tuple(s_tok.shape)} and teacher tokens {tuple(t_tok.shape)} "
                "differ in batch size or width"
            )
        c = s_tok.shape[2]
        match, corr = _geometry(student, teacher, affine_s, affine_t)
        s_img = s_tok[match.sample, match.step_a].flatten(2)  # (M, C, P_a)
        t_img = t_tok[match.sample, match.step_b]  # (M, C, h_b, w_b)
        t_pix = sample_cells(t_img, corr, match.sample, self.pixel_sampling)  # (M, C, P_a)
        inside = corr.inside[match.sample]  # (M, P_a)
        s_pix, t_pix = s_img.transpose(1, 2), t_pix.transpose(1, 2)  # (M, P_a, C)
        out = {}

        rows_m, rows_p = torch.nonzero(inside, as_tuple=True)
        if self.max_pixel_pairs is not None:
            keep = cap_per_group(match.sample[rows_m], self.max_pixel_pairs)
            rows_m, rows_p = rows_m[keep], rows_p[keep]
        out["pixel"] = (s_pix[rows_m, rows_p], t_pix[rows_m, rows_p])

        has = inside.any(dim=1)
        if has.any():
            s_o, t_o, msk = s_pix[has], t_pix[has], inside[has]
            a = cluster_assignments(
                t_o,
                msk,
                self.n_clusters,
                self.cluster_rounds,
                self.sinkhorn_iters,
                self.sinkhorn_epsilon,
            )
            mass = a.sum(dim=1)[..., None]  # (M', N_C, 1), > 0: Sinkhorn spreads every centre
            a_s = a.to(s_o.dtype)
            s_c = torch.bmm(a_s.transpose(1, 2), s_o) / mass.to(s_o.dtype)
            t_c = torch.bmm(a.transpose(1, 2), t_o) / mass
            out["object"] = (s_c.reshape(-1, c), t_c.reshape(-1, c))
        else:
            out["object"] = (s_pix.new_zeros(0, c), t_pix.new_zeros(0, c))

        out["image"] = (s_img.mean(dim=2), t_img.flatten(2).mean(dim=2))
        return out

    @torch.no_grad()
    def row_counts(
        self, feats: Sequence[FamilyFeatures | None], affines: Sequence[torch.Tensor]
    ) -> dict[str, int]:
        """The number of (student, teacher) rows each level of :meth:`forward` will average
        over, from one side's features alone (the student's and the teacher's views have the
        same steps, validity and grids): no head, no clustering, no random draw.

        Args:
            feats: the family in each view (None where absent), e.g. the teacher's.
            affines: (B, 2, 3) ``view_affine`` of each view.
        Returns:
            level -> row count (0 for a level without rows).
        """
        counts = dict.fromkeys(LEVELS, 0)
        for a, fa in enumerate(feats):
            for b, fb in enumerate(feats):
                if a == b or fa is None or fb is None:
                    continue
                match, corr = _geometry(fa, fb, affines[a], affines[b])
                inside = corr.inside[match.sample]  # (M, P_a)
                per_image = inside.sum(dim=1)
                if self.max_pixel_pairs is None:
                    counts["pixel"] += int(per_image.sum())
                else:  # cap_per_group keeps min(cap, n) rows of each sample
                    n_b = fa.tokens.shape[0]
                    per_sample = torch.zeros(n_b, dtype=torch.long, device=inside.device)
                    per_sample.index_add_(0, match.sample, per_image)
                    counts["pixel"] += int(per_sample.clamp(max=self.max_pixel_pairs).sum())
                counts["object"] += int((per_image > 0).sum()) * self.n_clusters
                counts["image"] += int(match.sample.numel())
        return counts

    def forward(
        self,
        students: Sequence[FamilyFeatures | None],
        teachers: Sequence[FamilyFeatures | None],
        affines: Sequence[torch.Tensor],
        head: DINOHead,
        teacher_head: DINOHead,
        centers: Mapping[str, torch.Tensor],
        teacher_temp: float,
        teacher_weight: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, int]]]:
        """MGCL of one family over every ordered pair of distinct views (student a, teacher b).

        Args:
            students, teachers: the family in each view (None where absent).
            affines: (B, 2, 3) ``view_affine`` of each view.
            head, teacher_head: the family's student head and its teacher (EMA) copy.
            centers: level -> (K,) teacher centre.
            teacher_weight: (K, D) ``teacher_head.prototype_weight()`` when the caller already
                has it (computed here otherwise).
        Returns:
            (level -> scalar loss, for the levels that have rows;
             level -> (sum of the teacher's normalised bottleneck rows (D,), row count), for the
             centre update).
        """
        rows: dict[str, tuple[list, list]] = {lvl: ([], []) for lvl in LEVELS}
        n_views = len(students)
        for a in range(n_views):
            for b in range(n_views):
                if a == b or students[a] is None or teachers[b] is None:
                    continue
                for lvl, (s, t) in self.pairs(
                    students[a], teachers[b], affines[a], affines[b]
                ).items():
                    rows[lvl][0].append(s)
                    rows[lvl][1].append(t)
        counts = {lvl: sum(r.shape[0] for r in rows[lvl][0]) for lvl in LEVELS}
        present = [lvl for lvl in LEVELS if counts[lvl] > 0]
        if not present:
            return {}, {}
        # One pass through each head for all levels: fewer, larger matrix products.
        x_s = torch.cat([r for lvl in present for r in rows[lvl][0]])
        x_t = torch.cat([r for lvl in present for r in rows[lvl][1]])
        z_s = head(x_s).split([counts[lvl] for lvl in present])
        w_s = head.prototype_weight()
        with torch.no_grad():
            z_t = teacher_head(x_t).split([counts[lvl] for lvl in present])
            w_t = teacher_head.prototype_weight() if teacher_weight is None else teacher_weight
        losses, stats = {}, {}
        for lvl, zs, zt in zip(present, z_s, z_t):
            losses[lvl] = prototype_cross_entropy(
                zs,
                zt,
                w_s,
                teacher_weight=w_t,
                center=centers[lvl],
                student_temp=self.student_temp,
                teacher_temp=teacher_temp,
            )
            # Summed in float32 at least (the rows are bfloat16 under autocast).
            acc_dtype = torch.promote_types(zt.dtype, torch.float32)
            stats[lvl] = (zt.sum(dim=0, dtype=acc_dtype), zt.shape[0])
        return losses, stats

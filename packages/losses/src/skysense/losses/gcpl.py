"""Geo-context prototype learning (GCPL): the EMA update of the region prototypes.

For the samples of region r, M = cosine(F_fus, P_r) scores every location against the region's
N_p prototypes; S = Sinkhorn-Knopp(M) balances the assignments (uniform marginals over the
region's locations in the batch); each prototype moves towards the S-weighted mean of the
features assigned to it:

    P_r[j] <- m P_r[j] + (1 - m) (S^T F_fus)[j] / (S^T 1)[j]

(the spec's S^T F_fus, divided by the prototype's assigned mass so the target is a mean feature,
on the scale of P_r, whatever the batch size). No gradient; the prototypes are updated in place.

Distributed: the per-region Sinkhorn column sums, the sums S^T F_fus and the masses are
all-reduced before use, so every process ends with the prototypes that one process would compute
on the concatenated batch. Regions with no sample in the (global) batch are left unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skysense.kernels import sinkhorn_knopp
from skysense.losses.distributed import all_reduce_, is_distributed


class GeoContextPrototypeLearning(nn.Module):
    """The GCPL update. Holds no state: the prototypes belong to the encoder
    (``SkySense.geo_context.prototypes``, (N_R, N_p, D_f), requires_grad=False).

    Args:
        momentum: EMA momentum m (the paper leaves it open: 0.99 is a choice).
        sinkhorn_iters, epsilon: Sinkhorn-Knopp rounds and entropic temperature (SwAV's 3 and
            0.05).
    """

    def __init__(self, momentum: float = 0.99, sinkhorn_iters: int = 3, epsilon: float = 0.05):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"GCPL momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.sinkhorn_iters = sinkhorn_iters
        self.epsilon = epsilon

    @torch.no_grad()
    def update(
        self,
        prototypes: torch.Tensor,
        fused: torch.Tensor,
        region: torch.Tensor,
        momentum: float | None = None,
    ) -> dict[str, float]:
        """Update ``prototypes`` in place from one batch.

        Call it after each optimizer step with the TEACHER's F_fus (its features change slowly,
        as the prototypes' EMA assumes), e.g. of both views concatenated along the batch.

        Args:
            prototypes: (N_R, N_p, D_f) float, updated in place.
            fused: (B, D_f, h, w) F_fus.
            region: (B,) int64 region of each sample, -1 where unknown (such samples are skipped).
            momentum: overrides the module's m for this call.
        Returns:
            {"regions": regions updated, "locations": locations used} (global counts).

        Computed in the prototypes' precision also under autocast.
        """
        with torch.autocast(prototypes.device.type, enabled=False):
            return self._update(prototypes, fused, region, momentum)

    def _update(self, prototypes, fused, region, momentum):
        m = self.momentum if momentum is None else float(momentum)
        if prototypes.ndim != 3:
            raise ValueError(
                f"GCPL: prototypes must be (N_R, N_p, D_f), got {tuple(prototypes.shape)}"
            )
        n_r, n_p, d = prototypes.shape
        if fused.ndim != 4 or fused.shape[1] != d:
            raise ValueError(
                f"GCPL: fused must be (B, {d}, h, w) to match prototypes {tuple(prototypes.shape)}, "
                f"got {tuple(fused.shape)}"
            )
        if region.shape != fused.shape[:1]:
            raise ValueError(
                f"GCPL: region must be (B,) = ({fused.shape[0]},), got {tuple(region.shape)}"
            )
        region = region.long().to(prototypes.device)
        if (region >= n_r).any() or (region < -1).any():
            bad = region[(region >= n_r) | (region < -1)].unique().tolist()
            raise ValueError(f"GCPL: region ids {bad} outside [-1, {n_r})")
        known = region >= 0
        dist_on = is_distributed()
        # The regions of the global batch, numbered identically on every process.
        # (the last entry counts the locations, for the returned statistics)
        h, w = fused.shape[-2:]
        present = torch.zeros(n_r + 1, dtype=torch.float64, device=prototypes.device)
        present[region[known]] = 1
        present[-1] = float(known.sum().item() * h * w)
        if dist_on:
            all_reduce_(present)
        regions = torch.nonzero(present[:-1] > 0).flatten()  # (G,)
        g = regions.numel()
        stats = {"regions": int(g), "locations": int(present[-1].item())}
        if g == 0:
            return stats
        slot = torch.full((n_r,), -1, dtype=torch.long, device=prototypes.device)
        slot[regions] = torch.arange(g, device=prototypes.device)

        feats = fused[known].flatten(2).transpose(1, 2).to(prototypes.dtype)  # (B_k, hw, D)
        b_k, hw = feats.shape[:2]
        protos = prototypes[region[known]]  # (B_k, N_p, D)
        scores = torch.bmm(F.normalize(feats, dim=-1), F.normalize(protos, dim=-1).transpose(1, 2))
        groups = slot[region[known]].repeat_interleave(hw)
        assign = sinkhorn_knopp(
            scores.reshape(-1, n_p),
            self.sinkhorn_iters,
            self.epsilon,
            distributed=True,
            groups=groups,
            n_groups=g,
        ).reshape(b_k, hw, n_p)

        # One reduction for the sums S^T F and the masses S^T 1 of every present region.
        acc = torch.zeros(g, n_p, d + 1, dtype=torch.float64, device=prototypes.device)
        per_sample = torch.cat(
            [torch.bmm(assign.transpose(1, 2), feats), assign.sum(dim=1)[..., None]], dim=-1
        )
        acc.index_add_(0, slot[region[known]], per_sample.double())
        all_reduce_(acc)
        mass = acc[..., -1:]
        # Sinkhorn leaves every prototype some mass; the guard only protects against underflow.
        target = acc[..., :-1] / mass.clamp_min(1e-12)
        old = prototypes[regions].double()
        new = torch.where(mass > 1e-12, m * old + (1 - m) * target, old)
        prototypes.index_copy_(0, regions, new.to(prototypes.dtype))
        return stats

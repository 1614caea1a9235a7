"""Cross-modal alignment (CMA): before fusion, the features of two modalities at the same place
are pulled together and those at other places pushed apart, by a symmetric InfoNCE, summed over
the pairs of modalities present.

At each grid location of a view, a modality's feature is the mean of its grid-aligned tokens over
the sample's valid steps (the S1 and S2 steps are not simultaneous, so a per-step pairing would
be arbitrary; the mean is the modality's description of the place). Row (sample, location) of one
modality and the same row of the other are a positive pair; every other row of the batch (and of
the other processes' batches with ``gather``) is a negative. A sample lacking either modality (no
valid step) is left out of that pair.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skysense.kernels import info_nce
from skysense.losses.distributed import all_reduce_, is_distributed
from skysense.losses.features import MODALITIES, family_features

log = logging.getLogger(__name__)


def pooled_features(
    out: Mapping[str, torch.Tensor],
    view: Mapping[str, torch.Tensor] | None,
    modality: str,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-location feature of a modality, averaged over its valid steps (with the view given,
    steps whose ``*_index`` is -1 count as padding too).

    Returns:
        ((B, h, w, C) features, (B,) bool: the sample has at least one valid step), or None
        where the modality is absent from the batch.
    """
    f = family_features(out, view, modality, where)
    if f is None:
        return None
    w = f.valid.to(f.tokens.dtype)  # (B, T)
    n = w.sum(dim=1)
    mean = torch.einsum("btchw,bt->bhwc", f.tokens, w) / n.clamp_min(1)[:, None, None, None]
    return mean, n > 0


class CrossModalAlignment(nn.Module):
    """Symmetric InfoNCE between co-located features of each pair of modalities.

    Each modality has its own linear projection to ``proj_dim`` (CLIP-style; None: no
    projection, the features themselves), followed by L2 normalisation.

    Args:
        in_dim: C_g, the grid width.
        proj_dim: projection width (a choice: 256, the heads' bottleneck).
        temperature: InfoNCE temperature (0.1, the kernel's default).
        gather: gather negatives across processes (``info_nce(gather=True)``) when distributed.
            Then each process's InfoNCE runs over its own rows as positives against every
            process's rows as negatives; the mean over processes of the per-process losses is
            the loss of the concatenated batch, and DDP's gradient averaging makes the gradients
            that batch's (see ``skysense.kernels.info_nce``). The kernel needs the same number
            of rows on every process: a (view, pair) whose row counts differ across processes
            (samples lacking a modality) runs without gathering that step, with a warning.
    """

    def __init__(
        self,
        in_dim: int,
        proj_dim: int | None = 256,
        temperature: float = 0.1,
        gather: bool = True,
        modalities: Sequence[str] = MODALITIES,
    ):
        super().__init__()
        self.modalities = tuple(modalities)
        self.pairs = list(itertools.combinations(self.modalities, 2))
        self.temperature = temperature
        self.gather = gather
        self._warned = False
        self.proj = nn.ModuleDict(
            {
                m: nn.Linear(in_dim, proj_dim, bias=False) if proj_dim else nn.Identity()
                for m in self.modalities
            }
        )
        for p in self.proj.values():
            if isinstance(p, nn.Linear):
                nn.init.trunc_normal_(p.weight, std=in_dim**-0.5)

    def embed(self, feats: torch.Tensor, modality: str) -> torch.Tensor:
        """(N, C) -> (N, proj_dim) unit rows."""
        return F.normalize(self.proj[modality](feats), dim=-1)

    def view_pairs(
        self,
        out: Mapping[str, torch.Tensor],
        view: Mapping[str, torch.Tensor] | None,
        where: str,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """pair name "a-b" -> ((N, C), (N, C)) co-located features of the two modalities in one
        view, for the samples that have both."""
        pooled = {m: pooled_features(out, view, m, where) for m in self.modalities}
        res = {}
        for ma, mb in self.pairs:
            if pooled[ma] is None or pooled[mb] is None:
                continue
            (fa, oka), (fb, okb) = pooled[ma], pooled[mb]
            if fa.shape[:3] != fb.shape[:3]:
                raise ValueError(
                    f"{where}: tokens_{ma} and tokens_{mb} are on different grids "
                    f"{tuple(fa.shape[1:3])} vs {tuple(fb.shape[1:3])}"
                )
            keep = oka & okb
            res[f"{ma}-{mb}"] = (fa[keep].flatten(0, 2), fb[keep].flatten(0, 2))
        return res

    def forward(
        self,
        outputs: Sequence[Mapping[str, torch.Tensor]],
        views: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """CMA of each view's student features.

        Args:
            outputs: the student's encoder output of each view.
            views: the view batches (optional): their ``s2_index``/``s1_index`` mark padding.
        Returns:
            pair name (e.g. "hr-s2") -> scalar: the pair's InfoNCE averaged over the views that
            have rows for it (views are not mixed in one InfoNCE: their overlap would put the
            same ground among the negatives).
        """
        gather = self.gather and is_distributed()
        views = views if views is not None else [None] * len(outputs)
        per_view = [
            self.view_pairs(o, v, f"student view {i + 1}")
            for i, (o, v) in enumerate(zip(outputs, views))
        ]
        names = [f"{a}-{b}" for a, b in self.pairs]
        counts = torch.tensor(
            [[float(pv[n][0].shape[0]) if n in pv else 0.0 for n in names] for pv in per_view]
        )
        if gather:
            # Gathering is collective and needs the same number of rows on every process: one
            # reduction of (max, -min) row counts decides, identically everywhere, which
            # (view, pair) calls gather, which run locally, and which nobody runs.
            device = next(t for t in outputs[0].values() if isinstance(t, torch.Tensor)).device
            ext = torch.stack([counts, -counts]).to(device)
            all_reduce_(ext, "max")
            hi, lo = ext[0].cpu(), -ext[1].cpu()
        losses: dict[str, list[torch.Tensor]] = {}
        for v, pv in enumerate(per_view):
            for j, name in enumerate(names):
                use_gather = gather and hi[v, j] > 0 and hi[v, j] == lo[v, j]
                if not use_gather and counts[v, j] == 0:
                    continue
                if gather and not use_gather and not self._warned:
                    log.warning(
                        "CMA %s: the processes hold different numbers of rows (%d to %d), "
                        "so its negatives are not gathered this step",
                        name,
                        int(lo[v, j]),
                        int(hi[v, j]),
                    )
                    self._warned = True
                ma, mb = name.split("-")
                fa, fb = pv[name]
                loss = info_nce(
                    self.embed(fa, ma),
                    self.embed(fb, mb),
                    temperature=self.temperature,
                    gather=use_gather,
                )
                losses.setdefault(name, []).append(loss)
        return {n: torch.stack(v).mean() for n, v in losses.items()}

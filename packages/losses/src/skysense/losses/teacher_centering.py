"""Teacher-side centring (DINO): the teacher's logits are centred by an EMA of their batch mean
(and sharpened by a low temperature, whose warm-up schedule is the meta-architecture's).

The centre of a logit set is ``mean_n(teacher_x W_t^T) = (mean_n teacher_x) W_t^T``: linear, so
the update never forms the (N, K) logits; it needs only the sum of the teacher's bottleneck
features and their count, which is what crosses processes. The sums and counts of all twelve
logit sets (four families x three levels) travel in ONE all-reduce, called on every step
whatever the local batch holds, rather than one all-reduce per set: fewer collectives, and none
skipped by a process whose batch lacks a modality (which would deadlock the others). The
kernel's helper then applies the EMA to the global mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from skysense.kernels import prototype_center_update
from skysense.losses.distributed import all_reduce_


class TeacherCentering(nn.Module):
    """One centre (K,) per named logit set (e.g. "s2/pixel"), all updated with one all-reduce.

    Buffer ``center`` (len(names), K) float32, zeros at the start (DINO).

    Args:
        names: the logit sets, in a fixed order (the same on every process).
        n_prototypes: K.
        dim: width of the teacher features the centres are computed from (the heads'
            bottleneck).
        momentum: EMA momentum of the centres (DINO: 0.9).
    """

    def __init__(self, names: Sequence[str], n_prototypes: int, dim: int, momentum: float = 0.9):
        super().__init__()
        self.names = list(names)
        self.dim = dim
        self.momentum = momentum
        self._row = {n: i for i, n in enumerate(self.names)}
        self.register_buffer("center", torch.zeros(len(self.names), n_prototypes))

    def get(self, name: str) -> torch.Tensor:
        """The (K,) centre of logit set ``name``."""
        return self.center[self._row[name]]

    @torch.no_grad()
    def update(
        self,
        stats: Mapping[str, tuple[torch.Tensor, torch.Tensor | float]],
        teacher_weight: Callable[[str], torch.Tensor],
    ) -> None:
        """One EMA step of every centre towards its batch mean logits.

        Args:
            stats: name -> (sum over the batch's rows of the teacher's normalised bottleneck
                features (dim,), number of rows); names absent here add nothing on this process.
            teacher_weight: name -> (K, dim) teacher prototype matrix; called only for centres
                that some process has rows for.

        Distributed: the sums and counts of every name are all-reduced in one call, so every
        process calls this exactly once per step whatever its batch holds, and all end with the
        centres one process would compute on the whole batch.
        """
        acc = self._sums(stats)
        all_reduce_(acc)  # on every process, whatever it holds (also nothing)
        # In float32 also when called under autocast (from a bfloat16 forward).
        with torch.autocast(acc.device.type, enabled=False):
            for name, i in self._row.items():
                count = acc[i, -1]
                if count <= 0:
                    continue  # no process saw this logit set: its centre stays
                w = teacher_weight(name).float()
                # The batch mean is already global: the kernel's EMA runs on it as a one-row
                # batch.
                mean_x = (acc[i, :-1] / count).to(w.dtype)[None]
                prototype_center_update(mean_x, self.center[i], w, self.momentum)

    def _sums(self, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor | float]]) -> torch.Tensor:
        """(len(names), dim + 1) float64: per logit set, the summed features and the count."""
        unknown = set(stats) - set(self._row)
        if unknown:
            raise KeyError(f"TeacherCentering: unknown logit sets {sorted(unknown)}")
        acc = torch.zeros(
            len(self.names), self.dim + 1, dtype=torch.float64, device=self.center.device
        )
        for name, (s, n) in stats.items():
            if s.shape != (self.dim,):
                raise ValueError(
                    f"TeacherCentering: the feature sum of '{name}' has shape {tuple(s.shape)}, "
                    f"expected ({self.dim},)"
                )
            acc[self._row[name], :-1] += s.to(acc)
            acc[self._row[name], -1] += float(n)
        return acc

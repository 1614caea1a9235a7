"""Date-specific temporal positional encoding (DTPE): a learned row per day of the year."""

from __future__ import annotations

import torch
from torch import nn


class DateSpecificTemporalEncoding(nn.Module):
    """A learnable table of ``days`` rows x ``dim``; day-of-year d selects row d - 1.

    Day 366 (leap years) shares row 365. Day 0 means unknown or padded and encodes to zeros,
    so it adds nothing. The release stores the table as ``ctpe`` (1, 365, 2816).

    Args:
        dim: token width the encoding is added to (C_g: 2816 at paper size).
        days: table rows (365).
    """

    def __init__(self, dim: int, days: int = 365):
        super().__init__()
        self.days = days
        self.table = nn.Parameter(torch.zeros(days, dim))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, doy: torch.Tensor) -> torch.Tensor:
        """doy: (...) integer day of year in 0..366 -> (..., dim) in the table's dtype."""
        row = doy.clamp(1, self.days) - 1
        known = (doy > 0).unsqueeze(-1).to(self.table.dtype)
        return self.table[row] * known

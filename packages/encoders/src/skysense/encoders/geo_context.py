"""Attentive geo-context integration: a bank of region x prototype vectors, the lat/lon ->
region function, and the attention read-out concatenated to F_fus."""

from __future__ import annotations

import math

import torch
from torch import nn


def latlon_to_region(latlon: torch.Tensor, num_regions: int, lat_bands: int) -> torch.Tensor:
    """Region of each location on an equal-area global grid of ``num_regions`` cells.

    The sphere is cut into ``lat_bands`` bands of equal area (equal steps of sin(latitude)),
    each band into ``num_regions / lat_bands`` equal longitude sectors, so every cell has the
    same area (4 pi R^2 / num_regions; 4096 cells of ~124,500 km^2 at paper size, 32 x 128:
    ~400 km north-south by ~313 km east-west at the equator). Numbering is band-major from the
    south pole and sector-minor eastwards from longitude -180.

        band   = min(floor((sin(lat) + 1) / 2 * lat_bands), lat_bands - 1)
        sector = floor(((lon + 180) mod 360) / 360 * sectors)
        region = band * sectors + sector

    Longitude wraps (180 and -180 are the same sector); latitude 90 falls in the last band.

    Args:
        latlon: (B, 2) float, latitude and longitude in degrees; NaN where unknown.
        num_regions: N_R, a multiple of ``lat_bands``.
        lat_bands: number of latitude bands.

    Returns:
        (B,) int64 region in 0..num_regions-1, -1 where latitude or longitude is NaN.
    """
    sectors = num_regions // lat_bands
    lat = latlon[:, 0].to(torch.float64)
    lon = latlon[:, 1].to(torch.float64)
    known = ~(torch.isnan(lat) | torch.isnan(lon))
    lat = torch.where(known, lat, torch.zeros_like(lat))
    lon = torch.where(known, lon, torch.zeros_like(lon))
    s = torch.sin(torch.deg2rad(lat.clamp(-90.0, 90.0)))
    band = torch.floor((s + 1.0) * 0.5 * lat_bands).clamp(0, lat_bands - 1).long()
    sector = torch.floor(torch.remainder(lon + 180.0, 360.0) / 360.0 * sectors)
    sector = sector.clamp(0, sectors - 1).long()
    region = band * sectors + sector
    return torch.where(known, region, torch.full_like(region, -1))


class GeoContext(nn.Module):
    """Region prototypes and their attention read-out.

    F_out = concat(F_fus, softmax(F_fus P_r^T / sqrt(D_f)) P_r), no learned projections; the
    read-out is zero for a sample with no location (region -1).

    ``prototypes`` (N_R, N_p, D_f) float32 is a persistent buffer (``requires_grad=False``,
    saved in the state dict, not returned by ``parameters()``): the GCPL loss updates it in
    place with an EMA of Sinkhorn-assigned features, so no gradient must reach it. It starts
    as random unit vectors (a choice: the paper does not say).

    Args:
        num_regions: N_R (4096 at paper size).
        num_prototypes: N_p per region (100).
        dim: D_f (1024).
        lat_bands: latitude bands of :func:`latlon_to_region`.
    """

    def __init__(self, num_regions: int, num_prototypes: int, dim: int, lat_bands: int):
        super().__init__()
        if num_regions % lat_bands:
            raise ValueError(
                f"GeoContext: {num_regions} regions do not split into {lat_bands} latitude bands"
            )
        self.num_regions = num_regions
        self.num_prototypes = num_prototypes
        self.dim = dim
        self.lat_bands = lat_bands
        p = nn.functional.normalize(torch.randn(num_regions, num_prototypes, dim), dim=-1)
        self.register_buffer("prototypes", p, persistent=True)

    def region(self, latlon: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """(B,) int64 region of each sample; all -1 when ``latlon`` is None."""
        if latlon is None:
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        return latlon_to_region(latlon, self.num_regions, self.lat_bands)

    def forward(self, fused: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """fused: (B, L, D_f) float, F_fus at L locations; region: (B,) int64, -1 = unknown.

        Returns the read-out (B, L, D_f) in ``fused``'s dtype, zero where region is -1."""
        p = self.prototypes[region.clamp(min=0)].to(fused.dtype)  # (B, N_p, D_f)
        attn = torch.softmax(fused @ p.transpose(1, 2) / math.sqrt(self.dim), dim=-1)
        out = attn @ p
        return out * (region >= 0).to(out.dtype)[:, None, None]

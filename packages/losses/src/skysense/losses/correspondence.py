"""Which features of two views of one sample refer to the same ground and the same acquisition.

Space: each view's ``view_affine`` (B, 2, 3) maps the view's normalised coordinates (x right,
y down, [-1, 1], ``align_corners=False``) to the sample tile's. The centre of grid cell (i, j) of
view a, mapped through A_a then A_b^-1, is a point of view b; points outside [-1, 1]^2 have no
partner. View b's features are read there at the nearest cell (default: with crops on the grid
and flips or quarter turns, the mapped centres land exactly on cell centres) or bilinearly.

Time: steps of the two views with the same ``s*_index`` (>= 0) and valid in both are the same
acquisition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SAMPLING_MODES = ("nearest", "bilinear")


@dataclass
class PixelCorrespondence:
    """Where the grid cells of view a fall in view b.

    Attributes:
        coords: (B, P_a, 2) float64 (x, y) of each cell centre of view a in view b's normalised
            coordinates; P_a = h_a * w_a cells in row-major order.
        index: (B, P_a) int64, the row-major index of view b's nearest cell (clamped to the grid;
            meaningful where ``inside``).
        inside: (B, P_a) bool, the point lies in view b.
    """

    coords: torch.Tensor
    index: torch.Tensor
    inside: torch.Tensor


def cell_centres(h: int, w: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """(h * w, 2) (x, y) normalised centres of an h x w grid, row-major (align_corners=False)."""
    ys = (2 * torch.arange(h, device=device, dtype=dtype) + 1) / h - 1
    xs = (2 * torch.arange(w, device=device, dtype=dtype) + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def _check_affine(a: torch.Tensor, name: str) -> None:
    if a.ndim != 3 or a.shape[1:] != (2, 3):
        raise ValueError(f"{name} must have shape (B, 2, 3), got {tuple(a.shape)}")


def pixel_correspondence(
    affine_a: torch.Tensor,
    affine_b: torch.Tensor,
    size_a: tuple[int, int],
    size_b: tuple[int, int],
) -> PixelCorrespondence:
    """Map the cell centres of view a's (h_a, w_a) grid into view b's (h_b, w_b) grid.

    Args:
        affine_a, affine_b: (B, 2, 3) ``view_affine`` of the two views (any float dtype).
        size_a, size_b: the feature grids (h, w) of the two views.
    """
    _check_affine(affine_a, "view_affine of view a")
    _check_affine(affine_b, "view_affine of view b")
    if affine_a.shape[0] != affine_b.shape[0]:
        raise ValueError(
            f"the two views' view_affine hold {affine_a.shape[0]} and {affine_b.shape[0]} samples"
        )
    a = affine_a.double()
    b = affine_b.double()
    det = torch.linalg.det(b[:, :, :2])
    if (det.abs() < 1e-12).any():
        bad = torch.nonzero(det.abs() < 1e-12).flatten().tolist()
        raise ValueError(f"view_affine of view b is singular for samples {bad}")
    p = cell_centres(*size_a, device=a.device)  # (P, 2)
    tile = p @ a[:, :, :2].transpose(1, 2) + a[:, None, :, 2]  # (B, P, 2)
    coords = (tile - b[:, None, :, 2]) @ torch.linalg.inv(b[:, :, :2]).transpose(1, 2)
    # A hair of slack: mapped centres that land on the border of view b belong to it.
    inside = (coords.abs() <= 1 + 1e-6).all(dim=-1)
    h_b, w_b = size_b
    col = torch.floor((coords[..., 0] + 1) * (w_b / 2)).long().clamp_(0, w_b - 1)
    row = torch.floor((coords[..., 1] + 1) * (h_b / 2)).long().clamp_(0, h_b - 1)
    return PixelCorrespondence(coords=coords, index=row * w_b + col, inside=inside)


def sample_cells(
    feats: torch.Tensor,
    corr: PixelCorrespondence,
    rows: torch.Tensor,
    mode: str = "nearest",
) -> torch.Tensor:
    """View b's features at the points where view a's cells fall.

    Args:
        feats: (M, C, h_b, w_b) features of view b, one image per row of ``rows``.
        corr: the correspondence of the batch (B samples).
        rows: (M,) int64, the sample of each image.
        mode: "nearest" (the cell containing the point) or "bilinear" (``grid_sample``,
            ``align_corners=False``, border padding).

    Returns:
        (M, C, P_a) features; meaningless where ``corr.inside[rows]`` is False.
    """
    m, c, h_b, w_b = feats.shape
    if mode == "nearest":
        idx = corr.index[rows]  # (M, P_a)
        return torch.gather(feats.reshape(m, c, h_b * w_b), 2, idx[:, None, :].expand(m, c, -1))
    if mode == "bilinear":
        grid = corr.coords[rows].to(feats.dtype)[:, :, None, :]  # (M, P_a, 1, 2)
        out = F.grid_sample(
            feats, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return out[..., 0]
    raise ValueError(f"pixel sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")


@dataclass
class StepMatch:
    """Matched (sample, step of view a, step of view b) triples, each (M,) int64."""

    sample: torch.Tensor
    step_a: torch.Tensor
    step_b: torch.Tensor


def match_steps(
    index_a: torch.Tensor,
    valid_a: torch.Tensor,
    index_b: torch.Tensor,
    valid_b: torch.Tensor,
) -> StepMatch:
    """Pairs of steps showing the same acquisition: equal index (>= 0), valid in both views.

    Args:
        index_a, index_b: (B, T_a), (B, T_b) int64 indices in the sample's full series, -1 on
            padding.
        valid_a, valid_b: (B, T_a), (B, T_b) bool.
    """
    ok_a = valid_a & (index_a >= 0)
    ok_b = valid_b & (index_b >= 0)
    eq = (index_a[:, :, None] == index_b[:, None, :]) & ok_a[:, :, None] & ok_b[:, None, :]
    s, ta, tb = torch.nonzero(eq, as_tuple=True)
    return StepMatch(sample=s, step_a=ta, step_b=tb)

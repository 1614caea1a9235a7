"""Synthetic inputs with the shapes of docs/contracts.md: encoder outputs and pre-training views.

Views are square crops of a tile of ``tile`` x ``tile`` grid cells, ``crop`` cells wide, at a
random cell offset, with a random flip and quarter turn: the view's affine maps its normalised
coordinates to the tile's. ``field`` features defined on the tile are read through each view, so
two views see the same values at the same ground (what the pixel-level loss pairs).
"""

from __future__ import annotations

import torch


def view_affine(b: int, tile: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 2, 3) float32 affines of random crops (cell-aligned), flips and quarter turns."""
    out = torch.zeros(b, 2, 3)
    for i in range(b):
        x0, y0 = torch.randint(0, tile - crop + 1, (2,), generator=gen).tolist()
        rot = int(torch.randint(0, 4, (1,), generator=gen))
        flip = bool(torch.randint(0, 2, (1,), generator=gen))
        r = torch.eye(2)
        for _ in range(rot):
            r = torch.tensor([[0.0, -1.0], [1.0, 0.0]]) @ r
        if flip:
            r = r @ torch.diag(torch.tensor([-1.0, 1.0]))
        s = crop / tile
        out[i, :, :2] = s * r
        out[i, 0, 2] = (2 * x0 + crop) / tile - 1
        out[i, 1, 2] = (2 * y0 + crop) / tile - 1
    return out


def read_field(field: torch.Tensor, affine: torch.Tensor, crop: int) -> torch.Tensor:
    """Sample a tile field (B, T, C, tile, tile) through view affines -> (B, T, C, crop, crop),
    cell by cell (slow and obvious on purpose)."""
    b, t, c, th, tw = field.shape
    out = field.new_zeros(b, t, c, crop, crop)
    for i in range(b):
        for y in range(crop):
            for x in range(crop):
                p = torch.tensor(
                    [(2 * x + 1) / crop - 1, (2 * y + 1) / crop - 1], dtype=torch.float64
                )
                q = affine[i, :, :2].double() @ p + affine[i, :, 2].double()
                col = int(torch.floor((q[0] + 1) * tw / 2).clamp(0, tw - 1))
                row = int(torch.floor((q[1] + 1) * th / 2).clamp(0, th - 1))
                out[i, :, :, y, x] = field[i, :, :, row, col]
    return out


def series_indices(b: int, t_full: int, t: int, gen: torch.Generator, p_invalid: float = 0.2):
    """A view's temporal subsample: (B, t) int64 sorted indices into the full series, (B, t)
    bool validity (some steps unusable)."""
    idx = torch.stack([torch.randperm(t_full, generator=gen)[:t].sort().values for _ in range(b)])
    valid = torch.rand(b, t, generator=gen) >= p_invalid
    return idx, valid


def make_batch(
    b: int = 3,
    c_g: int = 12,
    d_f: int = 10,
    tile: int = 5,
    crop: int = 3,
    t2_full: int = 6,
    t2: int = 4,
    t1_full: int = 4,
    t1: int = 3,
    modalities=("hr", "s2", "s1"),
    seed: int = 0,
    consistent: bool = False,
    requires_grad: bool = True,
):
    """Student outputs, teacher outputs and views for two views.

    With ``consistent`` the student and teacher read the same tile field (identical features at
    the same ground and acquisition); otherwise every tensor is independent noise.
    """
    gen = torch.Generator().manual_seed(seed)
    views, students, teachers = [], [], []
    fields = {
        "hr": torch.randn(b, 1, c_g, tile, tile, generator=gen),
        "s2": torch.randn(b, t2_full, c_g, tile, tile, generator=gen),
        "s1": torch.randn(b, t1_full, c_g, tile, tile, generator=gen),
        "fused": torch.randn(b, 1, d_f, tile, tile, generator=gen),
    }
    for _ in range(2):
        aff = view_affine(b, tile, crop, gen)
        view = {"view_affine": aff}
        s_out, t_out = {}, {}
        for m in modalities:
            if m == "hr":
                idx = torch.zeros(b, 1, dtype=torch.long)
                valid = torch.rand(b, 1, generator=gen) >= 0.15
            else:
                full, t = (t2_full, t2) if m == "s2" else (t1_full, t1)
                idx, valid = series_indices(b, full, t, gen)
                view[f"{m}_index"] = idx
            if consistent:
                f = read_field(fields[m], aff, crop)
                tok = torch.gather(f, 1, idx[:, :, None, None, None].expand(-1, -1, *f.shape[2:]))
                s_tok, t_tok = tok.clone(), tok.clone()
            else:
                n = idx.shape[1]
                s_tok = torch.randn(b, n, c_g, crop, crop, generator=gen)
                t_tok = torch.randn(b, n, c_g, crop, crop, generator=gen)
            s_out[f"tokens_{m}"], t_out[f"tokens_{m}"] = s_tok, t_tok
            s_out[f"valid_{m}"] = t_out[f"valid_{m}"] = valid
        if consistent:
            fu = read_field(fields["fused"], aff, crop)[:, 0]
            s_fu, t_fu = fu.clone(), fu.clone()
        else:
            s_fu = torch.randn(b, d_f, crop, crop, generator=gen)
            t_fu = torch.randn(b, d_f, crop, crop, generator=gen)
        s_out["fused"], t_out["fused"] = s_fu, t_fu
        region = torch.randint(-1, 3, (b,), generator=gen)
        s_out["region"] = t_out["region"] = region
        if requires_grad:
            for k, v in s_out.items():
                if k.startswith("tokens_") or k == "fused":
                    v.requires_grad_(True)
        views.append(view)
        students.append(s_out)
        teachers.append(t_out)
    return students, teachers, views

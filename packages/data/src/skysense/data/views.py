"""Pre-training views: two aligned crops of one sample with their pixel correspondence.

Each view is a square crop of the sample's Sentinel tile (``crop`` pixels) with the matching HR
crop (``crop x hr_ratio`` pixels), the same flips and quarter turns for every modality, random
temporal subsampling to at most ``max_steps`` usable steps per series, date jitter, and
photometric jitter for HR only. The two crops overlap by at least ``min_overlap`` of their area.

Every random choice comes from generators seeded by ``(seed, epoch, sample_id)`` (one stream per
kind of choice, see :func:`sample_rng`): the same sample in the same epoch gets the same views
whichever backend, process or resumed run draws them. :func:`view_affine` maps a view's normalised coordinates onto the tile's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ViewConfig:
    """Augmentations of the two pre-training views (one sample -> two views).

    Attributes:
        crop: crop side in Sentinel pixels (the HR crop is ``crop x hr_ratio``); None keeps the
            whole tile. Tiny preset: 16 of the embedded sample's 24 px tiles (HR 128 of 192).
        min_overlap: least share of a view's area that the other view also covers (pixel-level
            contrast needs shared ground). The paper does not give it: a choice.
        max_steps: most time steps per series and view (paper: 20 for S2, 10 for S1), drawn
            without replacement from the usable steps and kept in date order.
        date_jitter_days: each step's date moves by a uniform integer in [-d, d] days before its
            day of year is taken (the paper's acquisition-date perturbation; size a choice).
        hflip, vflip: probability of a horizontal / vertical flip; rot90: draw 0-3 quarter turns.
        hr_jitter_p: probability that an HR view gets photometric jitter; hr_brightness,
            hr_contrast, hr_saturation: the factor is uniform in [1 - x, 1 + x].
    """

    crop: int | None = 16
    min_overlap: float = 0.3
    max_steps: dict = field(default_factory=lambda: {"s2": 20, "s1": 10})
    date_jitter_days: int = 10
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    hr_jitter_p: float = 0.8
    hr_brightness: float = 0.4
    hr_contrast: float = 0.4
    hr_saturation: float = 0.2

    def __post_init__(self):
        if self.crop is not None and self.crop < 1:
            raise ValueError(f"views.crop must be >= 1 or None, got {self.crop}")
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"views.min_overlap must lie in [0, 1], got {self.min_overlap}")
        self.max_steps = dict(self.max_steps)
        for m, t in self.max_steps.items():
            if t is not None and t < 1:
                raise ValueError(f"views.max_steps[{m!r}] must be >= 1, got {t}")
        if self.date_jitter_days < 0:
            raise ValueError(f"views.date_jitter_days must be >= 0, got {self.date_jitter_days}")

    @classmethod
    def from_dict(cls, d) -> ViewConfig:
        if d is None:
            return cls()
        if isinstance(d, ViewConfig):
            return d
        d = dict(d)
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown view_config field(s) {sorted(unknown)}")
        return cls(**d)


@dataclass
class ViewParams:
    """The random choices of one view of one sample (all in Sentinel pixels of the tile)."""

    top: int
    left: int
    size: int
    hflip: bool
    vflip: bool
    rot90: int
    steps: dict  # modality -> int64 array of step indices (sorted)
    jitter: dict  # modality -> int64 array of day offsets, one per chosen step
    photometric: tuple[float, float, float]  # HR brightness, contrast, saturation factors


STREAMS = ("crop", "flip", "time", "photometric")


def sample_rng(seed: int, epoch: int, sample_id: int) -> dict[str, np.random.Generator]:
    """Independent generators of one sample's random choices in one epoch, one per kind of
    choice, so that changing one augmentation's settings leaves the others' draws as they were."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(sample_id)])
    return {k: np.random.default_rng(c) for k, c in zip(STREAMS, ss.spawn(len(STREAMS)))}


def _overlap_candidates(tile: int, size: int):
    n = tile - size + 1
    tops, lefts = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return tops.ravel(), lefts.ravel()


def draw_views(
    rng: dict, tile: int, usable: dict, cfg: ViewConfig
) -> tuple[ViewParams, ViewParams]:
    """Two views' parameters; ``rng`` from :func:`sample_rng`, ``usable[m]`` a bool array over
    the sample's steps."""
    size = tile if cfg.crop is None else min(cfg.crop, tile)
    n = tile - size + 1
    r = rng["crop"]
    t1, l1 = int(r.integers(n)), int(r.integers(n))
    tops, lefts = _overlap_candidates(tile, size)
    overlap = (
        np.clip(size - np.abs(tops - t1), 0, None) * np.clip(size - np.abs(lefts - l1), 0, None)
    ) / float(size * size)
    ok = np.flatnonzero(overlap >= cfg.min_overlap - 1e-9)
    j = int(ok[r.integers(len(ok))])
    corners = [(t1, l1), (int(tops[j]), int(lefts[j]))]
    views = []
    for top, left in corners:
        u = rng["flip"].random(3)
        hflip, vflip = bool(u[0] < cfg.hflip), bool(u[1] < cfg.vflip)
        rot = int(u[2] * 4) if cfg.rot90 else 0
        steps, jitter = {}, {}
        for m in sorted(usable):
            idx = np.flatnonzero(usable[m])
            # Always the same draws, whatever the caps: a random key per step.
            keys = rng["time"].random(len(idx))
            cap = cfg.max_steps.get(m)
            if cap is not None and len(idx) > cap:
                idx = np.sort(idx[np.argsort(keys, kind="stable")[:cap]])
            steps[m] = idx.astype(np.int64)
            d = cfg.date_jitter_days
            u_j = rng["time"].random(len(usable[m]))[idx]
            jitter[m] = np.floor(u_j * (2 * d + 1)).astype(np.int64) - d
        u = rng["photometric"].random(4)
        if u[0] < cfg.hr_jitter_p:
            photo = (
                float(1 - cfg.hr_brightness + 2 * cfg.hr_brightness * u[1]),
                float(1 - cfg.hr_contrast + 2 * cfg.hr_contrast * u[2]),
                float(1 - cfg.hr_saturation + 2 * cfg.hr_saturation * u[3]),
            )
        else:
            photo = (1.0, 1.0, 1.0)
        views.append(ViewParams(top, left, size, hflip, vflip, rot, steps, jitter, photo))
    return views[0], views[1]


def whole_tile(tile: int, present: dict) -> ViewParams:
    """The identity "view" of plain batches: the whole tile, every present step, no jitter."""
    steps = {m: np.flatnonzero(p).astype(np.int64) for m, p in present.items()}
    return ViewParams(
        0,
        0,
        tile,
        False,
        False,
        0,
        steps,
        {m: np.zeros(len(s), np.int64) for m, s in steps.items()},
        (1.0, 1.0, 1.0),
    )


_R1 = np.array([[0.0, -1.0], [1.0, 0.0]])  # one np.rot90 turn, view -> source coordinates


def view_affine(p: ViewParams, tile: int) -> np.ndarray:
    """(2, 3) float32: view normalised coords (x right, y down, align_corners=False) -> tile's.

    The view is ``rot90(flip(crop))``: a view point p lies at ``R^k p`` in the flipped crop, at
    ``F R^k p`` in the crop, and at ``S F R^k p + t`` in the tile, with S the crop's scale and
    t its centre. The same matrix serves every modality (their crops share the footprint).
    """
    rot = np.linalg.matrix_power(_R1, p.rot90 % 4)
    flip = np.diag([-1.0 if p.hflip else 1.0, -1.0 if p.vflip else 1.0])
    scale = np.diag([p.size / tile, p.size / tile])
    t = np.array([(2 * p.left + p.size) / tile - 1.0, (2 * p.top + p.size) / tile - 1.0])
    out = np.zeros((2, 3))
    out[:, :2] = scale @ flip @ rot
    out[:, 2] = t
    return out.astype(np.float32)


@functools.cache
def dihedral(hflip: bool, vflip: bool, rot90: int) -> tuple[bool, bool, bool]:
    """(transpose, hflip', vflip') with ``flip'(transpose?(x)) == rot90(flip(x))``.

    The eight flips and quarter turns of a square are a transpose (or not) followed by flips;
    DALI has transposes and flips but no quarter turn, so its pipeline applies this form.
    """
    x = np.arange(9).reshape(3, 3)
    y = x[:, ::-1] if hflip else x
    y = y[::-1] if vflip else y
    y = np.rot90(y, rot90)
    for t in (False, True):
        for h in (False, True):
            for v in (False, True):
                z = x.T if t else x
                z = z[:, ::-1] if h else z
                z = z[::-1] if v else z
                if np.array_equal(z, y):
                    return t, h, v
    raise AssertionError("unreachable: D4 is closed")


def apply_dihedral(x: np.ndarray, p: ViewParams) -> np.ndarray:
    """Flips then quarter turns of ``p`` on the last two axes of ``x`` (..., H, W)."""
    if p.hflip:
        x = x[..., ::-1]
    if p.vflip:
        x = x[..., ::-1, :]
    if p.rot90 % 4:
        x = np.rot90(x, p.rot90, axes=(-2, -1))
    return x


GRAY = (np.float32(0.299), np.float32(0.587), np.float32(0.114))
CONTRAST_CENTRE = np.float32(128.0)


def photometric(y: np.ndarray, factors: tuple[float, float, float]) -> np.ndarray:
    """HR colour jitter on 0-255 float32 values (..., 3, H, W): brightness, contrast, saturation.

    ``y * b``; ``(y - 128) * c + 128``; ``g + s * (y - g)`` with g the luma; clipped to 0-255.
    Written as plain float32 arithmetic in this order so the DALI pipeline can do the same.
    """
    b, c, s = (np.float32(f) for f in factors)
    y = y * b
    y = (y - CONTRAST_CENTRE) * c + CONTRAST_CENTRE
    g = y[..., 0:1, :, :] * GRAY[0] + y[..., 1:2, :, :] * GRAY[1] + y[..., 2:3, :, :] * GRAY[2]
    y = g + s * (y - g)
    return np.clip(y, np.float32(0), np.float32(255))

"""From shard rows to batch dicts: what both loader backends agree on.

:class:`BatchAssembler` turns one global batch index into this rank's batch. The part that
decides (which samples, which steps, which crop, flip, jitter; how long the padded series are)
is :meth:`BatchAssembler.plan`, shared by the torch and DALI backends; the torch backend then
decodes the pixels in numpy with ``skysense.kernels.normalize_crop_flip`` (one pass per series:
crop, flips, quarter turns, normalisation), the DALI backend in a DALI pipeline.

Pixel rules (both backends): values are ``(x - mean) / std`` (HR views: photometric jitter on
0-255 values first), 0 where the pixel has no data; ``*_pixel_valid`` is True where the pixel
has data and is clear; a step is valid when the tile marks it usable and the crop holds at least
one valid pixel of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skysense.data import batch as B
from skysense.data.dates import day_of_year
from skysense.data.manifest import Manifest
from skysense.data.schedule import BatchSchedule
from skysense.data.sensors import SENSORS
from skysense.data.shards import CLEAR, HAS_DATA, STEP_USABLE, ShardReader
from skysense.data.views import (
    ViewConfig,
    ViewParams,
    apply_dihedral,
    draw_views,
    photometric,
    sample_rng,
    view_affine,
    whole_tile,
)
from skysense.kernels.modalities import DEFAULT_SENSORS

VALID = HAS_DATA | CLEAR


def band_normalisation(manifest: Manifest, modality: str, mode: str = "spec"):
    """(mean, std) float32 (C,) of a modality: the sensor spec's ("spec", as the released
    weights expect, recorded in the manifest at ingest) or the data set's own band statistics
    ("data", from the manifest)."""
    spec = SENSORS[DEFAULT_SENSORS[modality]]
    if mode == "spec":
        # The statistics of the sensors the manifest was made from (recorded at ingest, so a
        # sensor registered in that process needs no registration here). "normalization" is the
        # manifest format's meta key (every manifest written so far has it), spelt as stored.
        rec = manifest.meta.get("normalization", {}).get(modality)
        if rec is not None:
            return np.asarray(rec["mean"], np.float32), np.asarray(rec["std"], np.float32)
        return np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    if mode != "data":
        raise ValueError(f"normalisation must be 'spec' or 'data', got {mode!r}")
    stats = [manifest.band_stats.get((modality, b)) for b in spec.model_bands]
    if any(s is None for s in stats):
        raise ValueError(f"{manifest.path}: no band statistics for {modality}")
    return (
        np.asarray([s["mean"] for s in stats], np.float32),
        np.asarray([max(s["std"], 1e-6) for s in stats], np.float32),
    )


@dataclass
class SamplePlan:
    """One sample of one view in a batch: where it is and what to do with it."""

    sid: int
    shard: int
    offset: int
    params: ViewParams
    usable: dict  # modality -> (T_full,) bool: usable flags of the sample's full series
    days: dict  # modality -> (T_full,) int32


@dataclass
class BatchPlan:
    """One view of this rank's batch: its samples and the padded series lengths."""

    samples: list[SamplePlan]
    steps: dict  # modality -> padded T (longest of the global batch, >= 1)
    epoch: int
    index: int  # global batch index


class BatchAssembler:
    """Builds batches for one rank from a manifest (see the module docstring).

    Args:
        manifest: the :class:`Manifest`.
        schedule: the :class:`BatchSchedule` (order, epochs, ranks).
        modalities: those to load (default: all of the manifest).
        views: yield two views per sample (pre-training) instead of whole tiles.
        view_config: :class:`ViewConfig` of the views.
        seed: seed of every random choice (with the epoch and the sample id).
        normalisation: "spec" or "data" (see :func:`band_normalisation`).
    """

    def __init__(
        self,
        manifest: Manifest,
        schedule: BatchSchedule,
        *,
        modalities=None,
        views: bool = False,
        view_config: ViewConfig | None = None,
        seed: int = 0,
        normalisation: str = "spec",
    ):
        self.manifest = manifest
        self.schedule = schedule
        have = manifest.modalities
        if modalities is None:
            modalities = have
        modalities = tuple(m for m in B.MODALITIES if m in tuple(modalities))
        missing = [m for m in modalities if m not in have]
        if missing or not modalities:
            raise ValueError(
                f"modalities {missing or '()'} not in manifest {manifest.path} (it has {have})"
            )
        self.modalities = modalities
        self.series = tuple(m for m in modalities if m in B.SERIES)
        self.views = views
        self.view_config = ViewConfig.from_dict(view_config) if views else None
        self.seed = seed
        self.tile = int(manifest.meta["tile_size"])
        self.hr_ratio = int(manifest.meta["hr_ratio"])
        self.hr_only = bool(manifest.meta.get("hr_only"))
        self.stats = {m: band_normalisation(manifest, m, normalisation) for m in modalities}
        self.reader = ShardReader(manifest)
        self.label_kind = manifest.label_kind
        self.n_classes = len(manifest.classes)

    # ------------------------------------------------------------------------------ planning
    def _sample_meta(self, sid: int):
        shard = int(self.manifest.samples.shard[sid])
        off = int(self.manifest.samples.offset[sid])
        arrs = self.reader.arrays(shard)
        usable, present, days = {}, {}, {}
        for m in self.series:
            # Only the sample's own steps (a prefix of the shard's padded series): the random
            # draws must not depend on how long the other series of its shard are.
            step = np.asarray(arrs[f"{m}_step"][off])
            n = int((step > 0).sum())
            usable[m] = step[:n] == STEP_USABLE
            present[m] = np.ones(n, bool)
            days[m] = np.asarray(arrs[f"{m}_days"][off][:n])
        return shard, off, usable, present, days

    def plan(self, g: int) -> list[BatchPlan]:
        """The view plans (one, or two in views mode) of global batch ``g`` for this rank."""
        epoch, gids = self.schedule.global_batch(g)
        lids = set(self.schedule.local(gids).tolist())
        per_view: list[list[SamplePlan]] = [[] for _ in range(2 if self.views else 1)]
        steps = [dict.fromkeys(self.series, 1) for _ in per_view]
        for sid in gids.tolist():
            shard, off, usable, present, days = self._sample_meta(sid)
            if self.views:
                rng = sample_rng(self.seed, epoch, sid)
                params = draw_views(rng, self.tile, usable, self.view_config)
            else:
                params = (whole_tile(self.tile, present),)
            for v, p in enumerate(params):
                for m in self.series:
                    steps[v][m] = max(steps[v][m], len(p.steps[m]))
                if sid in lids:
                    per_view[v].append(SamplePlan(sid, shard, off, p, usable, days))
        # Keep this rank's samples in the global batch's order.
        order = {s: i for i, s in enumerate(gids.tolist())}
        return [
            BatchPlan(sorted(pv, key=lambda s: order[s.sid]), st, epoch, g)
            for pv, st in zip(per_view, steps)
        ]

    # ------------------------------------------------------------------- metadata (both backends)
    def meta(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        """The non-pixel arrays of a view batch: dates, indices, lat/lon, labels, affines."""
        n = len(plan.samples)
        out: dict[str, np.ndarray] = {}
        S = self.manifest.samples
        sids = np.array([s.sid for s in plan.samples], np.int64)
        for m in self.series:
            T = plan.steps[m]
            doy = np.zeros((n, T), np.int64)
            index = np.full((n, T), -1, np.int64)
            usable = np.zeros((n, T), bool)
            for i, s in enumerate(plan.samples):
                st = s.params.steps[m]
                k = len(st)
                if k:
                    raw = s.days[m][st].astype(np.int64)
                    days = raw + s.params.jitter[m]
                    # days 0 is "date unknown" (an undated image): day of year 0, no jitter.
                    doy[i, :k] = np.where(raw == 0, 0, day_of_year(days))
                    index[i, :k] = st
                    usable[i, :k] = s.usable[m][st]
            out[B.doy_key(m)] = doy
            out[B.index_key(m)] = index
            out["_usable_" + m] = usable
        if "hr" in self.modalities:
            hd = np.zeros(n, np.int64)
            for i, s in enumerate(plan.samples):
                d, st = self.hr_day(s)
                hd[i] = day_of_year(d) if (st > 0 and d != 0) else 0
            out[B.HR_DOY] = hd
        out[B.LATLON] = S.latlon[sids] if n else np.zeros((0, 2), np.float32)
        out[B.SAMPLE_ID] = sids
        if self.label_kind == "single":
            out[B.LABEL] = S.label[sids]
        elif self.label_kind == "multi":
            lab = np.zeros((n, self.n_classes), np.float32)
            for i, sid in enumerate(sids.tolist()):
                for c in S.labels[sid] or []:
                    lab[i, c] = 1.0
            out[B.LABEL] = lab
        if self.views:
            out[B.VIEW_AFFINE] = (
                np.stack([view_affine(s.params, self.tile) for s in plan.samples])
                if n
                else np.zeros((0, 2, 3), np.float32)
            )
        return out

    def hr_day(self, s: SamplePlan) -> tuple[int, int]:
        """(days since 1970 of the HR image, its step flag) of a sample."""
        arrs = self.reader.arrays(s.shard)
        return int(arrs["hr_days"][s.offset]), int(arrs["hr_step"][s.offset])

    def raw_series(self, s: SamplePlan, m: str, T: int):
        """(data (T, c, c, C) raw, mask (T, c, c) uint8) of a sample's chosen steps, cropped,
        padded to T (the layout the shards hold; flips not yet applied)."""
        arrs = self.reader.arrays(s.shard)
        p = s.params
        st = p.steps[m]
        rows = slice(p.top, p.top + p.size)
        cols = slice(p.left, p.left + p.size)
        data = arrs[m][s.offset][st, rows, cols]
        mask = arrs[f"{m}_mask"][s.offset][st, rows, cols]
        if len(st) < T:
            pad = T - len(st)
            data = np.concatenate([data, np.zeros((pad, *data.shape[1:]), data.dtype)])
            mask = np.concatenate([mask, np.zeros((pad, *mask.shape[1:]), mask.dtype)])
        return data, mask

    def raw_hr(self, s: SamplePlan):
        """(data (c*r, c*r, 3) uint8, mask (c*r, c*r) uint8) of a sample's HR crop."""
        arrs = self.reader.arrays(s.shard)
        p = s.params
        r = 1 if self.hr_only else self.hr_ratio
        rows = slice(p.top * r, (p.top + p.size) * r)
        cols = slice(p.left * r, (p.left + p.size) * r)
        return arrs["hr"][s.offset][rows, cols], arrs["hr_mask"][s.offset][rows, cols]

    # ------------------------------------------------------------------- torch backend pixels
    def decode(self, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """Pixels and metadata of one view batch, decoded here (numpy + the C++ kernel)."""
        from skysense.kernels import normalize_crop_flip

        meta = self.meta(plan)
        n = len(plan.samples)
        out: dict[str, np.ndarray] = {}
        for m in self.series:
            T = plan.steps[m]
            mean, std = self.stats[m]
            size = plan.samples[0].params.size if n else self.tile
            x = np.zeros((n, T, len(mean), size, size), np.float32)
            pv = np.zeros((n, T, size, size), bool)
            for i, s in enumerate(plan.samples):
                data, mask = self.raw_series(s, m, T)
                if m == "s1":
                    data = np.nan_to_num(data, nan=0.0)
                p = s.params
                x[i], _ = normalize_crop_flip(
                    data, mean, std, layout="THWC", hflip=p.hflip, vflip=p.vflip, rot90=p.rot90
                )
                mk = apply_dihedral(mask, p)
                x[i] *= (mk & HAS_DATA).astype(bool)[:, None]
                pv[i] = mk == VALID
            out[m] = x
            out[B.pixel_valid_key(m)] = pv
        if "hr" in self.modalities:
            mean, std = self.stats["hr"]
            r = 1 if self.hr_only else self.hr_ratio
            size = (plan.samples[0].params.size if n else self.tile) * r
            x = np.zeros((n, 3, size, size), np.float32)
            pv = np.zeros((n, size, size), bool)
            for i, s in enumerate(plan.samples):
                data, mask = self.raw_hr(s)
                p = s.params
                if self.views:
                    y, _ = normalize_crop_flip(
                        data[None],
                        np.zeros(3, np.float32),
                        np.ones(3, np.float32),
                        layout="THWC",
                        hflip=p.hflip,
                        vflip=p.vflip,
                        rot90=p.rot90,
                    )
                    y = photometric(y[0], p.photometric)
                    y = (y - mean[:, None, None]) / std[:, None, None]
                else:
                    y = normalize_crop_flip(data[None], mean, std, layout="THWC")[0][0]
                mk = apply_dihedral(mask, p)
                x[i] = y * (mk & HAS_DATA).astype(bool)[None]
                pv[i] = mk == VALID
            out["hr"] = x
            out[B.HR_PIXEL_VALID] = pv
        return self.finish(out, meta)

    def finish(self, pixels: dict, meta: dict) -> dict[str, torch.Tensor]:
        """Join pixels and metadata into the contract's batch (step validity from the pixels)."""
        batch: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            batch[m] = torch.from_numpy(np.ascontiguousarray(pixels[m]))
            if m == "hr":
                batch[B.HR_DOY] = torch.from_numpy(meta[B.HR_DOY])
                batch[B.HR_PIXEL_VALID] = torch.from_numpy(pixels[B.HR_PIXEL_VALID])
                continue
            pv = pixels[B.pixel_valid_key(m)]
            valid = meta["_usable_" + m] & pv.reshape(*pv.shape[:2], -1).any(-1)
            batch[B.doy_key(m)] = torch.from_numpy(meta[B.doy_key(m)])
            batch[B.valid_key(m)] = torch.from_numpy(valid)
            batch[B.pixel_valid_key(m)] = torch.from_numpy(pv)
            if self.views:
                batch[B.index_key(m)] = torch.from_numpy(meta[B.index_key(m)])
        for k in (B.LATLON, B.LABEL, B.SAMPLE_ID, B.VIEW_AFFINE):
            if k in meta:
                batch[k] = torch.from_numpy(np.ascontiguousarray(meta[k]))
        return batch

    def build(self, g: int):
        """This rank's batch of global batch ``g`` (a views dict in views mode)."""
        plans = self.plan(g)
        if self.views:
            return {B.VIEW1: self.decode(plans[0]), B.VIEW2: self.decode(plans[1])}
        return self.decode(plans[0])

"""The DALI backend: per-sample pixel work in a DALI pipeline, fed through ``external_source``.

Python reads each sample's chosen steps and crop window from the memory-mapped shards (a slice,
no decoding) together with the view's random parameters (drawn by the same seeded code as the
torch backend, :meth:`BatchAssembler.plan`); the pipeline then, per sample and in ``num_threads``
threads, applies the flips and quarter turns (as a transpose plus flips), casts, HR photometric
jitter, normalisation, the no-data zeroing, the per-pixel validity and the channels-first
layout. With ``device="gpu"`` (a CUDA machine) those operators run on the GPU after one host
to device copy per input (written, not yet run on a GPU); by default they run on the CPU.

Compressed shards (:mod:`skysense.data.shard_codecs`): each HR crop is decoded inside the
pipeline by ``fn.decoders.image_slice`` (only the crop's region; ``device="mixed"``, i.e. on the
GPU, with GPU operators, so the largest part of a sample never crosses to the host decoded), and
the Sentinel-2 series by DALI's image decoder before slicing (:mod:`skysense.data.dali_decode`).
The lossless codecs give the raw shards' values, so batches equal those of raw shards.

The arithmetic is written in the same order as the numpy path, so the two backends agree bit for
bit on the CPU (the tests check it).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from skysense.data import batch as B
from skysense.data.assemble import BatchAssembler, BatchPlan
from skysense.data.views import CONTRAST_CENTRE, GRAY, dihedral

log = logging.getLogger(__name__)


def hr_encoded(assembler: BatchAssembler) -> bool:
    """True when the manifest's HR tiles are stored encoded (compressed shards): the pipeline
    then decodes each sample's HR crop itself (``fn.decoders.image_slice``)."""
    cfg = assembler.manifest.meta.get("config") or {}
    return "hr" in assembler.modalities and cfg.get("shard_format") == "compressed"


def _build_pipeline(assembler: BatchAssembler, num_threads: int, device: str):
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    views = assembler.views
    series = assembler.series
    has_hr = "hr" in assembler.modalities
    hr_enc = hr_encoded(assembler)
    gpu = device == "gpu"

    def to_device(x):
        return x.gpu() if gpu else x

    @pipeline_def(
        batch_size=assembler.schedule.batch_size,
        num_threads=num_threads,
        device_id=0 if gpu else None,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
        enable_conditionals=True,
    )
    def pipe():
        t = fn.external_source(name="transpose", dtype=types.BOOL, ndim=0)
        hf = fn.external_source(name="hflip", dtype=types.INT32, ndim=0)
        vf = fn.external_source(name="vflip", dtype=types.INT32, ndim=0)
        outs = []
        for m in series:
            x = fn.external_source(name=m, ndim=4, layout="FHWC")
            mask = fn.external_source(name=f"{m}_mask", dtype=types.UINT8, ndim=4, layout="FHWC")
            mean = fn.external_source(name=f"{m}_mean", dtype=types.FLOAT, ndim=1)
            std = fn.external_source(name=f"{m}_std", dtype=types.FLOAT, ndim=1)
            x, mask = to_device(x), to_device(mask)
            # A transpose then flips: the dihedral form of flips followed by quarter turns.
            if t:
                x = fn.transpose(x, perm=[0, 2, 1, 3], transpose_layout=False)
                mask = fn.transpose(mask, perm=[0, 2, 1, 3], transpose_layout=False)
            else:
                x, mask = x, mask
            x = fn.flip(x, horizontal=hf, vertical=vf)
            mask = fn.flip(mask, horizontal=hf, vertical=vf)
            y = (fn.cast(x, dtype=types.FLOAT) - mean) / std
            y = y * fn.cast(mask & 1, dtype=types.FLOAT)
            outs.append(fn.transpose(y, perm=[0, 3, 1, 2], transpose_layout=False))
            outs.append(fn.transpose(mask == 3, perm=[0, 3, 1, 2], transpose_layout=False))
        if has_hr:
            if hr_enc:
                # Only the crop is decoded (JPEG / PNG region decoding), on the GPU with "mixed".
                enc = fn.external_source(name="hr_enc", dtype=types.UINT8, ndim=1)
                anchor = fn.external_source(name="hr_anchor", dtype=types.INT32, ndim=1)
                shape = fn.external_source(name="hr_shape", dtype=types.INT32, ndim=1)
                x = fn.decoders.image_slice(
                    enc,
                    anchor,
                    shape,
                    device="mixed" if gpu else "cpu",
                    output_type=types.RGB,
                    axis_names="HW",
                    normalized_anchor=False,
                    normalized_shape=False,
                )
            else:
                x = to_device(
                    fn.external_source(name="hr", dtype=types.UINT8, ndim=3, layout="HWC")
                )
            mask = fn.external_source(name="hr_mask", dtype=types.UINT8, ndim=3, layout="HWC")
            mean = fn.external_source(name="hr_mean", dtype=types.FLOAT, ndim=1)
            std = fn.external_source(name="hr_std", dtype=types.FLOAT, ndim=1)
            photo = fn.external_source(name="hr_photometric", dtype=types.FLOAT, ndim=1)
            mask = to_device(mask)
            if t:
                x = fn.transpose(x, perm=[1, 0, 2], transpose_layout=False)
                mask = fn.transpose(mask, perm=[1, 0, 2], transpose_layout=False)
            else:
                x, mask = x, mask
            x = fn.flip(x, horizontal=hf, vertical=vf)
            mask = fn.flip(mask, horizontal=hf, vertical=vf)
            y = fn.cast(x, dtype=types.FLOAT)
            if views:  # the same float32 arithmetic, in the same order, as views.photometric
                b, c, s = photo[0], photo[1], photo[2]
                y = y * b
                y = (y - float(CONTRAST_CENTRE)) * c + float(CONTRAST_CENTRE)
                g = (
                    y[:, :, 0:1] * float(GRAY[0])
                    + y[:, :, 1:2] * float(GRAY[1])
                    + y[:, :, 2:3] * float(GRAY[2])
                )
                y = g + s * (y - g)
                y = dmath.clamp(y, 0.0, 255.0)
            y = (y - mean) / std
            y = y * fn.cast(mask & 1, dtype=types.FLOAT)
            outs.append(fn.transpose(y, perm=[2, 0, 1], transpose_layout=False))
            outs.append(fn.squeeze(mask == 3, axes=[2]))
        return tuple(outs)

    p = pipe()
    p.build()
    return p


class DaliBatches:
    """Iterates the assembler's schedule, decoding each view batch in a DALI pipeline."""

    def __init__(self, assembler: BatchAssembler, num_threads: int = 1, device: str | None = None):
        # CPU operators unless asked: the GPU placement has not run on a GPU yet (none here),
        # and CPU batches are what the torch backend yields too.
        device = device or "cpu"
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("DALI device='gpu' asked for but CUDA is not available")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"DALI device must be 'cpu' or 'gpu', got {device!r}")
        self.assembler = assembler
        self.device = device
        # compressed shards: DALI's image decoder, on the GPU (nvJPEG) with GPU operators
        self.decoder = "mixed" if device == "gpu" else "cpu"
        self.hr_encoded = hr_encoded(assembler)
        self.num_threads = num_threads
        self._pipe = None

    def _decode_encoded(self, plan: BatchPlan) -> list:
        """Compressed shards: decode the plan's samples with DALI's image decoder (one batch
        per codec) into the shards' caches, which the slicing below then reads. Returns the
        arrays whose caches to clear after the batch."""
        from skysense.data.shard_codecs import EncodedArray

        todo: dict = {}
        for s in plan.samples:
            arrs = self.assembler.reader.arrays(s.shard)
            for m in self.assembler.series:  # HR crops are decoded inside the pipeline
                x = arrs.get(m)
                if isinstance(x, EncodedArray) and x.codec not in ("deflate-shuffle", "deflate"):
                    todo.setdefault((x.codec, x.shape[1:]), []).append((x, s.offset))
        if not todo:
            return []
        from skysense.data.dali_decode import decode_batch

        used = []
        for (codec, shape), items in todo.items():
            bufs = [x.encoded(o) for x, o in items]
            for (x, o), y in zip(items, decode_batch(bufs, codec, shape, self.decoder)):
                x.cache[int(o)] = y
                used.append(x)
        return used

    def _feed(self, pipe, plan: BatchPlan) -> None:
        used = self._decode_encoded(plan)
        try:
            self._feed_arrays(pipe, plan)
        finally:
            for x in used:
                x.cache.clear()

    def _feed_arrays(self, pipe, plan: BatchPlan) -> None:
        a = self.assembler
        forms = [dihedral(s.params.hflip, s.params.vflip, s.params.rot90) for s in plan.samples]
        pipe.feed_input("transpose", [np.array(f[0]) for f in forms])
        pipe.feed_input("hflip", [np.array(int(f[1]), np.int32) for f in forms])
        pipe.feed_input("vflip", [np.array(int(f[2]), np.int32) for f in forms])
        for m in a.series:
            T = plan.steps[m]
            data, masks = [], []
            for s in plan.samples:
                x, mk = a.raw_series(s, m, T)
                if m == "s1":
                    x = np.nan_to_num(x, nan=0.0)
                data.append(np.ascontiguousarray(x))
                masks.append(np.ascontiguousarray(mk[..., None]))
            mean, std = a.stats[m]
            pipe.feed_input(m, data)
            pipe.feed_input(f"{m}_mask", masks)
            pipe.feed_input(f"{m}_mean", [mean] * len(data))
            pipe.feed_input(f"{m}_std", [std] * len(data))
        if "hr" in a.modalities:
            data, masks = [], []
            if self.hr_encoded:
                r = 1 if a.hr_only else a.hr_ratio
                anchors, shapes = [], []
                for s in plan.samples:
                    p = s.params
                    arrs = a.reader.arrays(s.shard)
                    y0, x0, side = p.top * r, p.left * r, p.size * r
                    data.append(np.asarray(arrs["hr"].encoded(s.offset)))
                    anchors.append(np.array([y0, x0], np.int32))
                    shapes.append(np.array([side, side], np.int32))
                    mk = arrs["hr_mask"][s.offset][y0 : y0 + side, x0 : x0 + side]
                    masks.append(np.ascontiguousarray(mk[..., None]))
                pipe.feed_input("hr_anchor", anchors)
                pipe.feed_input("hr_shape", shapes)
            else:
                for s in plan.samples:
                    x, mk = a.raw_hr(s)
                    data.append(np.ascontiguousarray(x))
                    masks.append(np.ascontiguousarray(mk[..., None]))
            mean, std = a.stats["hr"]
            pipe.feed_input("hr_enc" if self.hr_encoded else "hr", data)
            pipe.feed_input("hr_mask", masks)
            pipe.feed_input("hr_mean", [mean] * len(data))
            pipe.feed_input("hr_std", [std] * len(data))
            if a.views:  # plain batches have no photometric input (DALI prunes unused ones)
                pipe.feed_input(
                    "hr_photometric",
                    [np.asarray(s.params.photometric, np.float32) for s in plan.samples],
                )

    def _to_numpy(self, out) -> np.ndarray:
        if self.device == "gpu":
            out = out.as_cpu()
        return out.as_array()

    def _decode(self, plan: BatchPlan) -> dict:
        a = self.assembler
        if self._pipe is None:
            self._pipe = _build_pipeline(a, self.num_threads, self.device)
        meta = a.meta(plan)
        if not plan.samples:
            raise ValueError(f"global batch {plan.index}: no sample for this rank")
        self._feed(self._pipe, plan)
        outs = list(self._pipe.run())
        pixels = {}
        for m in a.series:
            pixels[m] = self._to_numpy(outs.pop(0))
            pixels[B.pixel_valid_key(m)] = self._to_numpy(outs.pop(0))[:, :, 0]
        if "hr" in a.modalities:
            pixels["hr"] = self._to_numpy(outs.pop(0))
            pixels[B.HR_PIXEL_VALID] = self._to_numpy(outs.pop(0))
        return a.finish(pixels, meta)

    def __iter__(self):
        a = self.assembler
        for g in a.schedule:
            plans = a.plan(g)
            if a.views:
                yield {B.VIEW1: self._decode(plans[0]), B.VIEW2: self._decode(plans[1])}
            else:
                yield self._decode(plans[0])

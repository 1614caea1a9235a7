"""DALI decoding of compressed shards: ``fn.decoders.image`` over a batch of encoded samples.

``decode_batch(buffers, codec, shape, device)`` decodes the buffers of one encoded modality
(:mod:`skysense.data.shard_codecs`) in a DALI pipeline: ``device="cpu"`` (CPU pipelines run
without a GPU: ``device_id=None``) or ``"mixed"`` (nvJPEG / nvImageCodec on the GPU; written,
not yet run on a GPU). 16-bit PNG mosaics are decoded as UINT16 and reshaped to the series
layout (T, h, w, C) inside the pipeline; HR tiles decode to (H, W, 3) uint8. Lossless codecs give
exactly the values Pillow gives (tested). ``deflate-shuffle`` (Sentinel-1 float32) has no image
decoder: it is decoded by numpy.
"""

from __future__ import annotations

import numpy as np

from skysense.data.shard_codecs import decode

MAX_BATCH = 64
_PIPES: dict = {}


def _pipeline(codec: str, shape: tuple, device: str):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(
        batch_size=MAX_BATCH,
        num_threads=1,
        device_id=0 if device == "mixed" else None,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def pipe():
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        if codec == "png16":
            T, h, w, C = shape
            x = fn.decoders.image(
                enc, device=device, output_type=types.ANY_DATA, dtype=types.UINT16
            )
            x = fn.reshape(x, shape=[T, h, C, w])
            return fn.transpose(x, perm=[0, 1, 3, 2])
        return fn.decoders.image(enc, device=device, output_type=types.RGB)

    p = pipe()
    p.build()
    return p


def decode_batch(buffers, codec: str, shape, device: str = "cpu") -> list[np.ndarray]:
    """Decode ``buffers`` (1-D uint8 arrays) of ``codec`` into samples of ``shape`` (the raw
    shard's per-sample shape) with DALI; returns numpy arrays (uint16 (T, h, w, C) for png16,
    uint8 (H, W, 3) for jpeg/png, float32 for deflate-shuffle, decoded by numpy)."""
    shape = tuple(int(s) for s in shape)
    if codec in ("deflate-shuffle", "deflate"):
        return [decode(b, codec, shape) for b in buffers]
    if device not in ("cpu", "mixed"):
        raise ValueError(f"DALI decoder device must be 'cpu' or 'mixed', got {device!r}")
    key = (codec, shape, device)
    if key not in _PIPES:
        _PIPES[key] = _pipeline(codec, shape, device)
    p = _PIPES[key]
    out: list[np.ndarray] = []
    for i in range(0, len(buffers), MAX_BATCH):
        chunk = [np.ascontiguousarray(b, np.uint8) for b in buffers[i : i + MAX_BATCH]]
        p.feed_input("enc", chunk)
        (res,) = p.run()
        if device == "mixed":
            res = res.as_cpu()
        out.extend(np.array(res.at(j)) for j in range(len(chunk)))
    return out

"""Compressed shards: one encoded buffer per sample and modality, decoded on read.

``shard_format=compressed`` (an ingest setting) stores a shard's pixel arrays (``hr``, ``s2``,
``s1``) as ``<m>.enc`` (the samples' encoded buffers, one after the other) and
``<m>_index.npy`` ((N, 2) int64: byte offset and length of each sample's buffer), and so are
the per-pixel masks; days and steps stay ``.npy``. Codecs, chosen by measurement
(``bench/test_bench_data.py``):

=============== ================================================== ==========================
modality        codec                                              decoded by
=============== ================================================== ==========================
``hr``          ``jpeg`` (quality ``jpeg_quality``; lossy) or      DALI (the crop's region,
                ``png`` (lossless), (H, W, 3) uint8                ``image_slice``), Pillow
``s2``          ``png16``: the sample's series as one 16-bit       DALI (``dtype=UINT16``),
                grey PNG mosaic (T*h, 10*w): row block t = step    Pillow
                t, column block c = band c (lossless)
``s1``          ``deflate-shuffle``: float32 bytes split into      numpy + zlib (no image
                byte planes, then zlib (lossless; NaN kept)        codec takes float32)
``<m>_mask``    ``deflate`` (zlib of the uint8 bits; lossless)     numpy + zlib
=============== ================================================== ==========================

16-bit PNG was kept for Sentinel-2 over plain deflate because DALI decodes it (on the GPU
with ``device="mixed"``) and it compresses noisy L1C/L2A tiles as well as deflate (1.4-1.5x
against deflate's 1.3x on the OSCD cities; byte-shuffled deflate reaches 1.6x but only the
CPU decodes it). Decoding is exact for the lossless codecs: DALI and Pillow give the values
that were written (tested).

:class:`EncodedArray` gives a shard's encoded modality the indexing the loaders use on memory
maps: ``a[i]`` is sample ``i`` decoded (the shape and dtype of the raw shard's ``a[i]``).
"""

from __future__ import annotations

import io
import zlib

import numpy as np

from skysense.kernels.modalities import MODALITIES

CODECS = ("jpeg", "png", "png16", "deflate-shuffle", "deflate")
PNG_LEVEL = 1  # zlib level of the PNGs: level 6 gains ~4 % on S2 and encodes 2.5x slower


def codecs_for(hr_codec: str = "jpeg") -> dict[str, str]:
    """{modality: codec} of a compressed shard."""
    if hr_codec not in ("jpeg", "png"):
        raise ValueError(f"hr_codec must be 'jpeg' or 'png', got {hr_codec!r}")
    masks = {f"{m}_mask": "deflate" for m in MODALITIES}
    return {"hr": hr_codec, "s2": "png16", "s1": "deflate-shuffle", **masks}


def _pil():
    from PIL import Image

    return Image


def encode(x: np.ndarray, codec: str, quality: int = 90) -> bytes:
    """One sample's pixels -> bytes. ``x``: (H, W, 3) uint8 (jpeg, png), (T, h, w, C) uint16
    (png16), any float32 array (deflate-shuffle)."""
    if codec in ("jpeg", "png"):
        buf = io.BytesIO()
        img = _pil().fromarray(np.ascontiguousarray(x, np.uint8), "RGB")
        if codec == "jpeg":
            img.save(buf, format="JPEG", quality=int(quality))
        else:
            img.save(buf, format="PNG", compress_level=PNG_LEVEL)
        return buf.getvalue()
    if codec == "png16":
        T, h, w, C = x.shape
        mosaic = np.ascontiguousarray(x.astype(np.uint16).transpose(0, 1, 3, 2)).reshape(
            T * h, C * w
        )
        # (T, h, C, w) -> rows t*h + y, columns c*w + x
        buf = io.BytesIO()
        _pil().fromarray(mosaic).save(buf, format="PNG", compress_level=PNG_LEVEL)
        return buf.getvalue()
    if codec == "deflate":
        return zlib.compress(np.ascontiguousarray(x, np.uint8).tobytes(), 6)
    if codec == "deflate-shuffle":
        b = np.ascontiguousarray(x, np.float32).view(np.uint8).reshape(-1, 4)
        return zlib.compress(np.ascontiguousarray(b.T).tobytes(), 6)
    raise ValueError(f"unknown codec {codec!r}; known: {CODECS}")


def mosaic_to_series(m: np.ndarray, shape) -> np.ndarray:
    """A decoded png16 mosaic ((T*h, C*w) or (T*h, C*w, 1)) -> (T, h, w, C)."""
    T, h, w, C = shape
    return np.ascontiguousarray(m.reshape(T, h, C, w).transpose(0, 1, 3, 2))


def decode(buf, codec: str, shape) -> np.ndarray:
    """Bytes -> one sample's pixels of ``shape`` (the raw shard's per-sample shape)."""
    if codec in ("jpeg", "png"):
        img = _pil().open(io.BytesIO(bytes(buf)))
        return np.asarray(img.convert("RGB"), np.uint8)
    if codec == "png16":
        m = np.asarray(_pil().open(io.BytesIO(bytes(buf))))
        return mosaic_to_series(m.astype(np.uint16, copy=False), shape)
    if codec == "deflate":
        return np.frombuffer(zlib.decompress(bytes(buf)), np.uint8).reshape(shape).copy()
    if codec == "deflate-shuffle":
        planes = np.frombuffer(zlib.decompress(bytes(buf)), np.uint8).reshape(4, -1)
        return np.ascontiguousarray(planes.T).view(np.float32).reshape(shape)
    raise ValueError(f"unknown codec {codec!r}; known: {CODECS}")


def write_encoded(folder, name: str, x: np.ndarray, codec: str, quality: int = 90) -> dict:
    """Encode ``x`` ((N, ...) samples) into ``folder/<name>.enc`` + ``<name>_index.npy``;
    returns the shard.json entry."""
    index = np.zeros((len(x), 2), np.int64)
    pos = 0
    with open(f"{folder}/{name}.enc", "wb") as f:
        for i in range(len(x)):
            b = encode(x[i], codec, quality)
            f.write(b)
            index[i] = pos, len(b)
            pos += len(b)
    np.save(f"{folder}/{name}_index.npy", index)
    return {"codec": codec, "shape": list(x.shape), "dtype": x.dtype.name}


class EncodedArray:
    """A shard's encoded modality, read like the raw memory map: ``a[i]`` decodes sample ``i``
    (then applies any further index); ``a.encoded(i)`` is its buffer (uint8, for DALI);
    ``a.cache`` ({i: decoded sample}) holds samples decoded in a batch elsewhere."""

    def __init__(self, folder, name: str, info: dict):
        self.codec = info["codec"]
        self.shape = tuple(info["shape"])
        self.dtype = np.dtype(info["dtype"])
        self.index = np.load(f"{folder}/{name}_index.npy")
        self.data = np.memmap(f"{folder}/{name}.enc", np.uint8, mode="r")
        # samples decoded elsewhere (the DALI backend decodes a batch at once, then reads here)
        self.cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes_encoded(self) -> int:
        return int(self.index[:, 1].sum())

    def encoded(self, i: int) -> np.ndarray:
        off, n = self.index[int(i)]
        return self.data[off : off + n]

    def __getitem__(self, idx):
        rest = ()
        if isinstance(idx, tuple):
            idx, rest = idx[0], idx[1:]
        if isinstance(idx, (int, np.integer)):
            x = self.cache.get(int(idx))
            if x is None:
                x = decode(self.encoded(idx), self.codec, self.shape[1:])
            return x[rest] if rest else x
        ids = np.arange(self.shape[0])[idx]
        x = np.stack([decode(self.encoded(i), self.codec, self.shape[1:]) for i in ids])
        return x[(slice(None), *rest)] if rest else x

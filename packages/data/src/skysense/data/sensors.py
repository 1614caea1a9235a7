"""The sensor registry: what each sensor's bands are, how to read them, and how to normalise them.

A :class:`SensorSpec` names a product's bands in file order, their centre wavelengths and native
ground sampling distance, the dtype its files come in, the subset of bands the model takes (in
the model's order) and the normalisation statistics that go with the released weights (see
``../shared/docs/skysense-spec.md``). Ingest uses the spec to find and check band files; the
loaders use it to normalise.

Built in: ``hr_rgb`` (aerial / VHR RGB), ``s2_l1c`` (13 bands), ``s2_l2a`` (12 bands: L2A drops
B10), ``s1_grd_db`` (VV, VH backscatter in dB) and ``s1_grd_linear`` (VV, VH linear power,
converted to dB at ingest). :func:`register_sensor` adds another.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

import numpy as np

from skysense.kernels.modalities import MODALITIES

log = logging.getLogger(__name__)

# Centre wavelengths of Sentinel-2A's MSI (ESA S2 User Handbook), nm.
_S2_WAVELENGTHS = {
    "B1": 442.7,
    "B2": 492.4,
    "B3": 559.8,
    "B4": 664.6,
    "B5": 704.1,
    "B6": 740.5,
    "B7": 782.8,
    "B8": 832.8,
    "B8A": 864.7,
    "B9": 945.1,
    "B10": 1373.5,
    "B11": 1613.7,
    "B12": 2202.4,
}
_S2_GSD = {
    "B1": 60.0,
    "B2": 10.0,
    "B3": 10.0,
    "B4": 10.0,
    "B5": 20.0,
    "B6": 20.0,
    "B7": 20.0,
    "B8": 10.0,
    "B8A": 20.0,
    "B9": 60.0,
    "B10": 60.0,
    "B11": 20.0,
    "B12": 20.0,
}
S2_MODEL_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
# The spec's statistics of Sentinel-2 L2A digital numbers (reflectance x 10000).
S2_MEAN = (884.3, 1144.2, 1297.5, 1624.9, 2194.6, 2422.2, 2517.8, 2581.6, 2368.5, 1805.1)
S2_STD = (1155.2, 1183.6, 1368.1, 1370.3, 1355.6, 1416.5, 1474.8, 1439.3, 1455.5, 1343.5)
S1_MEAN = (-12.548, -20.192)
S1_STD = (5.257, 5.912)
# ImageNet statistics on 0-255 values, as the released HR weights expect.
HR_MEAN = (123.675, 116.28, 103.53)
HR_STD = (58.395, 57.12, 57.375)
# Sentinel-1 C band: 5.405 GHz.
_S1_WAVELENGTH_NM = 299_792_458.0 / 5.405e9 * 1e9


@dataclass(frozen=True)
class SensorSpec:
    """One sensor product.

    Attributes:
        name: registry key, e.g. ``"s2_l2a"``.
        modality: which batch modality it feeds: ``"hr"``, ``"s2"`` or ``"s1"``.
        bands: every band of the product, in the order of a full stack.
        wavelengths_nm: centre wavelength of each band of ``bands`` (SAR: the radar wavelength).
        gsd: native ground sampling distance of each band of ``bands``, metres (``None`` where it
            varies from one file to the next, as for aerial RGB).
        dtype: the dtype its files carry and the shards store (``uint16`` digital numbers,
            ``float32`` dB, ``uint8`` RGB).
        model_bands: the bands the model takes, in the model's order (a subset of ``bands``).
        mean, std: normalisation statistics of ``model_bands`` in :attr:`units` after
            :meth:`to_model_units` (the statistics of the released weights).
        nodata: the value that means "no data" when a file does not declare one (Sentinel-2
            uses 0), or ``None``.
        units: the units of the stored values: ``"dn"``, ``"db"``, ``"linear"``, ``"rgb8"``.
        accepted_dtypes: file dtypes ingest accepts for this sensor; anything else is bad input.
        min_value, max_value: the physical range of a valid value (after :meth:`to_model_units`);
            ingest reports a file whose valid pixels lie mostly outside it (e.g. linear power
            declared as dB).
        description: one line for people.
    """

    name: str
    modality: str
    bands: tuple[str, ...]
    wavelengths_nm: tuple[float, ...]
    gsd: tuple[float | None, ...]
    dtype: str
    model_bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    nodata: float | None = None
    units: str = "dn"
    accepted_dtypes: tuple[str, ...] = ()
    min_value: float = -np.inf
    max_value: float = np.inf
    description: str = ""
    aliases: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(
                f"sensor {self.name!r}: modality must be one of {MODALITIES}, got {self.modality!r}"
            )
        n = len(self.bands)
        for attr in ("wavelengths_nm", "gsd"):
            if len(getattr(self, attr)) != n:
                raise ValueError(
                    f"sensor {self.name!r}: {attr} has {len(getattr(self, attr))} entries for "
                    f"{n} bands {self.bands}"
                )
        missing = [b for b in self.model_bands if b not in self.bands]
        if missing:
            raise ValueError(f"sensor {self.name!r}: model bands {missing} not in bands")
        for attr in ("mean", "std"):
            if len(getattr(self, attr)) != len(self.model_bands):
                raise ValueError(
                    f"sensor {self.name!r}: {attr} has {len(getattr(self, attr))} entries for "
                    f"{len(self.model_bands)} model bands"
                )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"sensor {self.name!r}: std must be positive, got {self.std}")
        if not self.accepted_dtypes:
            object.__setattr__(self, "accepted_dtypes", (self.dtype,))

    @property
    def n_bands(self) -> int:
        return len(self.bands)

    @property
    def model_index(self) -> tuple[int, ...]:
        """Positions of ``model_bands`` within ``bands``."""
        return tuple(self.bands.index(b) for b in self.model_bands)

    def canonical_band(self, token: str) -> str | None:
        """The band of this sensor that a file-name token or band description names, or None.

        ``"B02"``, ``"b2"`` and ``"B2"`` all name ``"B2"``; ``"vv"`` names ``"VV"``.
        """
        t = token.strip().upper()
        t = self.aliases.get(t, t)
        m = re.fullmatch(r"B0*(\d{1,2}A?)", t)
        if m:
            t = "B" + m.group(1)
        return t if t in self.bands else None

    def native_gsd(self, band: str) -> float | None:
        return self.gsd[self.bands.index(band)]

    def to_model_units(self, x: np.ndarray) -> np.ndarray:
        """Values as read (after the file's scale/offset) -> the units of :attr:`mean`.

        Identity except for linear-power SAR, which becomes dB (floored at -50 dB, because
        log10(0) has no meaning and speckle does reach 0).
        """
        if self.units == "linear":
            x = np.asarray(x, dtype=np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                out = 10.0 * np.log10(np.maximum(x, np.float32(1e-5)))
            return np.where(np.isfinite(x), out, np.nan).astype(np.float32)
        return x

    @property
    def stored_units(self) -> str:
        """Units of the values in the shards (linear SAR is stored in dB)."""
        return "db" if self.units == "linear" else self.units


SENSORS: dict[str, SensorSpec] = {}


def register_sensor(spec: SensorSpec, *, overwrite: bool = False) -> SensorSpec:
    """Add ``spec`` to :data:`SENSORS` under ``spec.name``.

    Raises ValueError if the name is taken (pass ``overwrite=True`` to replace it on purpose).
    """
    if not isinstance(spec, SensorSpec):
        raise TypeError(f"register_sensor takes a SensorSpec, got {type(spec).__name__}")
    if spec.name in SENSORS and not overwrite:
        raise ValueError(
            f"sensor {spec.name!r} is already registered; pass overwrite=True to replace it"
        )
    SENSORS[spec.name] = spec
    return spec


def get_sensor(name: str | SensorSpec) -> SensorSpec:
    """The spec registered as ``name`` (a spec passes through); a clear KeyError otherwise."""
    if isinstance(name, SensorSpec):
        return name
    try:
        return SENSORS[name]
    except KeyError:
        raise KeyError(
            f"unknown sensor {name!r}; registered: {sorted(SENSORS)} (add one with "
            "skysense.data.sensors.register_sensor)"
        ) from None


def _s2(name: str, bands: tuple[str, ...], description: str) -> SensorSpec:
    return SensorSpec(
        name=name,
        modality="s2",
        bands=bands,
        wavelengths_nm=tuple(_S2_WAVELENGTHS[b] for b in bands),
        gsd=tuple(_S2_GSD[b] for b in bands),
        dtype="uint16",
        model_bands=S2_MODEL_BANDS,
        # The spec gives L2A statistics only; L1C (top of atmosphere) reuses them: a choice,
        # documented here. The manifest's band_stats table holds a data set's own statistics.
        mean=S2_MEAN,
        std=S2_STD,
        nodata=0,
        units="dn",
        # Float files are accepted when they declare a scale (reflectance); ingest scales them.
        accepted_dtypes=("uint16", "int16", "float32", "float64"),
        min_value=0.0,
        max_value=65535.0,
        description=description,
    )


register_sensor(
    _s2(
        "s2_l1c",
        ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"),
        "Sentinel-2 MSI Level-1C top-of-atmosphere reflectance x 10000, 13 bands",
    )
)
register_sensor(
    _s2(
        "s2_l2a",
        ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"),
        "Sentinel-2 MSI Level-2A surface reflectance x 10000, 12 bands (no B10)",
    )
)
register_sensor(
    SensorSpec(
        name="s1_grd_db",
        modality="s1",
        bands=("VV", "VH"),
        wavelengths_nm=(_S1_WAVELENGTH_NM, _S1_WAVELENGTH_NM),
        gsd=(10.0, 10.0),
        dtype="float32",
        model_bands=("VV", "VH"),
        mean=S1_MEAN,
        std=S1_STD,
        nodata=None,
        units="db",
        accepted_dtypes=("float32", "float64"),
        min_value=-60.0,
        max_value=40.0,
        description="Sentinel-1 IW GRD backscatter (sigma0 / gamma0) VV and VH in dB",
    )
)
register_sensor(  # the same product in linear power, converted to dB at ingest
    replace(
        SENSORS["s1_grd_db"],
        name="s1_grd_linear",
        units="linear",
        description="Sentinel-1 IW GRD backscatter VV and VH in linear power (stored as dB)",
    )
)
register_sensor(
    SensorSpec(
        name="hr_rgb",
        modality="hr",
        bands=("R", "G", "B"),
        # WorldView-3 red, green and blue centres.
        wavelengths_nm=(660.0, 545.0, 480.0),
        gsd=(None, None, None),
        dtype="uint8",
        model_bands=("R", "G", "B"),
        mean=HR_MEAN,
        std=HR_STD,
        nodata=None,
        units="rgb8",
        accepted_dtypes=("uint8",),
        min_value=0.0,
        max_value=255.0,
        description="High-resolution optical RGB, 8 bits (aerial or VHR satellite)",
        aliases={"RED": "R", "GREEN": "G", "BLUE": "B"},
    )
)

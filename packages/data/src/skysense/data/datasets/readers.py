"""Reading one image of a dataset with its bands mapped by name, and checking it against the
sensor the dataset declares.

Which band of a file is which comes, in this order, from: the file's band descriptions (when
every band has one that names a band), the order the dataset declares for its files (EuroSAT MS:
B01..B12 then B8A), or the file's profile when that is unambiguous (3 or 4 uint8 bands: R G B
[alpha]; 12 bands: Sentinel-2 L2A in band order; 10 bands: the model's bands; 2 float bands: VV
VH). A 13-band file without descriptions or a declared order is an error: the standard order
(B8A after B8) and EuroSAT's (B8A last) cannot be told apart from the file.

Checks, each a one-line :class:`~skysense.data.datasets.base.DatasetError` naming the file:
the bands found against the bands expected (multispectral where RGB is expected and the
reverse), the dtype against the sensor's accepted dtypes, and the value range of the valid
pixels against the sensor's physical range (reflectance 0-1 where digital numbers are expected,
linear power where dB is expected, 16-bit values where 8-bit RGB is expected).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from affine import Affine

from skysense.data.datasets.base import BandMismatchError, DatasetError

# Band orders of distributed files, by name.
S2_L1C_ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
S2_L2A_ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
EUROSAT_MS_ORDER = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B8A",
)  # fmt: skip
BAND_ORDERS = {"eurosat": EUROSAT_MS_ORDER, "s2_l1c": S2_L1C_ORDER, "s2_l2a": S2_L2A_ORDER}


class AmbiguousBandsError(DatasetError):
    """A file whose band order cannot be told from the file itself."""


def _open(path):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            return rasterio.open(path)
        except RasterioIOError as e:
            raise DatasetError(f"{path}: unreadable ({e})") from None


def _canonical(desc: str) -> str | None:
    """The band a description names in any built-in sensor, or None."""
    from skysense.data.sensors import SENSORS

    for spec in SENSORS.values():
        b = spec.canonical_band(desc)
        if b is not None:
            return b
    return None


def file_band_names(ds, declared: Sequence[str] | None = None) -> list[str]:
    """The band name of each band of an open rasterio dataset (see the module docstring)."""
    descs = list(ds.descriptions or [])
    if descs and all(descs):
        names = [_canonical(d) for d in descs]
        if all(names) and len(set(names)) == len(names):
            return names
    count, dtype = ds.count, np.dtype(ds.dtypes[0])
    if declared is not None:
        if len(declared) != count:
            raise BandMismatchError(
                ds.name, [f"{count} unnamed bands"], declared, "the file has another band count"
            )
        return list(declared)
    if dtype == np.uint8 and count in (3, 4):
        return ["R", "G", "B"] + (["alpha"] if count == 4 else [])
    if count == 12:
        return list(S2_L2A_ORDER)
    if count == 10:
        from skysense.data.sensors import S2_MODEL_BANDS

        return list(S2_MODEL_BANDS)
    if count == 2 and np.issubdtype(dtype, np.floating):
        return ["VV", "VH"]
    if count == 13:
        raise AmbiguousBandsError(
            f"{ds.name}: 13 bands without band descriptions: their order is ambiguous "
            "(EuroSAT MS stores B01..B12 then B8A, the standard order has B8A after B08); "
            "set data.band_order=eurosat or data.band_order=s2_l1c, or use data=eurosat_ms"
        )
    return [f"band{i + 1}" for i in range(count)]


def modality_of(names: Sequence[str]) -> str | None:
    """``hr``, ``s2`` or ``s1`` when ``names`` are bands of that modality, else None."""
    s = set(names) - {"alpha"}
    if s and s <= {"R", "G", "B"}:
        return "hr"
    if s and s <= set(S2_L1C_ORDER):
        return "s2"
    if s and s <= {"VV", "VH"}:
        return "s1"
    return None


def sensor_for(names: Sequence[str], dtype) -> str | None:
    """The built-in sensor that a file with these bands and dtype is (None: none)."""
    m = modality_of(names)
    if m == "hr":
        return "hr_rgb"
    if m == "s2":
        return "s2_l1c" if "B10" in names else "s2_l2a"
    if m == "s1":
        return "s1_grd_db"
    return None


def check_range(path, arr: np.ndarray, spec) -> None:
    """Raise when the valid values of ``arr`` (C, H, W, NaN = no data) are not in the units of
    ``spec``: reflectance 0-1 for digital numbers, linear power for dB, beyond 8 bits for RGB."""
    v = arr[np.isfinite(arr)]
    if v.size == 0:
        return
    lo, hi = np.percentile(v, [1, 99])
    if (v < spec.min_value).mean() > 0.05 or (v > spec.max_value).mean() > 0.05:
        raise DatasetError(
            f"{path}: values {lo:.4g}..{hi:.4g} outside the range {spec.min_value:g}.."
            f"{spec.max_value:g} of sensor {spec.name}"
        )
    if spec.modality == "s2" and spec.units == "dn" and hi <= 2.0 and v.max() > 0:
        raise DatasetError(
            f"{path}: values {lo:.4g}..{hi:.4g} look like reflectance 0-1, sensor {spec.name} "
            "expects digital numbers (reflectance x 10000)"
        )
    if spec.modality == "s1" and spec.units == "db" and lo >= 0.0 and hi < 2.0:
        raise DatasetError(
            f"{path}: values {lo:.4g}..{hi:.4g} look like linear power, sensor {spec.name} "
            "expects dB (use s1_grd_linear)"
        )


def read_image(
    path,
    sensor: str | None,
    declared_order: Sequence[str] | None = None,
    *,
    return_profile: bool = False,
    window=None,
):
    """One image file -> ``(arr (C, H, W) float32 of the sensor's model bands in the model's
    order, NaN = no data, sensor name)`` (and the profile with ``return_profile``).

    ``sensor``: the sensor expected (None: whichever the file's bands name). Bands are taken by
    name (see the module docstring), never by position alone. ``window``: a
    :class:`rasterio.windows.Window` to read instead of the whole file.
    """
    from skysense.data.sensors import get_sensor

    path = Path(path)
    with _open(path) as ds:
        dtype = ds.dtypes[0]
        try:
            names = file_band_names(ds, declared_order)
        except AmbiguousBandsError:
            want = get_sensor(sensor) if sensor else None
            if want is None or want.modality == "s2":
                raise
            raise BandMismatchError(
                path,
                [f"{ds.count} unnamed {dtype} bands"],
                want.model_bands,
                f"a multispectral image where {want.name} is expected",
            ) from None
        found_sensor = sensor_for(names, dtype)
        spec = get_sensor(sensor) if sensor else None
        if spec is None:
            if found_sensor is None:
                raise DatasetError(
                    f"{path}: bands {' '.join(names)} ({dtype}) name no known sensor; set "
                    "data.sensor"
                )
            spec = get_sensor(found_sensor)
        found_mod = modality_of(names)
        if found_mod != spec.modality or any(b not in names for b in spec.model_bands):
            hint = ""
            if found_sensor and found_mod != spec.modality:
                hint = f"this is a {found_sensor} image: set data.sensor={found_sensor} or auto"
            raise BandMismatchError(path, names, spec.model_bands, hint)
        if dtype not in spec.accepted_dtypes:
            raise DatasetError(
                f"{path}: dtype {dtype} does not match sensor {spec.name} "
                f"(accepted: {', '.join(spec.accepted_dtypes)})"
            )
        idx = [names.index(b) + 1 for b in spec.model_bands]
        arr = ds.read(idx, window=window).astype(np.float32)
        nodata = ds.nodata if ds.nodata is not None else spec.nodata
        if "alpha" in names:
            alpha = ds.read(names.index("alpha") + 1, window=window)
            arr[:, alpha == 0] = np.nan
        profile = {
            "crs": ds.crs,
            "transform": (
                ds.transform @ Affine.translation(window.col_off, window.row_off)
                if window is not None
                else ds.transform
            ),
            "height": arr.shape[1],
            "width": arr.shape[2],
            "bands": names,
            "dtype": dtype,
        }
        scales = ds.scales or ()
    if nodata is not None and np.issubdtype(np.dtype(dtype), np.integer):
        arr[:, (arr == np.float32(nodata)).all(0)] = np.nan
    if scales and any(s not in (None, 1.0) for s in scales) and spec.modality == "s2":
        s = float(scales[idx[0] - 1])
        arr *= np.float32(s * 10000.0 if s < 0.01 else s)
    arr = spec.to_model_units(arr)
    check_range(path, arr, spec)
    if return_profile:
        return arr, spec.name, profile
    return arr, spec.name


def normalise(arr: np.ndarray, sensor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) model bands with NaN -> (normalised float32 with 0 on no data, (H, W) valid)."""
    from skysense.data.sensors import get_sensor

    spec = get_sensor(sensor)
    m = np.asarray(spec.mean, np.float32)[:, None, None]
    s = np.asarray(spec.std, np.float32)[:, None, None]
    valid = ~np.isnan(arr).any(0)
    return torch.from_numpy(np.nan_to_num((arr - m) / s, nan=0.0)), torch.from_numpy(valid)


def modality_sample(
    modality: str, arrays: Sequence[np.ndarray], sensor: str, doys: Sequence[int]
) -> dict:
    """Contract keys of one modality: ``hr`` (3, H, W) (+ ``hr_pixel_valid``) for HR, else a
    series ``m`` (T, C, h, w), ``m_doy`` (T,), ``m_valid`` (T,), ``m_pixel_valid`` (T, h, w)."""
    xs, vs = zip(*(normalise(a, sensor) for a in arrays))
    if modality == "hr":
        return {"hr": xs[0], "hr_pixel_valid": vs[0]}
    return {
        modality: torch.stack(xs),
        f"{modality}_doy": torch.tensor(list(doys), dtype=torch.int64),
        f"{modality}_valid": torch.ones(len(xs), dtype=torch.bool),
        f"{modality}_pixel_valid": torch.stack(vs),
    }


def latlon_of(profile: dict) -> torch.Tensor:
    """(2,) float32 centre lat/lon of a georeferenced profile, NaN otherwise."""
    from affine import Affine

    from skysense.data.geo import Grid

    crs, tr = profile.get("crs"), profile.get("transform")
    if crs is None or tr is None or tr == Affine.identity():
        return torch.full((2,), float("nan"))
    lat, lon = Grid(crs, tr, profile["height"], profile["width"]).centre_latlon()
    return torch.tensor([lat, lon], dtype=torch.float32)


def day_of_year(date) -> int:
    """1..366, 0 when the date is unknown."""
    return 0 if date is None else date.timetuple().tm_yday


def read_mask(path, values: dict[int, int] | None = None) -> np.ndarray:
    """A one-band integer label raster as (H, W) int64 (raw values)."""
    with _open(path) as ds:
        if ds.count != 1:
            raise DatasetError(f"label {path}: {ds.count} bands, expected 1")
        if not np.issubdtype(np.dtype(ds.dtypes[0]), np.integer):
            raise DatasetError(f"label {path}: dtype {ds.dtypes[0]}, expected integer classes")
        return ds.read(1).astype(np.int64)


def read_colour_mask(path, palette: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """An RGB colour-coded label image -> (H, W) int64 class index (255 for a colour not in
    ``palette``)."""
    with _open(path) as ds:
        if ds.count < 3:
            raise DatasetError(f"label {path}: {ds.count} bands, expected an RGB colour label")
        rgb = ds.read([1, 2, 3]).astype(np.int64)
    code = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
    out = np.full(code.shape, 255, np.int64)
    for k, (r, g, b) in enumerate(palette):
        out[code == ((r << 16) | (g << 8) | b)] = k
    return out

"""The modalities of the SkySense batch contract, in one table.

Data (which makes batches), encoders and losses (which read them) and tasks all name the
modalities, and none of the first three may import another (see the design's import picture):
the table sits in kernels, the one layer below all of them. Plain Python, no torch.

| name | series | default sensor | model bands | batch keys |
|---|---|---|---|---|
| ``hr`` | no: one image per sample, (B, 3, H, W) | ``hr_rgb`` | 3 | ``hr``, ``hr_doy`` |
| ``s2`` | yes: (B, T, 10, h, w) with dates and validity per step | ``s2_l2a`` | 10 | ``s2``, ``s2_doy``, ``s2_valid`` |
| ``s1`` | yes: (B, T, 2, h, w) likewise | ``s1_grd_db`` | 2 | ``s1``, ``s1_doy``, ``s1_valid`` |

The sensors themselves (bands, statistics) live in ``skysense.data.sensors``; the default sensor
here is the product a modality's batches come from when a dataset says nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    """One input of the model.

    Attributes:
        name: the batch key of its pixels (``hr``, ``s2``, ``s1``).
        series: True for a time series (a T axis, per-step ``<name>_doy`` int64 and
            ``<name>_valid`` bool); False for a single date (``<name>_doy`` per sample).
        sensor: the default sensor registry name of its data.
        channels: the bands the model takes.
    """

    name: str
    series: bool
    sensor: str
    channels: int


TABLE: tuple[Modality, ...] = (
    Modality("hr", series=False, sensor="hr_rgb", channels=3),
    Modality("s2", series=True, sensor="s2_l2a", channels=10),
    Modality("s1", series=True, sensor="s1_grd_db", channels=2),
)
MODALITY: dict[str, Modality] = {m.name: m for m in TABLE}
MODALITIES: tuple[str, ...] = tuple(MODALITY)  # ("hr", "s2", "s1"), the contract's order
SERIES: tuple[str, ...] = tuple(m.name for m in TABLE if m.series)  # ("s2", "s1")
DEFAULT_SENSORS: dict[str, str] = {m.name: m.sensor for m in TABLE}

"""Fake datasets in the exact layouts the public datasets are distributed in: file and folder
names, dtypes, band order (and no band descriptions where the real files have none), CRS, nodata
and label encoding; images smaller than the real ones (a few kB each), values planted so a test
can tell which band or date a value came from.

``make(name, root)`` writes the fake of a registered dataset and returns the root to pass as
``data.root`` with the overrides its config needs (``FAKE_OVERRIDES``).
"""

from __future__ import annotations

from pathlib import Path

from fakes.change import make_levir_cd, make_oscd, make_whu_cd
from fakes.classification import (
    make_aid,
    make_eurosat_ms,
    make_eurosat_rgb,
    make_fmow_s2,
    make_resisc45,
)
from fakes.detection import make_dior, make_fair1m
from fakes.multilabel import make_bigearthnet_v1, make_bigearthnet_v2
from fakes.segmentation import (
    make_dynamicearthnet,
    make_hls_burn_scars,
    make_isaid,
    make_mados,
    make_pastis,
    make_potsdam,
    make_sen1floods11,
)

MAKERS = {
    "eurosat_ms": make_eurosat_ms,
    "eurosat_rgb": make_eurosat_rgb,
    "aid": make_aid,
    "resisc45": make_resisc45,
    "oscd": make_oscd,
    "bigearthnet": make_bigearthnet_v1,
    "bigearthnet_v2": make_bigearthnet_v2,
    "levir_cd": make_levir_cd,
    "whu_cd": make_whu_cd,
    "potsdam": make_potsdam,
    "isaid": make_isaid,
    "sen1floods11": make_sen1floods11,
    "pastis": make_pastis,
    "dior": make_dior,
    "dior_r": make_dior,
    "fair1m": make_fair1m,
    "fmow_s2": make_fmow_s2,
    "hls_burn_scars": make_hls_burn_scars,
    "mados": make_mados,
    "dynamicearthnet": make_dynamicearthnet,
}


def make(name: str, root: Path) -> Path:
    return MAKERS[name](Path(root))


__all__ = ["MAKERS", "make"]

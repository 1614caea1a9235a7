"""Public remote-sensing datasets as classes, each built from a root folder in exactly the
layout the dataset is distributed in (TorchGeo's habit): declared sensors, band names in file
order, resolution, CRS handling, classes, label encoding and split files; bands mapped by name;
``plot()``. See :mod:`skysense.data.datasets.base` for the sample format.

:func:`get_dataset` returns the class registered under a name (``data=<name>``)."""

from __future__ import annotations

import importlib

from skysense.data.datasets.base import (
    BandMismatchError,
    DatasetError,
    RemoteSensingDataset,
)

REGISTRY = {
    "class_folders": "classification:ClassFolders",
    "eurosat_ms": "classification:EuroSATMS",
    "eurosat_rgb": "classification:EuroSATRGB",
    "aid": "classification:AID",
    "resisc45": "classification:RESISC45",
    "oscd": "oscd:OSCD",
    "bigearthnet": "bigearthnet:BigEarthNet",
    "bigearthnet_v2": "bigearthnet:BigEarthNetV2",
    "levir_cd": "change_hr:LEVIRCD",
    "whu_cd": "change_hr:WHUCD",
    "potsdam": "segmentation:Potsdam",
    "isaid": "segmentation:ISAID",
    "sen1floods11": "segmentation:Sen1Floods11",
    "pastis": "pastis:PASTIS",
    "dior": "detection:DIOR",
    "dior_r": "detection:DIORR",
    "fair1m": "detection:FAIR1M",
    "fmow_s2": "fmow:FMoWSentinel",
    "hls_burn_scars": "hls:HLSBurnScars",
    "mados": "mados:MADOS",
    "dynamicearthnet": "dynamicearthnet:DynamicEarthNet",
}

# Evaluation datasets of the spec without a reader yet (asking for one raises).
MISSING: tuple[str, ...] = ()


def get_dataset(name: str) -> type[RemoteSensingDataset]:
    """The dataset class registered as ``name``."""
    if name in MISSING:
        raise NotImplementedError(f"dataset {name!r}: no reader yet (known: {sorted(REGISTRY)})")
    if name not in REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(REGISTRY)}")
    mod, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"skysense.data.datasets.{mod}"), cls)


__all__ = ["REGISTRY", "BandMismatchError", "DatasetError", "RemoteSensingDataset", "get_dataset"]

"""The loader's normalisation option (one spelling, British, as the rest of the API): "spec"
and "data" give different batches; anything else is an error naming the option."""

from __future__ import annotations

import pytest
import torch

from skysense.data import build_loader

pytestmark = pytest.mark.unit


def test_spec_and_data_normalisation_differ(embedded_manifest):
    spec = next(iter(build_loader(embedded_manifest, "train", 4, "torch", shuffle=False)))
    data = next(
        iter(
            build_loader(
                embedded_manifest, "train", 4, "torch", shuffle=False, normalisation="data"
            )
        )
    )
    assert spec["s2"].shape == data["s2"].shape
    assert not torch.allclose(spec["s2"], data["s2"])


def test_unknown_normalisation_is_named(embedded_manifest):
    with pytest.raises(ValueError, match="normalisation must be 'spec' or 'data'"):
        build_loader(embedded_manifest, "train", 4, "torch", normalisation="minmax")
    with pytest.raises(TypeError, match="normalization"):
        build_loader(embedded_manifest, "train", 4, "torch", normalization="spec")

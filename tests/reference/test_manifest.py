"""The committed key manifest is what the reference code builds (that the paper-size model
takes every key of it strictly is a unit test: tests/encoders/test_checkpoint_filter.py)."""

from __future__ import annotations

import pytest
from refutil import MANIFEST

pytestmark = pytest.mark.reference


def test_fixture_is_what_the_reference_code_builds(mm):
    doc = mm.manifest_document()
    assert mm.dump_manifest(doc) == MANIFEST.read_text(), (
        "tests/reference/fixtures/released_keys.json is stale: regenerate it with "
        "PYTHONPATH=.venv-ref .venv/bin/python tests/reference/mm_reference.py"
    )
    keys = doc["huge"]["keys"]
    assert keys["ctpe"]["shape"] == [1, 365, 2816]
    assert keys["backbone_gep.stages.2.blocks.17.norm3.weight"]["shape"] == [1408]
    assert "backbone_gep.stages.2.blocks.16.norm3.weight" not in keys
    assert keys["backbone_gep.norm3.weight"]["shape"] == [2816]  # output norm of stage 4
    assert keys["backbone_s2.layers.23.attn.attn.in_proj_weight"]["shape"] == [3072, 1024]
    assert keys["backbone_s1.patch_embed.projection.weight"]["shape"] == [1024, 2, 4, 4]
    assert keys["fusion.porj_linear.weight"]["shape"] == [1024, 2816]
    assert keys["head_s2.decoder.0.weight"]["shape"] == [45056, 1024, 1, 1]

"""After the reference modules (collected before this one), the OpenMMLab packages are gone
from sys.path and sys.modules: no other test can import them by accident."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

REF = Path(__file__).resolve().parents[2] / ".venv-ref"

pytestmark = pytest.mark.reference


def test_reference_packages_left_the_interpreter():
    assert str(REF) not in sys.path
    leaked = [
        n
        for n, m in sys.modules.items()
        if (getattr(m, "__file__", None) or "").startswith(str(REF))
    ]
    assert leaked == []
    assert "mmcv" not in sys.modules and "mmpretrain" not in sys.modules
    # No finder of theirs stays behind (importlib_metadata installs one on import): package
    # metadata still resolves.
    theirs = [
        f
        for f in sys.meta_path
        if type(f).__module__ not in sys.modules
        or (getattr(sys.modules[type(f).__module__], "__file__", None) or "").startswith(str(REF))
    ]
    assert theirs == []
    assert importlib.metadata.version("torch")
    assert importlib.metadata.requires("skysense-tasks")

"""The reference tier: this project's modules against the OpenMMLab code of the release.

The OpenMMLab packages live in .venv-ref (a ``pip install --no-deps --target`` folder that
``make reference`` builds, ``make test`` first), never in .venv. The ``mm`` fixture appends it
to the END of ``sys.path`` while one of this folder's test modules runs (the project's own
pins win every clash) and imports :mod:`mm_reference`; without the folder the tests skip,
saying so.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REF = HERE.parents[1] / ".venv-ref"

sys.path.insert(0, str(HERE))


@pytest.fixture(scope="module")
def mm():
    """The :mod:`mm_reference` module, importable while .venv-ref is on sys.path.

    For one test module at a time: afterwards .venv-ref leaves sys.path and the modules loaded
    from it leave sys.modules, so that no other test can pick them up."""
    if not (REF / ".installed").exists():
        pytest.skip(
            f"the reference packages are not installed at {REF}: run `make reference` (`make "
            "test` runs it; where the install failed, it printed why)"
        )
    before = set(sys.modules)
    sys.path.append(str(REF))
    try:
        with warnings.catch_warnings():
            # mmcv-lite has no compiled ops: its transformer module says so on import
            warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
            yield importlib.import_module("mm_reference")
    finally:
        sys.path.remove(str(REF))
        for name in set(sys.modules) - before:
            path = getattr(sys.modules[name], "__file__", None) or ""
            if name == "mm_reference" or path.startswith(str(REF)):
                del sys.modules[name]

"""The reference tier: this project's modules against the OpenMMLab code of the release.

The OpenMMLab packages live in .venv-ref (a ``pip install --no-deps --target`` folder that
``make reference`` builds, ``make test`` first), never in .venv. The ``mm`` fixture appends it
to the END of ``sys.path`` for this folder's tests only (the project's own pins win every
clash) and imports :mod:`mm_reference`; without the folder the tests skip, saying so.
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


@pytest.fixture(scope="session")
def mm():
    """The :mod:`mm_reference` module, importable once .venv-ref is on sys.path."""
    if not (REF / ".installed").exists():
        pytest.skip(
            f"the reference packages are not installed at {REF}: run `make reference` (`make "
            "test` runs it; where the install failed, it printed why)"
        )
    if str(REF) not in sys.path:
        sys.path.append(str(REF))
    with warnings.catch_warnings():
        # mmcv-lite has no compiled ops: its transformer module says so once on import
        warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
        return importlib.import_module("mm_reference")

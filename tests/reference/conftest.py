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
from importlib.machinery import PathFinder
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
    # importlib_metadata (a dependency of the reference) disables the standard library's
    # distribution finder and installs its own in sys.meta_path on import: both are undone
    # below, or every later importlib.metadata lookup would fail.
    stdlib_finder = PathFinder.__dict__.get("find_distributions")
    sys.path.append(str(REF))
    try:
        with warnings.catch_warnings():
            # mmcv-lite has no compiled ops: its transformer module says so on import
            warnings.filterwarnings("ignore", message=".*MultiScaleDeformableAttention.*")
            yield importlib.import_module("mm_reference")
    finally:
        sys.path.remove(str(REF))
        gone = set()
        for name in set(sys.modules) - before:
            path = getattr(sys.modules[name], "__file__", None) or ""
            if name == "mm_reference" or path.startswith(str(REF)):
                del sys.modules[name]
                gone.add(name)
        if stdlib_finder is not None and "find_distributions" not in PathFinder.__dict__:
            PathFinder.find_distributions = stdlib_finder
        sys.meta_path[:] = [
            f
            for f in sys.meta_path
            if type(f).__module__ not in gone
            and not (
                getattr(sys.modules.get(type(f).__module__), "__file__", None) or ""
            ).startswith(str(REF))
            and type(f).__module__ in sys.modules
        ]
        importlib.invalidate_caches()

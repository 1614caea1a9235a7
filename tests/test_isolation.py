"""Each distribution installs alone, with only what it declares, and imports.

For every distribution: build its wheel (and the wheels of the skysense distributions it
declares), install them with ``--no-deps`` into an empty target folder, then import it in a
fresh interpreter (``-I -S``: no site-packages, no editable paths) whose ``sys.path`` holds only
the standard library, that folder, and the third-party packages, behind an import guard that
refuses any top-level module outside the transitive closure of the distribution's declared
requirements. A missing declaration fails here as it would in a fresh venv; the sibling
distributions are not installed, so an import across the package boundaries fails too.

``tools/check_fresh_install.sh`` does the same with real fresh venvs (slow: torch each time).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DISTS = {
    "skysense-kernels": REPO / "kernels",
    "skysense-encoders": REPO / "packages" / "encoders",
    "skysense-losses": REPO / "packages" / "losses",
    "skysense-data": REPO / "packages" / "data",
    "skysense-tasks": REPO / "packages" / "tasks",
}
SIBLINGS = {"kernels", "encoders", "losses", "data", "tasks"}


def _requires(meta_text: str) -> list[Requirement]:
    reqs = []
    for line in meta_text.splitlines():
        if line.startswith("Requires-Dist:"):
            r = Requirement(line.split(":", 1)[1].strip())
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                reqs.append(r)
    return reqs


def _closure(names: list[str]) -> set[str]:
    """Distribution names reachable from ``names`` through installed metadata."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = md.requires(n) or []
        except md.PackageNotFoundError:
            raise AssertionError(f"declared requirement {n} is not installed") from None
        for line in reqs:
            r = Requirement(line)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(r.name))
    return seen


@pytest.fixture(scope="session")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            *map(str, DISTS.values()),
        ],
        check=True,
    )
    found = {}
    for w in out.glob("*.whl"):
        name = canonicalize_name(w.name.split("-")[0])
        found[name] = w
    assert set(found) == set(DISTS), found
    return found


@pytest.mark.parametrize("dist", sorted(DISTS))
def test_distribution_installs_alone_and_imports(dist, wheels, tmp_path):
    meta = (
        zipfile.ZipFile(wheels[dist])
        .read(next(n for n in zipfile.ZipFile(wheels[dist]).namelist() if n.endswith("METADATA")))
        .decode()
    )
    reqs = _requires(meta)
    ours = [canonicalize_name(r.name) for r in reqs if r.name.startswith("skysense")]
    # skysense distributions it declares, transitively (their wheels' metadata).
    install, todo = {dist}, list(ours)
    while todo:
        d = todo.pop()
        if d in install:
            continue
        install.add(d)
        zf = zipfile.ZipFile(wheels[d])
        m = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
        todo += [canonicalize_name(r.name) for r in _requires(m) if r.name.startswith("skysense")]
    third_party = set()
    for d in install:
        zf = zipfile.ZipFile(wheels[d])
        m = zf.read(next(n for n in zf.namelist() if n.endswith("METADATA"))).decode()
        third_party |= {r.name for r in _requires(m) if not r.name.startswith("skysense")}
    allowed_dists = _closure(sorted(third_party)) if third_party else set()
    pkg_dists = md.packages_distributions()
    allowed_modules = sorted(
        mod
        for mod, ds in pkg_dists.items()
        if any(canonicalize_name(x) in allowed_dists for x in ds)
    )

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(target),
            *[str(wheels[d]) for d in sorted(install)],
        ],
        check=True,
    )
    sub = dist.split("-", 1)[1]
    absent = sorted(SIBLINGS - {d.split("-", 1)[1] for d in install})
    probe = f"""
import importlib.abc, importlib.util, sys
allowed = set({allowed_modules!r}) | set(sys.stdlib_module_names) | {{"skysense", "_distutils_hack"}}
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top not in allowed and not top.startswith("_"):
            raise ModuleNotFoundError(f"undeclared dependency: {{name}}", name=name)
        return None
sys.meta_path.insert(0, Guard())
import skysense.{sub}
mod = sys.modules["skysense.{sub}"]
assert "{target}" in mod.__file__, mod.__file__
for other in {absent!r}:
    assert importlib.util.find_spec("skysense." + other) is None, other
print("ok", mod.__file__)
"""
    # -I -S leaves only the standard library on sys.path; add the target and third parties.
    path = [str(target), sysconfig.get_paths()["purelib"]]
    r = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path += {json.dumps(path)}\n" + probe,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, f"{dist} does not import alone:\n{r.stderr[-3000:]}"
    assert r.stdout.startswith("ok")

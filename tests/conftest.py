"""Shared test set-up.

The Triton tier runs the Triton kernels on the CPU under the interpreter: TRITON_INTERPRET must
be set before triton is first imported, so it is set here, before anything imports torch, on a
machine without an NVIDIA GPU (set SKYSENSE_TRITON_INTERPRET=0 to keep real kernels).
"""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("SKYSENSE_TRITON_INTERPRET", "auto") == "auto":
    if not Path("/dev/nvidia0").exists():
        os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("SKYSENSE_TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(out: Path, entries: str, name: str, *args: str) -> dict:
    """``skysense benchmark`` over the suite ``entries`` (a YAML flow list's items) without the
    pre-trained row, into ``out``; asserts exit 0 and returns report.json."""
    import json

    from skysense.tasks.cli import main

    argv = ["benchmark", f"suite.entries=[{entries}]", f"suite.name={name}", f"run_dir={out}"]
    assert main([*argv, "suite.pretrained=null", *args]) == 0
    return json.loads((out / "report.json").read_text())


def free_port() -> int:
    """A free local TCP port for a gloo process group (MASTER_PORT) of a spawned test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository, or $SKYSENSE_SHARED_DATA."""
    env = os.environ.get("SKYSENSE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real samples; tests that need them skip where they are absent."""
    d = shared_data_dir()
    if not (d / "README.md").exists():
        pytest.skip(
            f"real samples not found at {d}: the integration tier needs ../shared/data beside "
            "the repository (or SKYSENSE_SHARED_DATA)"
        )
    return d


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module (``pytestmark =
    pytest.mark.usefixtures("one_thread")``), restored afterwards. The CPU is shared with other
    jobs, where idle OpenMP threads spin (steps up to 30x slower with 2), and one thread, as
    the subprocesses have (OMP_NUM_THREADS=1), makes in-process and subprocess runs bitwise
    comparable. Module scope, so that it is set before a module's own run fixtures."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

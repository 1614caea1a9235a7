"""Running ``skysense`` in a subprocess the way a user does, and the checks every fault test
makes: the exit code, one line naming the file or field, no traceback, nothing changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKYSENSE = ROOT / ".venv" / "bin" / "skysense"


def env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a command under test: debug logs under ``tmp_path/logs``, one torch
    thread, no SKYSENSE_DEBUG."""
    e = dict(os.environ)
    e.update(SKYSENSE_LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1", **extra)
    e.pop("SKYSENSE_DEBUG", None)
    return e


def skysense(tmp_path: Path, *args, timeout: int = 600, **env_extra) -> subprocess.CompletedProcess:
    """``skysense ARGS`` in a subprocess, run from ``tmp_path``."""
    return subprocess.run(
        [str(SKYSENSE), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env(tmp_path, **env_extra),
    )


def checksums(*roots: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``roots`` (but those named in ``ignore``): what a failed
    command must leave unchanged."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            if p.name not in ignore:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fault_line(proc, command: str, *fragments: str, rc: int | None = None) -> str:
    """``proc`` failed (exit ``rc``, any non-zero when None) with exactly one line
    ``skysense <command>: ...`` on stderr, the last one, holding every fragment; no traceback.
    Returns the line."""
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    if rc is not None:
        assert proc.returncode == rc, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith(f"skysense {command}: ")]
    assert len(ours) == 1 and lines[-1] == ours[0], proc.stderr[-3000:]
    for f in fragments:
        assert str(f) in ours[0], (f, ours[0])
    return ours[0]


def kill_when(args: list[str], ready, cwd: Path, env_: dict, timeout: float = 300) -> int:
    """Start ``args``, SIGKILL it as soon as ``ready()`` holds (or at ``timeout``); the exit
    code (``-SIGKILL`` when the kill landed)."""
    import signal
    import time

    proc = subprocess.Popen(
        args, cwd=cwd, env=env_, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready():
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

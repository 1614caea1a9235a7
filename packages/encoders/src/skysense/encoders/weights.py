"""One folder layout for model weights: ``model.safetensors``, ``config.json``, ``SHA256SUMS``.

``skysense convert`` (released ``.pth`` files) and ``skysense export format=safetensors`` (this
project's checkpoints) write it; every ``checkpoint=`` / ``weights=`` reads it, and so does
``huggingface_hub``'s ``PyTorchModelHubMixin.from_pretrained(folder)`` (the same two file names).

- ``model.safetensors``: the state dict, this project's key names, tensors contiguous and
  unshared (safetensors stores no aliasing), any dtype.
- ``config.json``: a JSON object; this project writes ``format`` (:data:`FORMAT`), ``preset``
  and ``model`` (the :class:`~skysense.encoders.config.SkySenseConfig` fields), and what the
  writer knows (sensors and band order, normalisation statistics, source files and their
  sha256, the task head).
- ``SHA256SUMS``: ``<sha256>  <name>`` lines (``sha256sum -c`` reads it) for the two files above.

Loading never unpickles: safetensors holds raw tensors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SUMS_FILE = "SHA256SUMS"
FORMAT = "skysense-weights/1"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_weights_dir(path: str | os.PathLike | None) -> bool:
    """True when ``path`` is a folder holding ``model.safetensors`` (the layout's marker)."""
    if path is None or str(path) == "":
        return False
    p = Path(path)
    return p.is_dir() and (p / WEIGHTS_FILE).is_file()


def read_sums(path: str | os.PathLike) -> dict[str, str]:
    """``SHA256SUMS`` of a weights folder -> {file name: hex digest}."""
    sums: dict[str, str] = {}
    file = Path(path) / SUMS_FILE
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{file}: line {n} is not '<sha256>  <name>'")
        sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def verify_weights(path: str | os.PathLike) -> None:
    """Check ``SHA256SUMS`` of a weights folder: both files listed, and their digests equal.

    Raises ValueError, one line naming the folder and the reason."""
    p = Path(path)
    if not (p / SUMS_FILE).is_file():
        raise ValueError(f"{p}: no {SUMS_FILE} (pass verify=False to load without checking)")
    sums = read_sums(p)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if name not in sums:
            raise ValueError(f"{p}: {SUMS_FILE} does not list {name}")
    for name, digest in sums.items():
        f = p / name
        if not f.is_file():
            raise ValueError(f"{p}: {SUMS_FILE} lists {name}, which is missing")
        got = sha256_file(f)
        if got != digest:
            raise ValueError(
                f"{p}: {name} does not match {SUMS_FILE} (sha256 {got[:12]}..., expected "
                f"{digest[:12]}...): the file is corrupt or was changed after writing"
            )


def load_weights(
    path: str | os.PathLike, *, verify: bool = True, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weights folder -> (state dict, config.json content).

    Args:
        path: the folder (``model.safetensors``, ``config.json``, ``SHA256SUMS``).
        verify: check the files against ``SHA256SUMS`` first.
        device: where the tensors land.

    Raises ValueError with one line naming the path and the reason (not a folder of this
    layout, checksum mismatch, unreadable safetensors or JSON)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p}: not a weights folder (no such directory)")
    if not (p / WEIGHTS_FILE).is_file():
        raise ValueError(f"{p}: not a weights folder (no {WEIGHTS_FILE})")
    if verify:
        verify_weights(p)
    config: dict = {}
    if (p / CONFIG_FILE).is_file():
        try:
            config = json.loads((p / CONFIG_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: {CONFIG_FILE} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{p}: {CONFIG_FILE} is not a JSON object")
    try:
        state = load_file(str(p / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{p}: {WEIGHTS_FILE} cannot be read ({e})") from None
    return state, config


def _plain(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state dict entry '{k}' is a {type(v).__name__}, not a tensor")
        if v.device.type == "meta":
            raise ValueError(f"state dict entry '{k}' is on the meta device (no data to save)")
        # safetensors refuses shared storage and non-contiguous views: one copy each
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def save_weights(
    path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping
) -> Path:
    """Write a weights folder atomically: files go into a temporary sibling folder, which is
    renamed onto ``path`` at the end (an existing folder of this layout is replaced; any other
    existing path is an error). Returns ``path``.

    Args:
        path: the folder to create.
        state_dict: name -> tensor (any dtype, any device except meta).
        config: JSON-serialisable mapping written as ``config.json`` (``format`` is added).
    """
    from safetensors.torch import save_file

    dst = Path(path)
    if dst.exists() and not is_weights_dir(dst) and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst}: exists and is not a weights folder; not overwriting it")
    cfg = {"format": FORMAT, **dict(config)}
    try:
        text = json.dumps(cfg, indent=1, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"{dst}: config is not JSON-serialisable ({e})") from None
    tensors = _plain(state_dict)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(text + "\n")
        lines = [f"{sha256_file(tmp / n)}  {n}" for n in (WEIGHTS_FILE, CONFIG_FILE)]
        (tmp / SUMS_FILE).write_text("\n".join(lines) + "\n")
        os.chmod(tmp, 0o755)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
            os.rename(dst, old / "x")
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_state_dict(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict, dict]:
    """A weights folder or a ``.pth``/``.pt`` file -> (state dict, config).

    Folders go through :func:`load_weights` (config = ``config.json``); files through
    ``torch.load(weights_only=True)`` only (config = {}): a released file or any state dict of
    tensors. Raises ValueError naming the path when it is neither."""
    p = Path(path)
    if p.is_dir():
        return load_weights(p, verify=verify)
    if not p.is_file():
        raise ValueError(f"{p}: no such weights folder or file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling beyond tensors is refused on purpose
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{p}: not loadable with torch.load(weights_only=True) ({msg})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj), {}


def load_into(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    verify: bool = True,
):
    """Load a weights folder or a released / own ``.pth`` into a SkySense ``model``.

    Names are mapped by :func:`~skysense.encoders.checkpoint_filter.match_to_model` (the
    release's names or this project's, ``encoder.`` prefixes of task models stripped). Strict:
    a part the source touches must be complete, and no source key may be left over; the error
    (ValueError) names the path and the keys. Parts the source lacks keep their initialisation
    (logged). Returns the :class:`~skysense.encoders.checkpoint_filter.MatchReport`."""
    import logging

    from skysense.encoders.checkpoint_filter import match_to_model

    state, config = read_state_dict(path, verify=verify)
    prefix = config.get("encoder_prefix")
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    mapped, report = match_to_model(state, model)
    if not report.ok:
        if strict:
            raise ValueError(report.error(str(path)))
        logging.getLogger(__name__).warning("%s", report.error(str(path)))
    if report.absent:
        logging.getLogger(__name__).warning(
            "%s holds nothing for %s: those keep their initialisation", path, report.absent
        )
    own = model.state_dict()
    usable = {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(usable, strict=False)
    return report


# Encoder config fields that are run-time choices, not structure: never taken from a folder.
_RUNTIME_FIELDS = ("name", "checkpointing")


def structure_of(path: str | os.PathLike, preset: str) -> dict:
    """The encoder config fields a weights folder was written with (``config.json``'s
    ``model``) where they differ from ``preset``'s: the overrides that build the model it
    fits; {} for a file or a folder without them.

    Raises ValueError when the folder was written for another preset than ``preset``."""
    from dataclasses import asdict

    from skysense.encoders.presets import PRESETS, preset_config

    p = Path(path)
    if not is_weights_dir(p) or not (p / CONFIG_FILE).is_file():
        return {}
    try:
        config = json.loads((p / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return {}
    theirs = config.get("preset")
    if theirs is not None and theirs != preset:
        raise ValueError(
            f"{p}: holds weights of preset '{theirs}', not '{preset}' (build it with "
            f"preset='{theirs}')"
        )
    if preset not in PRESETS:
        preset_config(preset)  # the unknown-preset error
    theirs = asdict(
        preset_config(
            preset, **{k: v for k, v in config["model"].items() if k not in _RUNTIME_FIELDS}
        )
    )
    base = PRESETS[preset]
    return {k: v for k, v in theirs.items() if k not in _RUNTIME_FIELDS and v != base.get(k)}

"""`skysense export`: an encoder with its task head as a ``torch.export`` program (and ONNX
where the exporter takes it), checked against the eager model.

The exported program takes tensors, not the batch dict: :class:`ExportWrapper` names its
positional inputs after the contract keys (``hr``; ``s2``, ``s2_doy``, ``s2_valid``; ...; for
change detection the first date's then the second date's) and returns the logits. Shapes are
static (those of the example inputs, written in the report): the encoder's window attention and
grid alignment fix the spatial sizes at trace time.

The check runs the saved program (reloaded from disk) and the eager model on fresh random
inputs, not the example used for tracing, and compares them (max abs / relative error). ONNX
export needs the ``onnx`` and ``onnxscript`` packages (the ``onnx`` extra of skysense-tasks);
checking the ONNX file needs ``onnxruntime``. Without them the report says so and the
``torch.export`` program is still written.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from skysense.kernels.modalities import MODALITIES

log = logging.getLogger(__name__)

_SERIES_KEYS = ("{m}", "{m}_doy", "{m}_valid")


def input_names(kind: str, modalities: Sequence[str]) -> list[str]:
    """Positional input names of the exported program."""
    names = []
    for m in MODALITIES:
        if m in modalities:
            names += ["hr"] if m == "hr" else [k.format(m=m) for k in _SERIES_KEYS]
    if kind == "change":
        return [f"t1.{n}" for n in names] + [f"t2.{n}" for n in names]
    return names


class ExportWrapper(nn.Module):
    """Tensors in the order of :func:`input_names` -> the task model's logits."""

    def __init__(self, model: nn.Module, kind: str, names: Sequence[str]):
        super().__init__()
        self.model, self.kind, self.names = model, kind, list(names)

    def forward(self, *args: Tensor) -> Tensor:
        if self.kind == "change":
            batch: dict = {"t1": {}, "t2": {}}
            for n, a in zip(self.names, args):
                d, k = n.split(".", 1)
                batch[d][k] = a
        else:
            batch = dict(zip(self.names, args))
        return self.model(batch)["logits"]


def example_inputs(
    names: Sequence[str],
    inputs: Mapping,
    size: int,
    batch: int = 1,
    steps: int = 1,
    hr_factor: int = 8,
    generator=None,
) -> tuple[Tensor, ...]:
    """Random inputs: HR (B, 3, S, S) with S = size (reference hr) or size x hr_factor; series
    (B, steps, C, size, size), day of year 1..365, all steps valid."""
    ref = inputs["reference"]
    out = []
    for n in names:
        k = n.split(".")[-1]
        m = k.split("_")[0]
        if k == "hr":
            s = size if ref == "hr" else size * hr_factor
            out.append(torch.randn(batch, 3, s, s, generator=generator))
        elif k.endswith("_doy"):
            out.append(torch.randint(1, 366, (batch, steps), generator=generator))
        elif k.endswith("_valid"):
            out.append(torch.ones(batch, steps, dtype=torch.bool))
        else:
            c = len(inputs[m]["bands"])
            out.append(torch.randn(batch, steps, c, size, size, generator=generator))
    return tuple(out)


def _compare(a: Tensor, b: Tensor) -> dict:
    diff = (a.double() - b.double()).abs()
    scale = b.double().abs().max().clamp_min(1e-12)
    return {
        "max_abs": diff.max().item(),
        "max_rel": (diff.max() / scale).item(),
        "shape": list(b.shape),
    }


def export_model(
    model: nn.Module,
    meta: Mapping,
    out_dir: str | Path,
    size: int | None = None,
    batch: int = 1,
    steps: int = 1,
    onnx: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
) -> dict:
    """Export ``model`` (a task model of ``meta``'s kind) and check it. Returns the report,
    also written to ``out_dir/export.json``. Raises AssertionError when the exported program's
    outputs differ from eager beyond ``atol + rtol * max|eager|``."""
    kind = meta["kind"]
    if kind == "detection":
        raise NotImplementedError(
            "export of detection models (torchvision's Faster R-CNN: data-dependent proposal "
            "counts) is not supported; export classification, segmentation or change models"
        )
    inputs = meta["inputs"]
    names = input_names(kind, inputs["modalities"])
    size = int(size or (meta.get("eval") or {}).get("window") or 64)
    hr_factor = int(meta.get("hr_factor", 8))
    wrapper = ExportWrapper(model.eval(), kind, names).eval()
    g = torch.Generator().manual_seed(seed)
    args = example_inputs(names, inputs, size, batch, steps, hr_factor, g)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "kind": kind,
        "inputs": {n: [list(a.shape), str(a.dtype)] for n, a in zip(names, args)},
    }
    with torch.no_grad():
        ep = torch.export.export(wrapper, args)
    path = out_dir / "model.pt2"
    torch.export.save(ep, path)
    report["torch_export"] = str(path)
    loaded = torch.export.load(path)
    fresh = example_inputs(names, inputs, size, batch, steps, hr_factor, g)
    with torch.no_grad():
        eager = wrapper(*fresh)
        exported = loaded.module()(*fresh)
    cmp = _compare(exported, eager)
    report["torch_export_check"] = cmp
    ok = cmp["max_abs"] <= atol + rtol * eager.abs().max().item()
    report["torch_export_ok"] = ok
    log.info("torch.export: %s, max |exported - eager| = %.2e", path, cmp["max_abs"])
    if onnx:
        report.update(_onnx(wrapper, args, fresh, eager, names, out_dir, atol, rtol))
    (out_dir / "export.json").write_text(json.dumps(report, indent=1))
    if not ok:
        raise AssertionError(f"exported program differs from eager: {cmp}")
    return report


def _onnx(wrapper, args, fresh, eager, names, out_dir: Path, atol, rtol) -> dict:
    missing = [p for p in ("onnx", "onnxscript") if importlib.util.find_spec(p) is None]
    if missing:
        msg = f"ONNX export skipped: {' and '.join(missing)} not installed (pip install 'skysense-tasks[onnx]')"
        log.warning(msg)
        return {"onnx": None, "onnx_message": msg}
    path = out_dir / "model.onnx"
    try:
        torch.onnx.export(
            wrapper, args, str(path), input_names=list(names), output_names=["logits"], dynamo=True
        )
    except Exception as e:  # the exporter's failures come in many types
        msg = f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        log.warning(msg)
        return {"onnx": None, "onnx_message": msg}
    res: dict = {"onnx": str(path)}
    if importlib.util.find_spec("onnxruntime") is None:
        res["onnx_message"] = "ONNX file written; not checked (onnxruntime not installed)"
        return res
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), fresh)}
    out = torch.from_numpy(sess.run(None, feed)[0])
    cmp = _compare(out, eager)
    res["onnx_check"] = cmp
    res["onnx_ok"] = cmp["max_abs"] <= atol + rtol * eager.abs().max().item()
    log.info("ONNX: %s, max |onnxruntime - eager| = %.2e", path, cmp["max_abs"])
    return res

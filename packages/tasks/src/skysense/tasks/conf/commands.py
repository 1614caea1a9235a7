"""Primary configs that are dataclasses, not YAML files: ``skysense ingest``, ``infer``,
``bench``, ``convert``, ``export`` and ``encoders --summary``. Their fields, types and defaults are written once, here or in the runtime config they
extend (:class:`skysense.data.ingest.IngestConfig`); ``skysense <command> --help`` prints the
docstrings below as the meaning of each key. Imported by :func:`schema.register` only (it reads
the data package, which the Hydra-less GPU check script does not install).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from skysense.data.ingest import IngestConfig
from skysense.tasks.conf.schema import InferConfig


@dataclass
class IngestCommandConfig(IngestConfig):
    """``skysense ingest SRC DST``: GeoTIFFs (any CRS, per-band files or stacks) -> shards +
    SQLite manifest. Every field of :class:`skysense.data.ingest.IngestConfig` (above), and:

    src: the source folder, file, STAC catalogue / ItemCollection JSON or STAC GeoParquet.
    dst: the ingest folder (manifest.sqlite, shards/, plots/).
    plots: preview PNGs of the first samples written to DST/plots (0: none).
    """

    src: str = MISSING
    dst: str = MISSING
    plots: int = 2


@dataclass
class BenchConfig:
    """``skysense bench``: the benchmark suite in bench/ (pytest-benchmark), one report, one
    guard.

    mode: full (every figure at the sizes of the issues' acceptance points) or quick (small
      sizes, ratios only, for CI: under 2 minutes).
    tolerance: the base tolerance: a guarded ratio that falls below reference * (1 - tolerance)
      is a regression (exit 1); null: 0.25 in full mode, 0.6 (generous) in quick mode. A figure
      whose reference runs spread further gets a tolerance set from that spread (1.5 x the
      largest departure of a run from their median, at most 0.6: skysense.tasks.bench).
    bench_dir: the suite's folder (null: ./bench, else found upward from the working directory).
    out_dir: where the report goes (null: <bench_dir>/results).
    reference: the reference file, a sample of whole runs' ratios to compare with (null:
      <out_dir>/reference-<mode>.json).
    update_reference: make this run the reference (a sample of one run) instead of guarding.
    add_reference: add this run to the reference's sample of runs (the newest 8 are kept): the
      way to measure the spread the tolerances are set from, quiet and with busy=true.
    busy: the guard under load: one spinning process (a pure-Python loop) holds a core for the
      whole suite; the report records it and the load average.
    threads: torch's CPU threads for the whole suite (also OMP_NUM_THREADS of its processes);
      null: torch's default (one per core). 1 by default: on a shared machine an OpenMP region
      of 2+ threads stalls whenever another process holds a core (the same pre-training step
      measured 0.4 to 19 s with 2 threads on 2 busy cores, 0.36-0.42 s with 1), which no
      interleaving of ours and the baseline undoes. Every figure and its baseline run at the
      same threads.
    pytest_args: extra pytest arguments, e.g. "-k attention".
    """

    mode: str = "full"
    tolerance: float | None = None
    bench_dir: str | None = None
    out_dir: str | None = None
    reference: str | None = None
    update_reference: bool = False
    add_reference: bool = False
    busy: bool = False
    threads: int | None = 1
    pytest_args: str = ""


def _model(preset: str):
    """A primary config's defaults list: ``model=<preset>``, then the config's own fields."""
    return field(default_factory=lambda: [{"model": preset}, "_self_"])


@dataclass
class SummaryConfig:
    """``skysense encoders --summary [model=<preset>]``: parameters per part of a preset,
    against the paper's counts."""

    defaults: list[Any] = _model("tiny")
    model: Any = MISSING


@dataclass
class ReleaseStructure:
    """The release's structure as encoder config fields (over the preset, under
    model.overrides). The released code (SkySense++ config) runs its mmseg ViTs with
    with_cls_token=False (the stored class token and its position row are then unused and
    dropped) and without final_norm, and builds the fusion's LayerNorms with mmseg's default eps
    1e-5. vit_final_norm: auto reads it from the sources (a ViT final norm is stored as
    backbone_s*.ln1). Its Swin V2 (mmpretrain, pad_small_map=False) attends to the zero padding
    of maps that the window does not tile and shifts nothing once a map's side equals the
    window: swin_window_mode release does the same."""

    vit_cls_token: bool = False
    vit_final_norm: Any = "auto"
    fusion_norm_eps: float = 1.0e-5
    swin_window_mode: str = "release"


@dataclass
class ConvertConfig:
    """``skysense convert SRC... DST``: released SkySense .pth files (the three backbone files,
    the grid heads and the fusion, or one combined file) -> a weights folder DST
    (model.safetensors, config.json, SHA256SUMS) that every checkpoint= / weights= reads.

    src: the released files (a list; the command line's SRC... fills it). dst: the output folder.
    strict: a module the sources touch must be complete and every source key must find its
      place, else the command fails listing the keys; false: print the table and write what fits.
    release: the release's structure (below).
    """

    defaults: list[Any] = _model("huge")
    model: Any = MISSING
    src: Any = MISSING
    dst: str = MISSING
    strict: bool = True
    release: ReleaseStructure = field(default_factory=ReleaseStructure)


@dataclass
class ExportHead:
    """The head when checkpoint is not a fine-tuned model file.

    kind: classification | multilabel | segmentation | change. features: the encoder features it
    reads. n_classes, channels: its outputs and width. modalities: input modalities; sensors:
    their sensors where not the default (hr_rgb, s2_l2a, s1_grd_db)."""

    kind: str = "segmentation"
    features: str = "hr"
    n_classes: int = 5
    channels: int = 64
    modalities: list[str] = field(default_factory=lambda: ["hr"])
    sensors: dict[str, str] = field(default_factory=dict)


@dataclass
class ExportConfig:
    """``skysense export checkpoint=MODEL [out=DIR]``: an encoder + task head as a torch.export
    program (DIR/model.pt2) and ONNX (DIR/model.onnx, where the onnx extra is installed), each
    checked against the eager model on fresh inputs (DIR/export.json).

    checkpoint: a fine-tuned model file (skysense finetune's model.pt); or a pre-training
      checkpoint / null (random encoder) with a fresh head described by ``head``.
    out: the output folder.
    format: program (torch.export and ONNX, as above) or safetensors (the checkpoint's weights as
      a weights folder DIR: model.safetensors, config.json, SHA256SUMS, the layout of
      ``skysense convert``, read by every checkpoint= / weights= and by huggingface_hub's
      PyTorchModelHubMixin: skysense.encoders.hub.SkySenseHub.from_pretrained(DIR)).
    encoder_key: the pre-training checkpoint's state dict to use (teacher or student).
    size, batch, steps: the example input: side in reference pixels (null: the model's
      evaluation window), batch, steps.
    onnx: also export ONNX.
    atol, rtol: the exported outputs must match eager within atol + rtol * max|eager|.
    seed: of the example inputs.
    """

    defaults: list[Any] = _model("tiny")
    model: Any = MISSING
    checkpoint: str | None = None
    out: str = "exported"
    format: str = "program"
    encoder_key: str = "teacher"
    head: ExportHead = field(default_factory=ExportHead)
    size: int | None = None
    batch: int = 1
    steps: int = 1
    onnx: bool = True
    atol: float = 1.0e-4
    rtol: float = 1.0e-4
    seed: int = 0


PRIMARY: dict[str, type] = {
    "summary": SummaryConfig,
    "convert": ConvertConfig,
    "export": ExportConfig,
    "ingest": IngestCommandConfig,
    "infer": InferConfig,
    "bench": BenchConfig,
}

"""Faults of the commands that load, save and resume models (issue 13), through the command line
as a user meets them: crafted pickles never run, paths read from files stay in their folder,
resume never loses or overwrites progress, wrong config values and environment faults are one
line naming the field or path, and infer refuses a scene of another sensor.

Each case asserts the exit code, one ``skysense <command>:`` line naming the file or field, no
traceback, and that no file that existed before changed (checksums before and after).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import SKYSENSE, checksums, env, fault_line, kill_when, skysense
from affine import Affine

from skysense.data import io

pytestmark = pytest.mark.faults

TINY = [
    "trainer.linear_probe=false",
    "trainer.threads=1",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=3",
    "trainer.batch_size=4",
]


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step tiny pre-training run (checkpoints at steps 1 and 2) and its data folder."""
    tmp = tmp_path_factory.mktemp("pretrained")
    run, data = tmp / "run", tmp / "data"
    proc = skysense(
        tmp, "pretrain", f"run_dir={run}", f"data.root={data}", "trainer.max_steps=2", *TINY
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, data


@pytest.fixture
def run_copy(pretrained, tmp_path) -> tuple[Path, Path]:
    run, data = pretrained
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", data


def _pretrain(tmp_path, run, data, *args, **kw):
    return skysense(tmp_path, "pretrain", f"run_dir={run}", f"data.root={data}", *TINY, *args, **kw)


class _Evil:
    """Unpickling this writes a marker file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_file(path: Path, marker: Path, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"payload": _Evil(marker), **extra}, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Fine-tuned model files of the tiny preset: an S2 L2A segmentation model and an HR one."""
    from skysense.encoders import build_skysense
    from skysense.tasks.downstream.checkpoint import save_finetuned
    from skysense.tasks.downstream.data import _sensor_inputs
    from skysense.tasks.downstream.model import build_task_model

    tmp = tmp_path_factory.mktemp("models")
    out = {}
    for mod, sensor in (("s2", "s2_l2a"), ("hr", "hr_rgb")):
        torch.manual_seed(0)
        enc = build_skysense("tiny")
        if mod == "s2":
            example = {
                "s2": torch.randn(1, 1, 10, 32, 32),
                "s2_doy": torch.tensor([[100]]),
                "s2_valid": torch.ones(1, 1, dtype=torch.bool),
            }
        else:
            example = {"hr": torch.randn(1, 3, 64, 64)}
        model = build_task_model(enc, "segmentation", mod, 3, example, head_channels=8)
        meta = {
            "preset": "tiny",
            "overrides": {},
            "kind": "segmentation",
            "source": mod,
            "n_classes": 3,
            "channels": model.channels,
            "head": {"head_channels": 8},
            "classes": ["a", "b", "c"],
            "inputs": _sensor_inputs({mod: sensor}, mod),
            "eval": {"window": 32 if mod == "s2" else 64, "overlap": 8},
        }
        out[mod] = save_finetuned(tmp / f"{mod}.pt", model, meta)
    return out


def _s2_stack(path: Path, bands, crs="EPSG:32631", res=10.0, n=48, tags=None) -> Path:
    rng = np.random.default_rng(0)
    a = (500 + rng.integers(0, 2000, (len(bands), n, n))).astype(np.uint16)
    if crs == "EPSG:4326":
        transform = Affine(res, 0, 2.0, 0, -res, 48.0)
    else:
        transform = Affine(res, 0, 400_000.0, 0, -res, 5_300_000.0)
    io.write_geotiff(path, a, crs=crs, transform=transform, nodata=0, band_names=list(bands))
    if tags:
        import rasterio

        with rasterio.open(path, "r+") as ds:
            ds.update_tags(**tags)
    return path


L2A = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
L1C = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")


# ------------------------------------------------------------------- crafted pickles


@pytest.mark.parametrize(
    "command,args",
    [
        ("finetune", ["checkpoint={evil}", "trainer.max_steps=1"]),
        ("evaluate", ["weights={evil}"]),
        ("infer", ["{scene}", "{tmp}/out.tif", "checkpoint={evil}"]),
        ("export", ["checkpoint={evil}", "out={tmp}/exported"]),
    ],
)
def test_a_crafted_pickle_never_runs(tmp_path, command, args):
    marker = tmp_path / "marker"
    evil = _evil_file(tmp_path / "evil.pt", marker, teacher={}, format="skysense-finetuned/1")
    scene = _s2_stack(tmp_path / "scene.tif", L2A)
    before = checksums(evil, scene)
    subst = {"evil": evil, "scene": scene, "tmp": tmp_path}
    proc = skysense(tmp_path, command, *[a.format(**subst) for a in args])
    line = fault_line(proc, command, evil, "refused", rc=2)
    assert "could run code" in line
    assert not marker.exists(), "the crafted pickle ran"
    assert checksums(evil, scene) == before


def test_a_crafted_checkpoint_in_the_run_dir_never_runs_on_resume(tmp_path, pretrained):
    _, data = pretrained
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    _evil_file(run / "checkpoints" / "step_0000001.pt", marker, step=1)
    (run / "checkpoints" / "latest").write_text("step_0000001.pt\n")
    before = checksums(run)
    proc = _pretrain(tmp_path, run, data, "resume=true", "trainer.max_steps=2")
    fault_line(proc, "pretrain", "step_0000001.pt", "none loads", rc=2)
    assert not marker.exists(), "the crafted pickle ran"
    assert checksums(run) == before


def test_a_crafted_weights_file_never_runs_in_convert(tmp_path):
    marker = tmp_path / "marker"
    evil = _evil_file(tmp_path / "evil.pth", marker, state_dict={})
    proc = skysense(tmp_path, "convert", evil, tmp_path / "out")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(evil) in proc.stderr
    assert not marker.exists(), "the crafted pickle ran"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- paths read from files


def test_latest_pointing_outside_the_run_folder_is_refused(tmp_path, run_copy):
    run, data = run_copy
    elsewhere = tmp_path / "elsewhere.pt"
    shutil.copy(run / "checkpoints" / "step_0000001.pt", elsewhere)
    (run / "checkpoints" / "latest").write_text("../../elsewhere.pt\n")
    before = checksums(run, elsewhere)
    proc = _pretrain(tmp_path, run, data, "resume=true", "trainer.max_steps=3")
    fault_line(proc, "pretrain", "latest", "outside", rc=2)
    assert checksums(run, elsewhere) == before


# ------------------------------------------------------------------- lost progress


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))


def test_latest_naming_a_missing_file_resumes_from_the_newest_that_exists(tmp_path, run_copy):
    run, data = run_copy
    (run / "checkpoints" / "latest").write_text("step_0000009.pt\n")
    old = checksums(
        run / "checkpoints" / "step_0000001.pt", run / "checkpoints" / "step_0000002.pt"
    )
    proc = _pretrain(tmp_path, run, data, "resume=true", "trainer.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_0000002.pt at step 2" in proc.stderr
    assert "pretrain done: 3 steps (1 this run)" in proc.stdout
    assert checksums(*map(Path, old)) == old  # the older checkpoints were not overwritten


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, run_copy):
    run, data = run_copy
    newest = run / "checkpoints" / "step_0000002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    prev = checksums(run / "checkpoints" / "step_0000001.pt")
    proc = _pretrain(tmp_path, run, data, "resume=true", "trainer.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_0000002.pt" in proc.stderr and "resuming from step_0000001.pt" in proc.stderr
    assert "pretrain done: 2 steps (1 this run)" in proc.stdout
    assert checksums(run / "checkpoints" / "step_0000001.pt") == prev


def test_a_checkpoint_whose_bytes_changed_fails_its_checksum(tmp_path, run_copy):
    from skysense.tasks.training import checkpoint as ckpt

    run, _ = run_copy
    path = run / "checkpoints" / "step_0000002.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: still a loadable zip
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.load(path)
    found, _ = ckpt.find_resumable(run / "checkpoints")
    assert found.name == "step_0000001.pt"


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, run_copy):
    run, data = run_copy
    for p in (run / "checkpoints").glob("step_*.pt"):
        p.write_bytes(b"not a checkpoint")
    before = checksums(run)
    proc = _pretrain(tmp_path, run, data, "resume=true", "trainer.max_steps=3")
    fault_line(proc, "pretrain", run / "checkpoints", "none loads", rc=2)
    assert checksums(run) == before


def test_a_fresh_run_over_saved_checkpoints_is_refused(tmp_path, run_copy):
    run, data = run_copy
    before = checksums(run)
    proc = _pretrain(tmp_path, run, data, "trainer.max_steps=2")
    fault_line(proc, "pretrain", run, "resume=true", "overwrite=true", rc=2)
    assert checksums(run) == before


def test_resuming_a_finished_run_reports_it_and_changes_nothing(tmp_path, run_copy):
    run, data = run_copy
    before = checksums(run / "checkpoints")
    proc = _pretrain(tmp_path, run, data, "resume=true", "trainer.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already holds the finished run" in proc.stdout
    assert "pretrain done: 2 steps (0 this run)" in proc.stdout
    assert checksums(run / "checkpoints") == before


def test_resuming_with_another_preset_names_the_field(tmp_path, run_copy):
    run, data = run_copy
    before = checksums(run)
    proc = _pretrain(tmp_path, run, data, "resume=true", "model=small", "trainer.max_steps=3")
    fault_line(proc, "pretrain", "model.preset", "'small'", "'tiny'", rc=2)
    assert checksums(run) == before


def test_sigkill_during_pretraining_then_resume_finishes(tmp_path, pretrained):
    """A run killed at any moment (here: after its first checkpoint) resumes from its newest
    intact checkpoint; no temporary file is taken for a checkpoint."""
    _, data = pretrained
    run = tmp_path / "run"
    args = [
        str(SKYSENSE),
        "pretrain",
        f"run_dir={run}",
        f"data.root={data}",
        *TINY,
        "trainer.max_steps=4",
    ]
    kill_when(
        args, lambda: list((run / "checkpoints").glob("step_*.pt.sha256")), tmp_path, env(tmp_path)
    )
    assert list((run / "checkpoints").glob("step_*.pt")), "killed before any checkpoint"
    proc = _pretrain(tmp_path, run, data, "resume=true", "trainer.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrain done: 4 steps" in proc.stdout
    assert not list((run / "checkpoints").glob(".*.tmp"))


# ------------------------------------------------------------------ config values


@pytest.mark.parametrize(
    "command,override,field",
    [
        ("pretrain", "optim.lr=abc", "optim.lr"),
        ("pretrain", "optim.weight_decay=abc", "optim.weight_decay"),
        ("pretrain", "trainer.max_steps=1.5", "trainer.max_steps"),
        ("pretrain", "trainer.fooo=1", "trainer.fooo"),
        ("pretrain", "resume=maybe", "resume"),
        ("finetune", "trainer.max_steps=abc", "trainer.max_steps"),
        ("finetune", "optim.lr=abc", "optim.lr"),
        ("infer", "window=abc", "window"),
    ],
)
def test_a_wrong_config_value_is_one_line_before_anything_is_created(
    tmp_path, command, override, field
):
    run = tmp_path / "run"
    extra = ["a.tif", "b.tif", "checkpoint=m.pt"] if command == "infer" else [f"run_dir={run}"]
    proc = skysense(tmp_path, command, *extra, override)
    fault_line(proc, command, field, rc=2)
    assert not run.exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "logs").exists()  # a config error needs no debug log


# ------------------------------------------------------------ checkpoints that are wrong


def test_a_missing_checkpoint_names_it(tmp_path):
    proc = skysense(tmp_path, "finetune", f"checkpoint={tmp_path}/nope.pt", "trainer.max_steps=1")
    fault_line(proc, "finetune", "nope.pt", "does not exist", rc=2)


def test_a_file_that_is_not_a_checkpoint_names_it(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("these are not weights")
    proc = skysense(tmp_path, "export", f"checkpoint={bad}", f"out={tmp_path}/x")
    fault_line(proc, "export", bad, "not a torch file", rc=2)
    assert not (tmp_path / "x").exists()


def test_a_finetuned_model_as_pretraining_checkpoint_is_explained(tmp_path, models):
    proc = skysense(tmp_path, "finetune", f"checkpoint={models['hr']}", "trainer.max_steps=1")
    fault_line(proc, "finetune", models["hr"], "fine-tuned model file", rc=2)


def test_a_pretraining_checkpoint_as_model_file_is_explained(tmp_path, pretrained):
    run, _ = pretrained
    ckpt = run / "checkpoints" / "step_0000002.pt"
    scene = _s2_stack(tmp_path / "scene.tif", L2A)
    proc = skysense(tmp_path, "infer", scene, tmp_path / "o.tif", f"checkpoint={ckpt}")
    fault_line(proc, "infer", "fine-tune it first", rc=2)
    assert not (tmp_path / "o.tif").exists()


# ------------------------------------------------------------------- environment faults


def test_a_run_dir_under_a_file_is_one_line_naming_it(tmp_path, pretrained):
    _, data = pretrained
    (tmp_path / "file").write_text("x")
    proc = _pretrain(tmp_path, tmp_path / "file" / "run", data, "trainer.max_steps=1")
    line = fault_line(proc, "pretrain", tmp_path / "file", rc=1)
    assert "details:" in line and Path(line.split("details: ")[1].rstrip(")")).exists()


def test_an_unwritable_run_dir_is_one_line_naming_it(tmp_path, pretrained):
    _, data = pretrained
    run = tmp_path / "ro"
    run.mkdir()
    ro = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(run)])
    if ro.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    try:
        proc = _pretrain(tmp_path, run, data, "trainer.max_steps=1")
        fault_line(proc, "pretrain", run, "Read-only", rc=1)
    finally:
        subprocess.run(["umount", str(run)])


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, pretrained):
    """A 1 MB file system cannot take a checkpoint of the tiny model: the run stops in one
    line naming the path; nothing temporary is left."""
    _, data = pretrained
    run = tmp_path / "small"
    run.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(run)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        proc = _pretrain(tmp_path, run, data, "trainer.max_steps=1")
        fault_line(proc, "pretrain", "No space left", rc=1)
        assert not list(run.rglob("*.tmp")) and not list(run.rglob("step_*.pt"))
    finally:
        subprocess.run(["umount", str(run)])


# ----------------------------------------------------------------------------- infer


def test_infer_refuses_a_level1c_scene_for_a_level2a_model(tmp_path, models):
    scene = _s2_stack(tmp_path / "S2A_MSIL1C_scene.tif", L1C, crs="EPSG:4326", res=0.0001)
    before = checksums(scene)
    proc = skysense(tmp_path, "infer", scene, tmp_path / "o.tif", f"checkpoint={models['s2']}")
    line = fault_line(proc, "infer", scene, "L1C", "B10", "check_sensor=false", rc=2)
    assert "s2_l2a" in line
    assert not (tmp_path / "o.tif").exists() and checksums(scene) == before


def test_infer_refuses_a_per_band_level1c_folder(tmp_path, models):
    folder = tmp_path / "S2B_MSIL1C_20200101"
    folder.mkdir()
    for b in L1C:
        _s2_stack(folder / f"T31UDQ_20200101T105441_B{b[1:].zfill(2)}.tif", [b])
    proc = skysense(tmp_path, "infer", folder, tmp_path / "o.tif", f"checkpoint={models['s2']}")
    fault_line(proc, "infer", folder, "L1C", rc=2)


def test_infer_refuses_a_scene_at_another_pixel_size(tmp_path, models):
    scene = _s2_stack(tmp_path / "coarse.tif", L2A, res=60.0)
    proc = skysense(tmp_path, "infer", scene, tmp_path / "o.tif", f"checkpoint={models['s2']}")
    fault_line(proc, "infer", scene, "60 m", rc=2)


def test_infer_check_sensor_false_runs_with_a_warning_and_removes_stale_partials(tmp_path, models):
    scene = _s2_stack(tmp_path / "S2A_MSIL1C_x.tif", L2A, n=40)
    stale = tmp_path / ".o.tif.partial-999999.tif"  # left by a killed run (no such process)
    stale.write_bytes(b"half a tif")
    proc = skysense(
        tmp_path,
        "infer",
        scene,
        tmp_path / "o.tif",
        f"checkpoint={models['s2']}",
        "check_sensor=false",
        "progress=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "check_sensor=false: running anyway" in proc.stderr
    assert (tmp_path / "o.tif").exists() and not stale.exists()
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["height"] == 40


def test_infer_into_an_existing_output_names_it(tmp_path, models):
    scene = _s2_stack(tmp_path / "scene.tif", L2A)
    out = tmp_path / "o.tif"
    out.write_bytes(b"keep me")
    proc = skysense(tmp_path, "infer", scene, out, f"checkpoint={models['s2']}")
    fault_line(proc, "infer", out, "overwrite=true", rc=2)
    assert out.read_bytes() == b"keep me"

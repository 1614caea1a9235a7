"""One large-scene inference run in a fresh process, timed and measured: this project's
``run_inference`` (``skysense infer``) or TerraTorch's ``tiled_inference`` over the same model.

Run by bench/test_bench_peers.py, ours with the project's .venv, the peer with
.venv-peers-terratorch (the peer's run puts this checkout's skysense sources first on its path:
the environment may be shared between checkouts through $SKYSENSE_PEERS_VENV):

    python infer_run.py {ours|terratorch} MODEL.pt SCENE.tif OUT.tif WINDOW OVERLAP BATCH

Prints one JSON line: wall and CPU seconds (process time, all threads) of the run, the rise of
the resident peak during it (MiB), the forwards' window count, versions. The model is loaded (and every import done) before the
measure, so both sides time reading, normalising, tiling, the forwards, blending and writing.

The peer is what a TerraTorch user writes for a scene that fits in memory: read the scene,
normalise it as one tensor, ``tiled_inference(model_forward, x, crop=WINDOW,
stride=WINDOW-OVERLAP, delta=0, padding=False, batch_size=BATCH)`` (delta=0: blend over the whole
overlap as ours does; no padding, which delta=0 would not use), argmax, write a tiled GeoTIFF.
``model_forward`` is this project's model and softmax (``evaluation.probabilities``), the
function ours calls per batch.
"""

from __future__ import annotations

import json
import sys
import time


def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _queued() -> float:
    """Seconds this process's threads have waited on a run queue (ready, no CPU free): the share
    of wall time that other processes on the machine take (/proc/self/task/*/schedstat)."""
    import glob

    total = 0
    for path in glob.glob("/proc/self/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[1])
        except OSError:  # a thread that ended meanwhile
            pass
    return total / 1e9


def _checkout_sources() -> None:
    """This checkout's skysense sources first on ``sys.path`` (the peer's environment has no
    skysense installed; a path baked into it at build time would name whichever checkout built
    it, perhaps since deleted)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sys.path[:0] = [
        str(p) for p in (root / "kernels" / "src", *sorted(root.glob("packages/*/src")))
    ]


def main() -> None:
    side, model_path, scene, out = sys.argv[1:5]
    if side == "terratorch":
        _checkout_sources()
    window, overlap, batch = (int(a) for a in sys.argv[5:8])
    import numpy as np
    import rasterio
    import torch

    torch.set_num_threads(int(sys.argv[8]) if len(sys.argv) > 8 else 1)
    from skysense.tasks.downstream.checkpoint import load_finetuned
    from skysense.tasks.downstream.evaluation import probabilities

    model, meta = load_finetuned(model_path)
    model.eval()
    counted = {"windows": 0}
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    if side == "terratorch":
        import importlib.metadata as md

        from terratorch.tasks.tiled_inference import tiled_inference

        versions["terratorch"] = md.version("terratorch")
        versions["torchgeo"] = md.version("torchgeo")
        norm = meta["inputs"]["hr"]
        mean = torch.tensor(norm["mean"], dtype=torch.float32)[:, None, None]
        std = torch.tensor(norm["std"], dtype=torch.float32)[:, None, None]

        def model_forward(x):
            counted["windows"] += x.shape[0]
            doy = torch.zeros(x.shape[0], dtype=torch.int64)
            return probabilities(model, meta["kind"], {"hr": x, "hr_doy": doy}, x.shape[-1])

        def run():
            with rasterio.open(scene) as src:
                arr = src.read()
                profile = src.profile
            x = torch.from_numpy(arr).float().sub_(mean).div_(std)[None]
            del arr
            with torch.no_grad():
                prob = tiled_inference(
                    model_forward, x, crop=window, stride=window - overlap, delta=0,
                    padding=False, batch_size=batch, verbose=False,
                )  # fmt: skip
            del x
            cls = prob[0].argmax(0).numpy().astype(np.uint8)
            del prob
            profile.update(
                count=1, dtype="uint8", nodata=255, tiled=True, blockxsize=256, blockysize=256,
                compress="deflate", BIGTIFF="IF_SAFER",
            )  # fmt: skip
            with rasterio.open(out, "w", **profile) as dst:
                dst.write(cls, 1)
            return {}
    else:
        from skysense.tasks.downstream import infer

        def run():
            r = infer.run_inference(
                model_path, scene, out, window=window, overlap=overlap, batch_size=batch,
                progress=False, overwrite=True,
            )  # fmt: skip
            counted["windows"] = r["window_evaluations"]
            return {"scene_windows": r["windows"]}

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the resident peak restarts from the current resident size
    before = _status("VmRSS")
    t0, c0, q0 = time.perf_counter(), time.process_time(), _queued()
    extra = run()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    queued = _queued() - q0
    rise = _status("VmHWM") - before
    print(
        "RESULT "
        + json.dumps(
            {
                "side": side,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "queued_seconds": queued,
                "rss_rise_mib": rise,
                "forward_windows": counted["windows"],
                "versions": versions,
                **extra,
            }
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()

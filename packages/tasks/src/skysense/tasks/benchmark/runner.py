"""`skysense benchmark suite=NAME`: every entry of a suite (dataset x task x protocol), every
model (the ``checkpoints`` side by side, the encoder at random init, the baselines), every seed;
then the report (:mod:`report`).

Under ``run_dir``: ``config.yaml`` (the composed benchmark config), ``report.{md,json,png}``
(rewritten after each entry, so a stopped run leaves the finished entries), and per run
``runs/<entry>/<model>/seed<k>/{config.yaml, run.log, result.json}`` (fine-tuning protocols
also leave the fine-tuned model and its plots there).

Feature rows are computed once per (data, features, model) and reused across seeds and the
probe protocols of one suite; the random-init encoder is drawn anew for each seed
(``torch.manual_seed(seed)``), so its spread covers initialisations too.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from skysense.tasks.benchmark import protocols, report
from skysense.tasks.benchmark.pretrained import pretrained_checkpoints
from skysense.tasks.benchmark.sources import feature_set

log = logging.getLogger(__name__)

RANDOM = "random init"
SPECTRAL = "spectral"
BASELINES = (SPECTRAL, "unet")
# data the probes also read without a task config (an entry's task then only names it)
PROBE_DATA = ("eolearn_slovenia",)


def entry_id(e) -> str:
    frac = float(e.label_fraction)
    return f"{e.data}/{e.task}/{e.protocol}" + (f"@{frac:g}" if frac < 1 else "")


@contextmanager
def run_log(path: Path):
    """Everything logged while the block runs also goes to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(path, mode="w")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(h)
    root.setLevel(min(old, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(h)
        root.setLevel(old)
        h.close()


def entry_configs(cfg, e) -> tuple[DictConfig | None, DictConfig]:
    """(the composed finetune config of the entry or None, its data config)."""
    from skysense.tasks.cli import compose, config_groups

    data_args = OmegaConf.to_container(e.data_args, resolve=True) if e.get("data_args") else {}
    groups = config_groups("finetune")
    no_task = e.task not in groups.get("task", []) and e.protocol in protocols.FEATURE_PROTOCOLS
    if e.data not in groups.get("data", []) or (e.data in PROBE_DATA and no_task):
        if e.data not in PROBE_DATA:
            raise ValueError(f"data={e.data} is neither a data config nor one of {PROBE_DATA}")
        return None, OmegaConf.create({"name": e.data, **data_args})
    base = compose("finetune", [f"task={e.task}", f"data={e.data}", *list(e.overrides or [])])
    OmegaConf.set_struct(base, False)
    base = OmegaConf.merge(base, {"data": data_args, "model": cfg.model})
    base.trainer.device = cfg.device
    base.trainer.threads = cfg.threads
    return base, base.data


def data_present(data_cfg) -> bool:
    if data_cfg.name in ("embedded", "shards"):
        return True
    if OmegaConf.is_missing(data_cfg, "root"):
        return False
    if not data_cfg.get("root"):
        return True
    return Path(str(data_cfg.root)).expanduser().exists()


def models_of(cfg) -> list[tuple[str, str | None]]:
    """(name, checkpoint or None for random init, or the baseline's name)."""
    out = [(str(k), str(v)) for k, v in (cfg.checkpoints or {}).items()]
    if cfg.random_init:
        out.append((RANDOM, None))
    for b in cfg.baselines or []:
        if b not in BASELINES:
            raise ValueError(f"baselines: {b!r} is not one of {BASELINES}")
        out.append((b, b))
    return out


class Featurisers:
    """Encoders and feature rows, cached: checkpoint rows once, random-init rows per seed."""

    def __init__(self, cfg, device, max_cached: int = 6):
        self.cfg, self.device, self.rows, self.max_cached = cfg, device, {}, max_cached

    def encoder(self, ckpt: str | None, seed: int):
        from skysense.tasks.downstream.checkpoint import build_encoder

        torch.manual_seed(seed)
        enc, _ = build_encoder(
            self.cfg.model.preset,
            OmegaConf.to_container(self.cfg.model.overrides, resolve=True),
            ckpt,
            self.cfg.encoder_key,
            self.cfg.strict,
        )
        return enc.eval().to(self.device)

    def feature_set(self, e, data_cfg, model: str, ckpt: str | None, seed: int):
        keys = ("features", "window", "pixels_per_scene", "max_test_pixels", "batch_size")
        k = json.dumps(
            [OmegaConf.to_container(data_cfg, resolve=True), [e.get(x) for x in keys], model,
             seed if ckpt is None else None],
            sort_keys=True, default=str,
        )  # fmt: skip
        if k not in self.rows:
            feat = SPECTRAL if ckpt == SPECTRAL else self.encoder(ckpt, seed)
            while len(self.rows) >= self.max_cached:  # bounded memory (dense sets are large)
                self.rows.pop(next(iter(self.rows)))
            self.rows[k] = feature_set(e, data_cfg, feat, self.device)
        return self.rows[k]


def unet_applies(e, base) -> bool:
    """The U-Net runs beside the fine-tuning protocols of segmentation and change entries."""
    return (
        base is not None
        and e.protocol in protocols.TRAIN_PROTOCOLS
        and base.task.get("kind") in ("segmentation", "change")
    )


def run_one(cfg, e, base, data_cfg, feats, model, ckpt, seed, out: Path) -> dict:
    proto = e.protocol
    if ckpt == "unet":
        if base is None or proto not in protocols.TRAIN_PROTOCOLS:
            raise NotImplementedError(
                "the U-Net baseline runs beside the fine-tuning protocols (same crops, loss and "
                f"steps), not beside {proto} on data={e.data}"
            )
        from skysense.tasks.benchmark.unet import unet_protocol

        return unet_protocol(e, base, seed, out)
    if proto in protocols.FEATURE_PROTOCOLS or ckpt == SPECTRAL:
        method = protocols.FEATURE_PROTOCOLS.get(proto, "linear")
        fs = feats.feature_set(e, data_cfg, model, ckpt, seed)
        res = protocols.probe_protocol(e, fs, seed, method)
        res["data_info"] = fs.info
        res["classes"] = fs.classes
        if proto not in protocols.FEATURE_PROTOCOLS:
            res["note"] = f"spectral baseline of a {proto} entry: linear probe on the same data"
        return res
    if base is None:
        raise NotImplementedError(f"protocol {proto} on data={e.data} (probe-only data)")
    return protocols.train_protocol(e, base, proto, ckpt, seed, out)


def run_benchmark(cfg: DictConfig) -> dict:
    from skysense.tasks.downstream.run import write_json
    from skysense.tasks.training.runtime import resolve_device, set_threads

    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device, "device")
    found = pretrained_checkpoints(cfg)  # before set_threads: pre-training keeps its own
    if found:
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.checkpoints = found
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # with the checkpoints used
    set_threads(cfg.threads)
    models = models_of(cfg)
    feats = Featurisers(cfg, device)
    seeds = [int(s) for s in cfg.seeds]
    t_start = time.perf_counter()
    results = {"suite": cfg.suite.name, "seeds": seeds, "models": [m for m, _ in models],
               "checkpoints": dict(cfg.checkpoints or {}), "entries": []}  # fmt: skip
    if not cfg.checkpoints:
        results["note"] = "no checkpoints given: random init and baselines only"
    for raw in cfg.suite.entries:
        # plain (non-struct) copies: an entry may add keys (data_args) the defaults lack
        e = OmegaConf.merge(
            OmegaConf.create(OmegaConf.to_container(cfg.entry_defaults)),
            OmegaConf.create(OmegaConf.to_container(raw, resolve=True)),
        )
        eid = entry_id(e)
        rec = {"id": eid, "data": e.data, "task": e.task, "protocol": e.protocol,
               "label_fraction": float(e.label_fraction), "status": "ok", "models": {}}  # fmt: skip
        results["entries"].append(rec)
        try:
            protocols.check_protocol(e.protocol)
            base, data_cfg = entry_configs(cfg, e)
        except NotImplementedError as err:
            rec.update(status="not implemented", reason=str(err))
            continue
        except Exception as err:  # a bad entry is reported; the suite goes on
            rec.update(status="config error", reason=f"{type(err).__name__}: {err}")
            log.error("%s: %s", eid, rec["reason"])
            continue
        if base is None and e.protocol in protocols.TRAIN_PROTOCOLS:
            rec.update(status="not implemented",
                       reason=f"protocol {e.protocol} on data={e.data}: probe-only data, no "
                              "fine-tuning reader")  # fmt: skip
            continue
        if not data_present(data_cfg):
            rec.update(status="data absent", reason=f"data.root {data_cfg.get('root')} not found")
            log.warning("%s: data absent (%s)", eid, data_cfg.get("root"))
            continue
        for model, ckpt in models:
            if ckpt == "unet" and not unet_applies(e, base):
                continue  # the U-Net baseline has no row where it does not apply
            runs = []
            for seed in seeds:
                out = run_dir / "runs" / eid.replace("/", "__") / model.replace(" ", "_")
                out = out / f"seed{seed}"
                out.mkdir(parents=True, exist_ok=True)
                conf = {"entry": OmegaConf.to_container(e, resolve=True), "model": model,
                        "checkpoint": ckpt, "seed": seed,
                        "data": OmegaConf.to_container(data_cfg, resolve=True)}  # fmt: skip
                (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(conf)))
                t0 = time.perf_counter()
                with run_log(out / "run.log"):
                    log.info("=== %s | %s | seed %d", eid, model, seed)
                    try:
                        res = run_one(cfg, e, base, data_cfg, feats, model, ckpt, seed, out)
                    except NotImplementedError as err:
                        res = {"score": math.nan, "error": f"not implemented: {err}"}
                    except Exception as err:  # one failed run is reported, the suite goes on
                        log.error("%s", traceback.format_exc())
                        res = {"score": math.nan, "error": f"{type(err).__name__}: {err}"}
                res["seconds"] = time.perf_counter() - t0
                res["seed"] = seed
                write_json(out / "result.json", res)
                log.info("%s | %s | seed %d: %s %.4f (%.1f s)", eid, model, seed,
                         res.get("metric", "score"), res["score"], res["seconds"])  # fmt: skip
                runs.append(res)
            rec["models"][model] = {"runs": runs}
        report.write(results, run_dir, cfg.n_boot, time.perf_counter() - t_start)
    return report.write(results, run_dir, cfg.n_boot, time.perf_counter() - t_start)

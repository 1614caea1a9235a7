"""The pre-training loop, top to bottom: set up, (resume), steps, checkpoints, probe, summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from skysense.tasks.training import checkpoint as ckpt
from skysense.tasks.training import dist as D
from skysense.tasks.training.meta_arch import MetaArch, to_device
from skysense.tasks.training.runtime import seed_everything

log = logging.getLogger(__name__)


def _state_dicts(student, teacher, optimizer, info):
    """Full (unsharded) state dicts on every rank's CPU, also under FSDP."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module = student.module if hasattr(student, "module") else student
    s = get_model_state_dict(module, options=opts)
    t = get_model_state_dict(teacher, options=opts)
    o = get_optimizer_state_dict(module, optimizer, options=opts)
    return s, t, o


def _load_state(student, teacher, optimizer, state):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    module = student.module if hasattr(student, "module") else student
    set_model_state_dict(module, state["student_module"], options=opts)
    set_model_state_dict(teacher, state["teacher_module"], options=opts)
    # Parameters that never had a gradient (the Swin norms that feed only the downstream
    # pyramids) have no AdamW state: the checkpoint has no entry for them, as it should.
    set_optimizer_state_dict(
        module,
        optimizer,
        state["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    # Loading first initialises every parameter's state (a zero-gradient step at lr 0): drop
    # it again for those, so that the optimizer is exactly the one that was saved.
    saved = set(state["optimizer"].get("state", {}))
    for name, p in module.named_parameters():
        if name not in saved and p in optimizer.state:
            del optimizer.state[p]


def train(cfg: DictConfig, run) -> dict:
    """Run pre-training as ``cfg`` says. ``run`` carries what the entry point prepared (model
    builders, loaders, probe, logging sinks, the dist info). Returns the summary dict."""
    info: D.DistInfo = run.info
    tcfg = cfg.trainer
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.seed)  # the same initial weights on every process
    trainer = MetaArch(cfg, info, run.build_encoder())
    trainer.distribute()
    # Then one random stream per process: stochastic depth and the pixel-pair draws of one
    # process must not repeat those of another (a resume restores each process's own stream).
    seed_everything(cfg.seed + info.rank)
    resumed = _resume(cfg, trainer, run_dir)
    if isinstance(resumed, dict):  # the run had already finished: its summary
        return resumed
    start_step, data_position, history = resumed
    it = iter(run.build_loader(data_position, tcfg.batch_size // info.world_size))
    probe_random = run.probe(trainer.teacher.encoder) if start_step == 0 else None
    if probe_random is not None:
        log.info("linear probe of the randomly initialised encoder: %.3f", probe_random)
    logs = RunLog(cfg, run, trainer, start_step, history)
    last_path = ckpt.latest(run_dir / "checkpoints")
    try:  # the bar ends its line whatever happens, so a fault message starts on its own
        for step in range(start_step, tcfg.max_steps):
            views = to_device(next(it), info.device)
            data_position += 1
            logs.record(step + 1, trainer.step(views, step))
            if (step + 1) % tcfg.checkpoint_every == 0 or step + 1 == tcfg.max_steps:
                last_path = save_checkpoint(
                    run_dir / "checkpoints", step + 1, data_position, trainer, history, cfg
                )
    finally:
        logs.bar.close()
    return _finish(cfg, run, trainer, logs, start_step, last_path, probe_random)


def _resume(cfg: DictConfig, trainer: MetaArch, run_dir: Path):
    """(start step, data position, history): zeros without ``resume``, else those of the newest
    checkpoint that loads (its weights, optimizer and this process's RNG state restored); or the
    finished run's summary (a dict) when it has already run to ``trainer.max_steps``."""
    ckpt_dir = run_dir / "checkpoints"
    found = ckpt.find_resumable(ckpt_dir) if cfg.resume else None
    if found is None:
        if cfg.resume:
            log.info("resume: no checkpoint in %s, starting afresh", ckpt_dir)
        return 0, 0, []
    path, state = found
    check_resume_config(cfg, state, path)
    if state["step"] >= cfg.trainer.max_steps and (run_dir / "summary.json").exists():
        done = json.loads((run_dir / "summary.json").read_text())
        if done.get("steps") == state["step"]:
            return {**done, "steps_this_run": 0, "already_finished": True}
    try:
        _load_state(trainer.student, trainer.teacher, trainer.optimizer, state)
    except (RuntimeError, KeyError, ValueError) as e:
        first = " ".join(str(e).split())[:300]
        raise ckpt.CheckpointError(
            path, f"does not fit this run's model or optimizer: {first}"
        ) from e
    rank = trainer.info.rank
    ckpt.set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
    log.info("resumed from %s at step %d", path, state["step"])
    return state["step"], state["data_position"], state.get("history", [])


class RunLog:
    """What a run records per step: the history (loss, lr, terms, throughput, health), the
    TensorBoard scalars (main process), the label-free health signals every
    ``trainer.health_every`` steps and at the end, and the progress bar."""

    def __init__(self, cfg: DictConfig, run, trainer: MetaArch, start_step: int, history: list):
        self.tcfg, self.history = cfg.trainer, history
        main = run.info.is_main
        self.monitor = (
            run.health_monitor(trainer.teacher) if hasattr(run, "health_monitor") else None
        )
        self.health: dict | None = None
        self.writer = run.tensorboard(Path(cfg.run_dir)) if main else None
        self.bar = run.progress(total=self.tcfg.max_steps, initial=start_step, disable=not main)
        self.samples, self.t0 = 0, time.perf_counter()
        self.loss = history[-1]["loss"] if history else float("nan")

    def record(self, n: int, rec: dict) -> None:
        """Step ``n`` (1-based) done, with MetaArch.step's record ``rec``."""
        self.samples += self.tcfg.batch_size
        # The loss and terms of the global batch: each process's, averaged over processes.
        mean = D.mean_over_processes({"loss": rec["loss"], **rec["terms"]})
        self.loss = mean.pop("loss")
        sps = self.samples / max(time.perf_counter() - self.t0, 1e-9)
        self.history.append(
            {"step": n, "loss": self.loss, "lr": rec["lr"], "terms": mean, "samples_per_s": sps}
        )
        w = self.writer
        if w is not None and n % self.tcfg.log_every == 0:
            w.add_scalar("loss/total", self.loss, n)
            for k, v in mean.items():
                w.add_scalar(f"loss/{k}", v, n)
            for k in ("lr", "wd", "momentum", "grad_norm"):
                w.add_scalar(f"optim/{k}", rec[k], n)
            w.add_scalar("throughput/samples_per_s", sps, n)
        every = self.tcfg.get("health_every", 0)
        if self.monitor is not None and (n % every == 0 or n == self.tcfg.max_steps):
            self.health = self.monitor(rec["teacher_temp"], n)
            self.history[-1]["health"] = self.health
            for k, v in self.health.items():
                if w is not None:
                    w.add_scalar(f"health/{k}", v, n)
        postfix = {"loss": f"{self.loss:.4f}", "sps": f"{sps:.1f}"}
        if self.health is not None:
            postfix["rankme"] = f"{self.health['rankme']:.1f}"
        self.bar.set_postfix(**postfix)
        self.bar.update(1)


def _finish(cfg, run, trainer, logs: RunLog, start_step, last_path, probe_random) -> dict:
    """The trained teacher's probe and the run's summary (written with the loss plot by the
    main process)."""
    tcfg, info = cfg.trainer, run.info
    elapsed = time.perf_counter() - logs.t0
    summary = {
        "steps": tcfg.max_steps,
        "steps_this_run": tcfg.max_steps - start_step,
        "samples_per_s": logs.samples / max(elapsed, 1e-9),
        "final_loss": logs.loss,
        "checkpoint": str(last_path) if last_path else None,
        "probe_random_init": probe_random,
        "probe_pretrained": run.probe(trainer.teacher.encoder),
        "health": logs.health,
        "effective_batch": tcfg.batch_size,
        "world_size": info.world_size,
    }
    if info.is_main:
        if logs.writer is not None:
            logs.writer.close()
        if logs.history:
            summary["loss_plot"] = str(
                run.plot(logs.history, Path(cfg.run_dir) / "loss_curves.png")
            )
        (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def check_resume_config(cfg: DictConfig, state: dict, path) -> None:
    """A resume must build the model the checkpoint was trained with: the model preset, its
    overrides and head sizes must match; raises ConfigError naming the first that differs
    (anything else that does not fit fails loading, as a CheckpointError)."""
    from skysense.tasks.errors import ConfigError

    saved = state.get("config") or {}
    now = OmegaConf.to_container(cfg, resolve=True)
    a, b = saved.get("model") or {}, now.get("model") or {}
    for k in ("preset", "overrides", "heads"):
        if k in a and a.get(k) != b.get(k):
            raise ConfigError(
                f"model.{k}",
                f"{b.get(k)!r} differs from {a.get(k)!r} of the checkpoint {path} being resumed: "
                f"resume with model.{k} as saved, or start afresh in another run_dir",
            )


def save_checkpoint(ckpt_dir, step, data_position, trainer: MetaArch, history, cfg):
    info = trainer.info
    s, t, o = _state_dicts(trainer.student, trainer.teacher, trainer.optimizer, info)
    rngs = [ckpt.rng_state()]
    if info.distributed:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, ckpt.rng_state())
        rngs = gathered
    path = None
    if info.is_main:
        state = {
            "student_module": s,
            "teacher_module": t,
            "student": {k[len("encoder.") :]: v for k, v in s.items() if k.startswith("encoder.")},
            "teacher": {k[len("encoder.") :]: v for k, v in t.items() if k.startswith("encoder.")},
            "optimizer": o,
            "step": step,
            "data_position": data_position,
            "rng": rngs,
            "history": history,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "loss_terms": sorted(history[-1]["terms"]) if history else [],
        }
        path = ckpt.save(ckpt_dir, step, state, keep=cfg.trainer.get("keep_checkpoints", 2))
    if info.distributed:
        torch.distributed.barrier()
    return path or ckpt.latest(ckpt_dir)

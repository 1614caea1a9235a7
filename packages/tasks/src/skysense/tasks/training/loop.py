"""The pre-training loop, top to bottom: set up, (resume), steps, checkpoints, probe, summary."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from skysense.tasks.training import checkpoint as ckpt
from skysense.tasks.training import dist as D
from skysense.tasks.training.meta_arch import Student, Teacher, ema_update
from skysense.tasks.training.optim import build_optimizer, scaled_lr, set_lr_wd
from skysense.tasks.training.runtime import seed_everything
from skysense.tasks.training.schedules import cosine, warmup_cosine

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss went NaN/inf: names the step and the terms that went bad."""


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return batch


def _loss_inputs(outputs: list[dict]) -> list[dict]:
    """The keys of the teacher's outputs that the loss and the GCPL update read (the taps and
    stages of every micro-batch need not be held through the step)."""
    keep = ("tokens_", "valid_")
    return [
        {k: v for k, v in o.items() if k.startswith(keep) or k in ("fused", "region")}
        for o in outputs
    ]


def split_micro(views: dict, n: int) -> list[list[dict]]:
    """Split a views batch {"view1": b, "view2": b} into ``n`` equal micro-batches (list of
    [view1, view2])."""
    if n == 1:
        return [[views["view1"], views["view2"]]]
    out = []
    for i in range(n):
        pair = []
        for key in ("view1", "view2"):
            b = views[key]
            size = next(v.shape[0] for v in b.values() if torch.is_tensor(v))
            chunk = size // n
            pair.append(
                {
                    k: (v[i * chunk : (i + 1) * chunk] if torch.is_tensor(v) else v)
                    for k, v in b.items()
                }
            )
        out.append(pair)
    return out


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


class Trainer:
    """Student, teacher, optimizer and one optimizer step, built from the config.

    ``step(views, step)`` runs the teacher on both views, the student and the loss on each
    micro-batch, backward, clipping, the AdamW step with the scheduled lr and weight decay, the
    teacher EMA and the GCPL prototype update. The loop, the benchmarks and the tests share it.
    With ``trainer.grad_accum`` > 1 the micro-batches run under ``SkySenseLoss.accumulation``:
    the step's MGCL terms, gradients and teacher-centre update are those of the whole batch
    (CMA's InfoNCE takes its negatives from each micro-batch).
    """

    def __init__(self, cfg: DictConfig, info: D.DistInfo, encoder: torch.nn.Module, loss_fn):
        self.cfg, self.info = cfg, info
        self.tcfg, self.ocfg = cfg.trainer, cfg.optim
        device = info.device
        self.student = Student(encoder.to(device), loss_fn.to(device))
        self.teacher = Teacher(self.student).to(device)
        self.optimizer = build_optimizer(self.student, self.ocfg)
        self.peak_lr = scaled_lr(self.ocfg, self.tcfg.batch_size)
        use_bf16 = self.tcfg.precision == "bf16" or (
            self.tcfg.precision == "auto" and device.type == "cuda"
        )
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.wrapped = self.student

    def distribute(self) -> None:
        """Wrap for DDP/FSDP and compile, before any checkpoint is loaded (loading goes through
        the distributed state-dict API, which shards a full checkpoint as the wrapping says)."""
        self.wrapped = D.wrap(self.student, self.tcfg.strategy, self.info)
        if self.tcfg.strategy == "fsdp" and self.info.distributed:
            D.wrap(self.teacher, "fsdp", self.info)
            # fully_shard replaces every parameter with a sharded one: an optimizer built on
            # the old tensors would step on copies the model no longer reads.
            self.optimizer = build_optimizer(self.student, self.ocfg)
        if self.tcfg.compile:
            self.student.encoder.compile()
            self.teacher.encoder.compile()

    def autocast(self):
        """The precision context of the forward passes (bf16 autocast, or none)."""
        return torch.autocast(
            self.info.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def schedules(self, step: int) -> tuple[float, float, float]:
        t, o = self.tcfg, self.ocfg
        lr = warmup_cosine(step, t.max_steps, o.warmup_steps, self.peak_lr, o.min_lr)
        wd = cosine(step, t.max_steps, o.weight_decay, o.weight_decay_end)
        momentum = cosine(step, t.max_steps, t.teacher_momentum, 1.0)
        return lr, wd, momentum

    def step(self, views: dict, step: int) -> dict:
        """One optimizer step on a views batch (this process's share of the global batch)."""
        lr, wd, momentum = self.schedules(step)
        set_lr_wd(self.optimizer, lr, wd)
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.tcfg.grad_accum
        terms_acc: dict[str, float] = {}
        total_acc = 0.0
        fused = []
        micros = split_micro(views, accum)
        if accum > 1:
            # Gradient accumulation: the teacher's outputs of every micro-batch first, so that
            # the loss normalises each MGCL level by the rows of the whole step and updates the
            # teacher centres once (SkySenseLoss.accumulation); grad_accum micro-batches then
            # give the loss, gradients and centres of one batch (CMA aside: its negatives are
            # the micro-batch's).
            with self.autocast():
                teacher_all = [_loss_inputs(self.teacher(m)) for m in micros]
            accumulation = self.student.loss.accumulation(teacher_all, micros)
        else:
            teacher_all, accumulation = [None], contextlib.nullcontext()
        with accumulation:
            for micro, teacher_outs in zip(micros, teacher_all):
                with self.autocast():
                    if teacher_outs is None:
                        teacher_outs = self.teacher(micro)
                    out = self.wrapped(micro, teacher_outs, self.teacher.heads, step)
                total, terms = out["total"], out["terms"]
                if not torch.isfinite(total.detach()):
                    bad = [k for k, v in terms.items() if not math.isfinite(float(v))]
                    raise NonFiniteLoss(
                        f"step {step + 1}: loss is {float(total.detach())}; terms that went "
                        f"bad: {bad or ['total']} (nothing was saved for this step)"
                    )
                (total / accum).backward()
                total_acc += float(total.detach()) / accum
                for k, v in terms.items():
                    terms_acc[k] = terms_acc.get(k, 0.0) + float(v) / accum
                fused += [(o["fused"].float(), o["region"]) for o in teacher_outs if "fused" in o]
        gnorm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.ocfg.grad_clip)
        self.optimizer.step()
        D.reshard(self.teacher)  # FSDP: the EMA works on the shards
        ema_update(self.teacher, self.student, momentum)
        self.update_prototypes(fused)
        return {
            "loss": total_acc,
            "terms": terms_acc,
            "lr": lr,
            "wd": wd,
            "momentum": momentum,
            "grad_norm": float(gnorm),
        }

    @torch.no_grad()
    def update_prototypes(self, fused: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """GCPL: EMA of the region prototypes towards the teacher's F_fus of this step (both
        views), accumulated across processes by the loss module, then shared with the teacher."""
        geo = getattr(self.student.encoder, "geo_context", None)
        gcpl = getattr(self.student.loss, "gcpl", None)
        if geo is None or gcpl is None or not fused:
            return
        f = torch.cat([x for x, _ in fused])
        r = torch.cat([r for _, r in fused])
        gcpl.update(geo.prototypes, f, r)
        self.teacher.encoder.geo_context.prototypes.copy_(geo.prototypes)


def train(cfg: DictConfig, run) -> dict:
    """Run pre-training as ``cfg`` says. ``run`` carries what the entry point prepared (model
    builders, loaders, probe, logging sinks, the dist info). Returns the summary dict."""
    info: D.DistInfo = run.info
    tcfg = cfg.trainer
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    seed_everything(cfg.seed)  # the same initial weights on every process
    encoder = run.build_encoder()
    trainer = Trainer(cfg, info, encoder, run.build_loss(encoder))
    trainer.distribute()
    # Then one random stream per process: stochastic depth and the pixel-pair draws of one
    # process must not repeat those of another (a resume restores each process's own stream).
    seed_everything(cfg.seed + info.rank)

    start_step, data_position, history = 0, 0, []
    if cfg.resume:
        found = ckpt.find_resumable(ckpt_dir)
        if found is None:
            log.info("resume: no checkpoint in %s, starting afresh", ckpt_dir)
        else:
            path, state = found
            check_resume_config(cfg, state, path)
            if state["step"] >= tcfg.max_steps and (run_dir / "summary.json").exists():
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
            start_step, data_position = state["step"], state["data_position"]
            history = state.get("history", [])
            ckpt.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
            log.info("resumed from %s at step %d", path, start_step)

    per_rank = tcfg.batch_size // info.world_size
    it = iter(run.build_loader(start_batch=data_position, batch_size=per_rank))

    probe_random = run.probe(trainer.teacher.encoder) if start_step == 0 else None
    if probe_random is not None:
        log.info("linear probe of the randomly initialised encoder: %.3f", probe_random)

    monitor = run.health_monitor(trainer.teacher) if hasattr(run, "health_monitor") else None
    health: dict | None = None
    writer = run.tensorboard(run_dir) if info.is_main else None
    bar = run.progress(total=tcfg.max_steps, initial=start_step, disable=not info.is_main)
    samples_done, t_start = 0, time.perf_counter()
    last_path = ckpt.latest(ckpt_dir)
    loss_value = history[-1]["loss"] if history else float("nan")
    try:  # the bar ends its line whatever happens, so a fault message starts on its own
        for step in range(start_step, tcfg.max_steps):
            views = to_device(next(it), info.device)
            data_position += 1
            rec = trainer.step(views, step)
            samples_done += tcfg.batch_size
            # The loss and terms of the global batch: each process's, averaged over processes.
            mean = D.mean_over_processes({"loss": rec["loss"], **rec["terms"]})
            loss_value = mean.pop("loss")
            sps = samples_done / max(time.perf_counter() - t_start, 1e-9)
            history.append(
                {
                    "step": step + 1,
                    "loss": loss_value,
                    "lr": rec["lr"],
                    "terms": mean,
                    "samples_per_s": sps,
                }
            )
            if writer is not None and (step + 1) % tcfg.log_every == 0:
                writer.add_scalar("loss/total", loss_value, step + 1)
                for k, v in mean.items():
                    writer.add_scalar(f"loss/{k}", v, step + 1)
                for k in ("lr", "wd", "momentum", "grad_norm"):
                    writer.add_scalar(f"optim/{k}", rec[k], step + 1)
                writer.add_scalar("throughput/samples_per_s", sps, step + 1)
            every = tcfg.get("health_every", 0)
            if monitor is not None and ((step + 1) % every == 0 or step + 1 == tcfg.max_steps):
                temp = trainer.student.loss.teacher_temp_at(step)
                health = monitor(temp, step + 1)
                history[-1]["health"] = health
                for k, v in health.items():
                    if writer is not None:
                        writer.add_scalar(f"health/{k}", v, step + 1)
            postfix = {"loss": f"{loss_value:.4f}", "sps": f"{sps:.1f}"}
            if health is not None:
                postfix["rankme"] = f"{health['rankme']:.1f}"
            bar.set_postfix(**postfix)
            bar.update(1)
            if (step + 1) % tcfg.checkpoint_every == 0 or step + 1 == tcfg.max_steps:
                last_path = save_checkpoint(
                    ckpt_dir, step + 1, data_position, trainer, history, cfg
                )
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    probe_trained = run.probe(trainer.teacher.encoder)
    summary = {
        "steps": tcfg.max_steps,
        "steps_this_run": tcfg.max_steps - start_step,
        "samples_per_s": samples_done / max(elapsed, 1e-9),
        "final_loss": loss_value,
        "checkpoint": str(last_path) if last_path else None,
        "probe_random_init": probe_random,
        "probe_pretrained": probe_trained,
        "health": health,
        "effective_batch": tcfg.batch_size,
        "world_size": info.world_size,
    }
    if info.is_main:
        if writer is not None:
            writer.close()
        if history:
            summary["loss_plot"] = str(run.plot(history, run_dir / "loss_curves.png"))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
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


def save_checkpoint(ckpt_dir, step, data_position, trainer: Trainer, history, cfg):
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

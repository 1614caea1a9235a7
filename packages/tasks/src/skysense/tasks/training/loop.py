"""The pre-training loop, top to bottom: set up, (resume), steps, checkpoints, probe, summary."""

from __future__ import annotations

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
from skysense.tasks.training.optim import build_optimizer, set_lr_wd
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
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=opts)


def scaled_lr(ocfg, batch_size: int) -> float:
    """The peak learning rate for the global batch under ``optim.lr_scaling``."""
    rule = ocfg.get("lr_scaling", "none")
    ratio = batch_size / ocfg.get("ref_batch", 256)
    if rule == "linear":
        return ocfg.lr * ratio
    if rule == "sqrt":
        return ocfg.lr * math.sqrt(ratio)
    return ocfg.lr


def train(cfg: DictConfig, run) -> dict:
    """Run pre-training as ``cfg`` says. ``run`` carries what the entry point prepared: the
    encoder/loss builders, the loaders, the dist info. Returns the summary dict."""
    info: D.DistInfo = run.info
    tcfg, ocfg = cfg.trainer, cfg.optim
    device = info.device
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / "checkpoints"

    torch.manual_seed(cfg.seed)
    encoder = run.build_encoder().to(device)
    loss_fn = run.build_loss(encoder).to(device)
    student = Student(encoder, loss_fn)
    teacher = Teacher(student).to(device)
    optimizer = build_optimizer(student, ocfg)

    start_step, data_position, history = 0, 0, []
    if cfg.resume:
        path = ckpt.latest(ckpt_dir)
        if path is None:
            log.info("resume: no checkpoint in %s, starting afresh", ckpt_dir)
        else:
            state = ckpt.load(path)
            _load_state(student, teacher, optimizer, state)
            start_step, data_position = state["step"], state["data_position"]
            history = state.get("history", [])
            ckpt.set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
            log.info("resumed from %s at step %d", path, start_step)

    wrapped = D.wrap(student, tcfg.strategy, info)
    if tcfg.strategy == "fsdp" and info.distributed:
        D.wrap(teacher, "fsdp", info)
    if tcfg.compile:
        encoder.compile()
        teacher.encoder.compile()

    use_bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    accum = tcfg.grad_accum
    peak_lr = scaled_lr(ocfg, tcfg.batch_size)
    per_rank = tcfg.batch_size // info.world_size
    loader = run.build_loader(start_batch=data_position, batch_size=per_rank)
    it = iter(loader)

    probe_random = run.probe(teacher.encoder) if (run.probe and start_step == 0) else None
    if probe_random is not None:
        log.info("linear probe of the randomly initialised encoder: %.3f", probe_random)

    writer = run.tensorboard(run_dir) if info.is_main else None
    bar = run.progress(total=tcfg.max_steps, initial=start_step, disable=not info.is_main)
    samples_done, t_start = 0, time.perf_counter()
    last_path = ckpt.latest(ckpt_dir)
    loss_value = float("nan")
    for step in range(start_step, tcfg.max_steps):
        lr = warmup_cosine(step, tcfg.max_steps, ocfg.warmup_steps, peak_lr, ocfg.min_lr)
        wd = cosine(step, tcfg.max_steps, ocfg.weight_decay, ocfg.weight_decay_end)
        momentum = cosine(step, tcfg.max_steps, tcfg.teacher_momentum, 1.0)
        set_lr_wd(optimizer, lr, wd)

        views = to_device(next(it), device)
        data_position += 1
        optimizer.zero_grad(set_to_none=True)
        terms_acc: dict[str, float] = {}
        total_acc = 0.0
        last_teacher_outs = None
        for micro in split_micro(views, accum):
            with autocast:
                teacher_outs = teacher(micro)
                out = wrapped(micro, teacher_outs, teacher.heads)
            total = out["total"] if isinstance(out, dict) else out.total
            terms = out["terms"] if isinstance(out, dict) else out.terms
            if not torch.isfinite(total.detach()):
                bad = [k for k, v in terms.items() if not math.isfinite(float(v))]
                raise NonFiniteLoss(
                    f"step {step}: loss is {float(total)}; terms that went bad: {bad or ['total']}"
                    " (no checkpoint was written for this step)"
                )
            (total / accum).backward()
            total_acc += float(total.detach()) / accum
            for k, v in terms.items():
                terms_acc[k] = terms_acc.get(k, 0.0) + float(v) / accum
            last_teacher_outs = (teacher_outs, micro)
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), ocfg.grad_clip)
        optimizer.step()
        ema_update(teacher, student, momentum)
        run.after_step(student, teacher, *last_teacher_outs)

        samples_done += tcfg.batch_size
        loss_value = float(D.all_reduce_mean(torch.tensor(total_acc)))
        elapsed = time.perf_counter() - t_start
        sps = samples_done / max(elapsed, 1e-9)
        rec = {
            "step": step + 1,
            "loss": loss_value,
            "lr": lr,
            "terms": terms_acc,
            "samples_per_s": sps,
        }
        history.append(rec)
        if writer is not None and (step + 1) % tcfg.log_every == 0:
            writer.add_scalar("loss/total", loss_value, step + 1)
            for k, v in terms_acc.items():
                writer.add_scalar(f"loss/{k}", v, step + 1)
            writer.add_scalar("optim/lr", lr, step + 1)
            writer.add_scalar("optim/weight_decay", wd, step + 1)
            writer.add_scalar("optim/teacher_momentum", momentum, step + 1)
            writer.add_scalar("optim/grad_norm", float(gnorm), step + 1)
            writer.add_scalar("throughput/samples_per_s", sps, step + 1)
        bar.set_postfix(loss=f"{loss_value:.4f}", sps=f"{sps:.1f}")
        bar.update(1)

        if (step + 1) % tcfg.checkpoint_every == 0 or step + 1 == tcfg.max_steps:
            last_path = save_checkpoint(
                ckpt_dir, step + 1, data_position, student, teacher, optimizer, history, cfg, info
            )
    bar.close()
    elapsed = time.perf_counter() - t_start
    probe_trained = run.probe(teacher.encoder) if run.probe else None
    summary = {
        "steps": tcfg.max_steps,
        "steps_this_run": tcfg.max_steps - start_step,
        "samples_per_s": samples_done / max(elapsed, 1e-9),
        "final_loss": loss_value,
        "checkpoint": str(last_path) if last_path else None,
        "probe_random_init": probe_random,
        "probe_pretrained": probe_trained,
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


def save_checkpoint(ckpt_dir, step, data_position, student, teacher, optimizer, history, cfg, info):
    s, t, o = _state_dicts(student, teacher, optimizer, info)
    rngs = [ckpt.rng_state()]
    if info.distributed:
        gathered = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, ckpt.rng_state())
        rngs = gathered
    path = None
    if info.is_main:
        module = student.module if hasattr(student, "module") else student
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
        del module
        path = ckpt.save(ckpt_dir, step, state, keep=cfg.trainer.get("keep_checkpoints", 2))
    if info.distributed:
        torch.distributed.barrier()
    return path or ckpt.latest(ckpt_dir)

"""`skysense pretrain`: the full SkySense pre-training path.

    skysense pretrain                                   # tiny preset, embedded sample, CPU
    skysense pretrain model=base data=shards data.manifest=/data/manifest.sqlite
    skysense pretrain trainer.nproc=2                   # DDP on this machine through torchrun
    torchrun --nproc_per_node 2 -m skysense.tasks.cli pretrain trainer.strategy=fsdp

The config is validated before any work (unknown preset, batch not divisible by processes and
accumulation steps, missing data, unknown lr scaling, data backend, view or loss fields, a device
that is not there) with a message naming the field (exit status 2). A loss that goes NaN or
infinite stops the run with a message naming the step and the terms (exit status 1); the
checkpoints written before it stay as they were.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from skysense.tasks.errors import ConfigError

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first wrong field; does no work."""
    from skysense.encoders import PRESETS

    if cfg.model.preset not in PRESETS:
        raise ConfigError(
            "model.preset", f"unknown preset '{cfg.model.preset}'; known: {', '.join(PRESETS)}"
        )
    t = cfg.trainer
    for field in (
        "max_steps",
        "batch_size",
        "grad_accum",
        "nproc",
        "checkpoint_every",
        "log_every",
    ):
        if not isinstance(t[field], int) or t[field] < 1:
            raise ConfigError(f"trainer.{field}", f"must be a positive integer, got {t[field]!r}")
    world = int(os.environ.get("WORLD_SIZE", t.nproc))
    if t.batch_size % (world * t.grad_accum):
        raise ConfigError(
            "trainer.batch_size",
            f"{t.batch_size} is not divisible by processes x grad_accum = {world} x {t.grad_accum}",
        )
    if t.strategy not in ("ddp", "fsdp"):
        raise ConfigError("trainer.strategy", f"'{t.strategy}' is not one of ddp, fsdp")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError("trainer.precision", f"'{t.precision}' is not one of auto, fp32, bf16")
    from skysense.tasks.training.runtime import resolve_device

    resolve_device(t.device, "trainer.device")
    if cfg.data.name == "shards":
        manifest = cfg.data.get("manifest")
        if manifest in (None, "???") or OmegaConf.is_missing(cfg.data, "manifest"):
            raise ConfigError(
                "data.manifest", "no manifest given (data=shards needs data.manifest=PATH)"
            )
        if not Path(manifest).exists():
            raise ConfigError("data.manifest", f"{manifest} does not exist")
    elif cfg.data.name != "embedded":
        raise ConfigError(
            "data",
            f"pre-training reads unlabelled imagery from a manifest: data=embedded (the embedded "
            f"sample) or data=shards data.manifest=PATH (a skysense ingest output); "
            f"'{cfg.data.name}' is a downstream dataset (skysense finetune data={cfg.data.name})",
        )
    if cfg.data.get("backend", "auto") not in ("auto", "dali", "torch"):
        raise ConfigError("data.backend", f"'{cfg.data.backend}' is not one of auto, dali, torch")
    _validate_views(cfg.data.get("views"))
    _validate_loss(cfg.loss)
    warm = int(cfg.loss.get("warmup_teacher_temp_steps") or 0)
    if warm > t.max_steps:
        # Seen on the real-data recipe: 1500 steps under the 37500-step warm-up kept the
        # teacher at its coldest temperature and the prototypes collapsed (one-hot, ~9 in use).
        log.warning(
            "loss.warmup_teacher_temp_steps %d outlasts the run (trainer.max_steps %d): the "
            "teacher temperature stays near loss.warmup_teacher_temp for the whole run; for a "
            "short run set it to about 0.3 x max_steps (recipe=cpu_real: 500 of 1500)",
            warm,
            t.max_steps,
        )
    if cfg.optim.get("lr_scaling", "none") not in ("none", "linear", "sqrt"):
        raise ConfigError(
            "optim.lr_scaling", f"'{cfg.optim.lr_scaling}' is not one of none, linear, sqrt"
        )
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {cfg.optim.lr}")


def _validate_views(views) -> None:
    from skysense.data.views import ViewConfig

    try:
        ViewConfig.from_dict(OmegaConf.to_container(views, resolve=True) if views else None)
    except (TypeError, ValueError) as e:
        raise ConfigError("data.views", str(e)) from None


def _validate_loss(loss) -> None:
    from skysense.tasks.training.meta_arch import loss_config_fields

    known = loss_config_fields()
    unknown = sorted(set(loss) - known)
    if unknown:
        raise ConfigError(
            f"loss.{unknown[0]}",
            f"not a field of the loss (SkySenseLoss and its teacher schedule take: "
            f"{', '.join(sorted(known))})",
        )


@dataclass
class Run:
    """What the loop needs from the outside world, built from the config."""

    cfg: DictConfig
    info: object
    manifest: Path

    def build_encoder(self):
        from skysense.encoders import build_skysense

        overrides = OmegaConf.to_container(self.cfg.model.overrides, resolve=True) or {}
        if self.cfg.model.checkpointing:
            overrides["checkpointing"] = True
        return build_skysense(self.cfg.model.preset, **overrides)

    def build_loader(self, start_batch: int, batch_size: int):
        from skysense.data import build_loader

        d = self.cfg.data
        views = OmegaConf.to_container(d.get("views", {}), resolve=True)
        return build_loader(
            self.manifest,
            "train",
            batch_size,
            backend=d.backend,
            views=True,
            view_config=views,
            seed=self.cfg.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
            start_batch=start_batch,
            num_workers=d.num_workers,
            epochs=None,
            normalisation=d.get("normalisation", "spec"),
        )

    def probe(self, encoder):
        from skysense.data import build_loader
        from skysense.tasks.training.probe import linear_probe

        if not self.cfg.trainer.get("linear_probe", True) or not self.info.is_main:
            return None
        train = build_loader(self.manifest, "train", 16, backend="torch", seed=0, drop_last=False)
        val = build_loader(self.manifest, "val", 16, backend="torch", seed=0, drop_last=False)
        return linear_probe(encoder, train, val, self.info.device)

    def health_monitor(self, teacher):
        """The label-free health signals on held samples (:mod:`training.health`): the first
        64 training samples without augmentation, and the labelled splits for kNN where the
        data has labels. None when ``trainer.health_every`` is 0."""
        from skysense.data import build_loader
        from skysense.tasks.training.health import HealthMonitor, preserved_rng

        if not self.cfg.trainer.health_every:
            return None

        def batches(split, limit=None):
            out = []
            loader = build_loader(
                self.manifest, split, 16, backend="torch", seed=0, drop_last=False
            )
            for b in loader:
                out.append(
                    {k: v.to(self.info.device) if hasattr(v, "to") else v for k, v in b.items()}
                )
                if limit and len(out) >= limit:
                    break
            return out

        with preserved_rng():  # reading the held set must not move training's random streams
            held = batches("train", limit=4)
            labelled = None
            if "label" in held[0]:
                labelled = (batches("train"), batches("val"))
        return HealthMonitor(teacher, held, labelled)

    def tensorboard(self, run_dir):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def progress(self, total, initial, disable):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            disable=disable,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def plot(self, history, path):
        from skysense.tasks.training.plots import plot_losses

        return plot_losses(history, path)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make sure the run can neither fail late on its folder nor overwrite saved progress.

    A run_dir that holds checkpoints is an error unless ``resume`` (continue it) or
    ``overwrite`` (delete them, then start afresh); the folder must be writable (an OSError
    naming it otherwise), checked before any data or model is made.
    """
    from skysense.tasks.training import checkpoint as ckpt

    ckpt_dir = run_dir / "checkpoints"
    found = ckpt.checkpoints(ckpt_dir)
    if found and not resume:
        if not overwrite:
            raise ConfigError(
                "resume",
                f"{run_dir} already holds {len(found)} checkpoint(s) (newest {found[0].name}): "
                "resume=true continues that run, overwrite=true deletes them and starts afresh, "
                "or choose another run_dir=",
            )
        log.warning("overwrite=true: deleting the %d checkpoint(s) in %s", len(found), ckpt_dir)
        for p in found:
            p.unlink(missing_ok=True)
            p.with_name(p.name + ckpt.CHECKSUM_SUFFIX).unlink(missing_ok=True)
        (ckpt_dir / ckpt.LATEST).unlink(missing_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    probe = ckpt_dir / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def prepare_data(cfg: DictConfig, info) -> Path:
    if cfg.data.name == "embedded":
        from skysense.data.embedded import ensure_embedded

        return ensure_embedded(
            Path(cfg.data.root), n_samples=cfg.data.n_samples, seed=cfg.data.seed
        )
    return Path(cfg.data.manifest)


def summary_line(s: dict) -> str:
    probe = ""
    if s.get("probe_pretrained") is not None:
        probe = f", linear probe {s['probe_pretrained']:.3f}"
        if s.get("probe_random_init") is not None:
            probe += f" (random init {s['probe_random_init']:.3f})"
    return (
        f"pretrain done: {s['steps']} steps ({s['steps_this_run']} this run), "
        f"{s['samples_per_s']:.2f} samples/s, final loss {s['final_loss']:.4f}, "
        f"checkpoint {s['checkpoint']}{probe}"
    )


def main(cfg: DictConfig, command: str = "pretrain") -> int:
    from skysense.tasks.training import dist as D

    validate(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        prepare_run_dir(Path(cfg.run_dir), cfg.resume, cfg.overwrite)
    if cfg.trainer.nproc > 1 and not D.launched_by_torchrun():
        argv = [a for a in sys.argv[2:] if not a.startswith("trainer.nproc=")]
        return D.launch(cfg.trainer.nproc, command, argv + [f"trainer.nproc={cfg.trainer.nproc}"])

    from skysense.tasks.training.loop import train
    from skysense.tasks.training.optim import scaled_lr
    from skysense.tasks.training.runtime import set_threads

    set_threads(cfg.trainer.get("threads"))
    info = D.init(cfg.trainer.device)
    try:
        if info.is_main:
            manifest = prepare_data(cfg, info)
        if info.distributed:
            import torch.distributed as dist

            box = [str(manifest) if info.is_main else None]
            dist.broadcast_object_list(box, src=0)
            manifest = Path(box[0])
        log.info(
            "pre-training preset %s on %s: global batch %d = %d process(es) x %d per process x %d"
            " accumulation step(s); peak lr %.3g (%s scaling of %.3g)",
            cfg.model.preset,
            info.device,
            cfg.trainer.batch_size,
            info.world_size,
            cfg.trainer.batch_size // info.world_size // cfg.trainer.grad_accum,
            cfg.trainer.grad_accum,
            scaled_lr(cfg.optim, cfg.trainer.batch_size),
            cfg.optim.get("lr_scaling", "none"),
            cfg.optim.lr,
        )
        try:
            summary = train(cfg, Run(cfg, info, manifest))
        except FloatingPointError as e:
            log.error("%s", e)
            print(f"skysense {command}: {e}", file=sys.stderr, flush=True)
            return 1
        if info.is_main:
            if summary.get("already_finished"):
                print(
                    f"pretrain: {cfg.run_dir} already holds the finished run "
                    f"({summary['steps']} of {cfg.trainer.max_steps} steps); nothing to do",
                    flush=True,
                )
            print(summary_line(summary), flush=True)
            from skysense.tasks.training.health import health_line

            print(health_line(summary.get("health")), flush=True)
    finally:
        D.shutdown()
    return 0

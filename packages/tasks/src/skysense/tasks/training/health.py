"""Label-free health signals of pre-training: is the teacher learning, or collapsing?

Computed every ``trainer.health_every`` steps on a held set of samples (the same samples every
time, read without augmentation), from the teacher:

- ``rankme``: RankMe (Garrido et al. 2023), the effective rank exp(H(p)) of the pooled fused
  embeddings, p the singular values normalised to sum 1; at most min(N, D). A representation
  that collapses to a few directions has a small one.
- ``emb_std``: the mean per-dimension standard deviation of the L2-normalised embeddings, times
  sqrt(D) (about 1 for embeddings spread over the sphere, 0 when they all coincide).
- ``proto_entropy_mean`` / ``proto_entropy_sample``: the entropy of the teacher's mean
  prototype distribution and the mean entropy of each sample's, both divided by log K (DINO's
  two collapse modes: one prototype for every sample drives the first to 0; a uniform output
  for every sample drives the second to 1).
- ``proto_usage``: the share of the K prototypes that are the argmax of at least one sample.
- ``rankme_s2`` / ``rankme_s2_dense``: RankMe of the pooled S2 tokens of the samples that hold
  S2, and of their S2 tokens at every grid location (what dense Sentinel-2 probes read), where
  the data has S2.
- ``retrieval``: cross-modal retrieval top-1 between co-located modalities (for each pair of
  modalities, over the samples that hold both, whether a sample's pooled tokens in one modality
  are nearest, by cosine, to the same place's in the other): what CMA should raise above chance
  (1 / the number of such samples). Absent when no pair of modalities shares two samples.
- ``knn``: 20-nearest-neighbour (cosine) accuracy of the labelled split on the training split,
  where the data has labels.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from skysense.kernels.modalities import MODALITIES

log = logging.getLogger(__name__)

# A signal past its threshold logs a collapse warning (once per run and signal).
THRESHOLDS = {
    "rankme": ("below", 2.0, ": the embeddings span about one direction"),
    "emb_std": ("below", 0.1, ": the normalised embeddings coincide"),
    "proto_entropy_mean": ("below", 0.1, ": one prototype takes every sample"),
    "proto_entropy_sample": ("above", 0.98, ": every sample's prototype distribution is uniform"),
}


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of ``z`` (N, D): exp of the entropy of its normalised singular values."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp_min(eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions over the last axis."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def pooled_tokens(out: dict, mod: str) -> torch.Tensor | None:
    """(B, C) mean of a modality's tokens over valid steps and the grid, or None."""
    tok = out.get(f"tokens_{mod}")
    if tok is None:
        return None
    valid = out[f"valid_{mod}"].to(torch.float32)  # (B, T)
    w = valid / valid.sum(1, keepdim=True).clamp_min(1.0)
    return (tok.float().mean(dim=(-2, -1)) * w[..., None]).sum(1)


def dense_tokens(out: dict, mod: str) -> torch.Tensor | None:
    """(B * h * w, C) a modality's tokens at every grid location, averaged over the valid steps,
    of the samples that hold the modality; None when the output has none."""
    tok = out.get(f"tokens_{mod}")
    if tok is None:
        return None
    valid = out[f"valid_{mod}"].to(torch.float32)  # (B, T)
    w = valid / valid.sum(1, keepdim=True).clamp_min(1.0)
    x = (tok.float() * w[..., None, None, None]).sum(1)  # (B, C, h, w)
    x = x[valid.sum(1) > 0]
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def retrieval_top1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows of ``a`` (N, C) whose cosine-nearest row of ``b`` is the same row, averaged
    with the reverse direction."""
    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()
    idx = torch.arange(len(a))
    return float(
        ((sim.argmax(1) == idx).double().mean() + (sim.argmax(0) == idx).double().mean()) / 2
    )


def knn_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, k=20
) -> float:
    """k-NN (cosine similarity, votes weighted by exp(sim / 0.07)) accuracy of ``x_test``."""
    sim = F.normalize(x_test.double(), dim=-1) @ F.normalize(x_train.double(), dim=-1).t()
    k = min(k, len(x_train))
    top, idx = sim.topk(k, dim=1)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    votes = torch.zeros(len(x_test), n_classes, dtype=torch.float64)
    votes.scatter_add_(1, y_train[idx], torch.exp(top / 0.07))
    return float((votes.argmax(1) == y_test).double().mean())


@torch.no_grad()
def health_signals(teacher, batches: list[dict], temp: float, labelled=None) -> dict[str, float]:
    """The signals of the module docstring for ``teacher`` (a :class:`Teacher`: encoder and
    heads) on ``batches`` (held samples, batch dicts on the teacher's device). ``temp`` is the
    teacher temperature of the prototype softmax; ``labelled`` optional (train, test) batch lists
    with ``label`` for the kNN accuracy."""
    from skysense.tasks.training.probe import extract

    outs = [teacher.encoder(b) for b in batches]
    z = torch.cat([o["fused"].float().mean(dim=(-2, -1)) for o in outs])  # (N, D)
    n, d = z.shape
    zn = F.normalize(z, dim=-1)
    sig = {
        "rankme": rankme(z),
        "rankme_max": float(min(n, d)),
        "emb_std": float(zn.std(0).mean() * math.sqrt(d)),
    }
    head = teacher.heads["fused"]
    logits = head(z.to(next(head.parameters()).dtype)) @ head.prototype_weight().t()
    p = torch.softmax(logits.float() / temp, dim=-1)
    log_k = math.log(p.shape[1])
    sig["proto_entropy_mean"] = float(entropy(p.mean(0)) / log_k)
    sig["proto_entropy_sample"] = float(entropy(p).mean() / log_k)
    sig["proto_usage"] = float(p.argmax(1).unique().numel() / p.shape[1])
    pooled, present = {}, {}
    for mod in MODALITIES:
        parts = [pooled_tokens(o, mod) for o in outs]
        if all(x is not None for x in parts):
            pooled[mod] = torch.cat(parts)
            present[mod] = torch.cat([o[f"valid_{mod}"].any(1) for o in outs])
    mods = sorted(pooled)
    # Retrieval over the samples that hold both modalities (a place without one, e.g. a
    # Sentinel-2-only place beside a Sentinel-1-only one, has nothing to retrieve); a pair
    # needs two such samples, and chance is 1 / (their number), averaged over the pairs.
    scores, chances = [], []
    for i, a in enumerate(mods):
        for b in mods[i + 1 :]:
            both = present[a] & present[b]
            if int(both.sum()) >= 2:
                scores.append(retrieval_top1(pooled[a][both], pooled[b][both]))
                chances.append(1.0 / int(both.sum()))
    if scores:
        sig["retrieval"] = sum(scores) / len(scores)
        sig["retrieval_chance"] = sum(chances) / len(chances)
    if "s2" in pooled:
        # RankMe of the pooled S2 tokens (the features the S2 probes read), where present.
        keep = present["s2"]
        if int(keep.sum()) >= 2:
            sig["rankme_s2"] = rankme(pooled["s2"][keep])
            # ... and of the S2 tokens at every grid location (what dense probes read).
            sig["rankme_s2_dense"] = rankme(torch.cat([dense_tokens(o, "s2") for o in outs]))
    if labelled is not None:
        device = z.device
        xt, yt = extract(teacher.encoder, labelled[0], device)
        xv, yv = extract(teacher.encoder, labelled[1], device)
        sig["knn"] = knn_accuracy(xt, yt, xv, yv)
    return sig


@contextlib.contextmanager
def preserved_rng():
    """Run a block without moving the random streams of training (torch, CUDA, numpy, Python):
    measuring health must not change what a resumed run computes."""
    py, npy = random.getstate(), np.random.get_state()  # noqa: NPY002 (the global state)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)  # noqa: NPY002


@contextlib.contextmanager
def _gathered(module):
    """FSDP gathers a root module's own parameters around its ``forward`` only; the signals
    call the teacher's encoder directly, so gather them for the block (every process runs it:
    the sharded blocks all-gather as they go)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


class HealthMonitor:
    """Runs :func:`health_signals` on a fixed held set and warns once per collapsing signal."""

    def __init__(self, teacher, held: list[dict], labelled=None):
        self.teacher, self.held, self.labelled = teacher, held, labelled
        self.warned: set[str] = set()

    def __call__(self, temp: float, step: int) -> dict[str, float]:
        with preserved_rng(), _gathered(self.teacher):
            sig = health_signals(self.teacher, self.held, temp, self.labelled)
        for name, (side, limit, why) in THRESHOLDS.items():
            value = sig[name]
            bad = value < limit if side == "below" else value > limit
            if bad and name not in self.warned:
                self.warned.add(name)
                log.warning(
                    "health at step %d: %s = %.3g %s %.3g%s (collapse?)",
                    step, name, value, side, limit, why,
                )  # fmt: skip
        return sig


def health_line(sig: dict[str, float] | None) -> str:
    """One line for people: RankMe, prototype entropies, retrieval, kNN."""
    if not sig:
        return "health: not measured (trainer.health_every=0)"
    parts = [
        f"RankMe {sig['rankme']:.1f}/{sig['rankme_max']:.0f}"
        + (
            f" (S2 tokens {sig['rankme_s2']:.1f}, per location {sig['rankme_s2_dense']:.1f})"
            if "rankme_s2" in sig
            else ""
        ),
        f"embedding std {sig['emb_std']:.2f}",
        f"prototype entropy mean {sig['proto_entropy_mean']:.2f} per-sample "
        f"{sig['proto_entropy_sample']:.2f} (of log K), usage {sig['proto_usage']:.2f}",
    ]
    if "retrieval" in sig:
        parts.append(
            f"cross-modal retrieval {sig['retrieval']:.2f} (chance {sig['retrieval_chance']:.2f})"
        )
    if "knn" in sig:
        parts.append(f"kNN {sig['knn']:.3f}")
    return "health: " + ", ".join(parts)

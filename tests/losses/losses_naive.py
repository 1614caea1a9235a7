"""Naive float64 references of every loss term: loops, every matrix materialised, written from
the spec and the docstrings, independent of the implementation under test (no import of
skysense.losses beyond the DINOHead module it copies)."""

from __future__ import annotations

import copy
import math

import torch


def double_head(head):
    """A float64 copy of a DINOHead (same parameters, its own gradients)."""
    return copy.deepcopy(head).double()


def sinkhorn(scores: torch.Tensor, n_iters: int, eps: float) -> torch.Tensor:
    """Textbook Sinkhorn-Knopp, uniform marginals: (N, K) -> (N, K), rows sum to 1."""
    q = torch.exp(scores.double() / eps).t()  # (K, N)
    q = q / q.sum()
    k, n = q.shape
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()


def dino_ce(zs_logits, zt_logits, center, st, tt):
    """Mean over rows of H(softmax((t - c) / tt), log_softmax(s / st)) on (N, K) logits."""
    p = torch.softmax((zt_logits - center) / tt, dim=-1)
    logq = torch.log_softmax(zs_logits / st, dim=-1)
    return -(p * logq).sum(-1).mean()


def mapped_cell(aff_a, aff_b, y, x, size_a, size_b):
    """The view-b cell (row, col) under view a's cell (y, x), or None outside view b."""
    h_a, w_a = size_a
    h_b, w_b = size_b
    p = torch.tensor([(2 * x + 1) / w_a - 1, (2 * y + 1) / h_a - 1], dtype=torch.float64)
    q = aff_a[:, :2].double() @ p + aff_a[:, 2].double()
    pb = torch.linalg.solve(aff_b[:, :2].double(), q - aff_b[:, 2].double())
    if pb.abs().max() > 1 + 1e-6:
        return None
    col = min(max(math.floor((pb[0] + 1) * w_b / 2), 0), w_b - 1)
    row = min(max(math.floor((pb[1] + 1) * h_b / 2), 0), h_b - 1)
    return row, col


def cluster(t_pix: torch.Tensor, n_c: int, rounds: int, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn k-means of one image's paired teacher pixels (P, C) -> (P, n_c) assignments,
    centres started at the valid pixels number floor(k P / n_c) in row-major order."""
    xn = t_pix / t_pix.norm(dim=-1, keepdim=True)
    p = xn.shape[0]
    centres = torch.stack([xn[(k * p) // n_c] for k in range(n_c)])
    for r in range(rounds):
        a = sinkhorn(xn @ centres.t(), iters, eps)
        if r < rounds - 1:
            c = a.t() @ xn
            centres = c / c.norm(dim=-1, keepdim=True)
    return a


def mgcl_rows(students, teachers, affines, n_c=3, rounds=3, iters=3, eps=0.05):
    """Rows of every level for one family, both directions, by loops.

    students/teachers: per view (tokens (B, T, C, h, w), valid (B, T), index (B, T)), float64.
    Returns level -> (list of student rows, list of teacher rows).
    """
    rows = {lvl: ([], []) for lvl in ("pixel", "object", "image")}
    for a in range(len(students)):
        for b in range(len(teachers)):
            if a == b:
                continue
            s_tok, s_val, s_idx = students[a]
            t_tok, t_val, t_idx = teachers[b]
            size_a, size_b = tuple(s_tok.shape[-2:]), tuple(t_tok.shape[-2:])
            for i in range(s_tok.shape[0]):
                for ta in range(s_tok.shape[1]):
                    for tb in range(t_tok.shape[1]):
                        if not (s_val[i, ta] and t_val[i, tb]):
                            continue
                        if s_idx[i, ta] < 0 or s_idx[i, ta] != t_idx[i, tb]:
                            continue
                        sp, tp = [], []
                        for y in range(size_a[0]):
                            for x in range(size_a[1]):
                                m = mapped_cell(affines[a][i], affines[b][i], y, x, size_a, size_b)
                                if m is None:
                                    continue
                                sp.append(s_tok[i, ta, :, y, x])
                                tp.append(t_tok[i, tb, :, m[0], m[1]])
                        rows["pixel"][0].extend(sp)
                        rows["pixel"][1].extend(tp)
                        if sp:
                            sp_t, tp_t = torch.stack(sp), torch.stack(tp)
                            asg = cluster(tp_t.detach(), n_c, rounds, iters, eps)
                            mass = asg.sum(0)[:, None]
                            rows["object"][0].extend(list(asg.t() @ sp_t / mass))
                            rows["object"][1].extend(list(asg.t() @ tp_t / mass))
                        rows["image"][0].append(s_tok[i, ta].mean(dim=(-1, -2)))
                        rows["image"][1].append(t_tok[i, tb].mean(dim=(-1, -2)))
    return rows


def mgcl_family(students, teachers, affines, head, t_head, centers, st, tt, **cluster_kw):
    """level -> loss (float64) for one family; heads are float64 copies."""
    rows = mgcl_rows(students, teachers, affines, **cluster_kw)
    out = {}
    for lvl, (s, t) in rows.items():
        if not s:
            continue
        xs, xt = torch.stack(s), torch.stack(t).detach()
        with torch.no_grad():
            t_logits = t_head.logits(xt)
        out[lvl] = dino_ce(head.logits(xs), t_logits, centers[lvl].double(), st, tt)
    return out


def pooled(tokens, valid):
    """(B, T, C, h, w), (B, T) -> per-location mean over valid steps (B, h, w, C), (B,) any."""
    b, t, c, h, w = tokens.shape
    out = torch.zeros(b, h, w, c, dtype=tokens.dtype)
    ok = torch.zeros(b, dtype=torch.bool)
    rows = []
    for i in range(b):
        steps = [tokens[i, j] for j in range(t) if valid[i, j]]
        if steps:
            ok[i] = True
            rows.append(torch.stack(steps).mean(0).permute(1, 2, 0))
        else:
            rows.append(out[i])
    return torch.stack(rows), ok


def info_nce(a, b, temp):
    logits = a @ b.t() / temp
    n = a.shape[0]
    la = -torch.log_softmax(logits, dim=1)[range(n), range(n)].mean()
    lb = -torch.log_softmax(logits.t(), dim=1)[range(n), range(n)].mean()
    return 0.5 * (la + lb)


def cma(outputs, proj, temp, pairs=(("hr", "s2"), ("hr", "s1"), ("s2", "s1"))):
    """pair name -> mean over views of the symmetric InfoNCE; proj: modality -> float64 module."""
    res = {}
    for ma, mb in pairs:
        per_view = []
        for out in outputs:
            if f"tokens_{ma}" not in out or f"tokens_{mb}" not in out:
                continue
            fa, oka = pooled(out[f"tokens_{ma}"], out[f"valid_{ma}"])
            fb, okb = pooled(out[f"tokens_{mb}"], out[f"valid_{mb}"])
            keep = oka & okb
            if not keep.any():
                continue
            xa = proj[ma](fa[keep].reshape(-1, fa.shape[-1]))
            xb = proj[mb](fb[keep].reshape(-1, fb.shape[-1]))
            xa = xa / xa.norm(dim=-1, keepdim=True)
            xb = xb / xb.norm(dim=-1, keepdim=True)
            per_view.append(info_nce(xa, xb, temp))
        if per_view:
            res[f"{ma}-{mb}"] = torch.stack(per_view).mean()
    return res


def gcpl_update(prototypes, fused, region, momentum, iters=3, eps=0.05):
    """New prototypes (float64) after one GCPL update, region by region."""
    protos = prototypes.double().clone()
    n_r, n_p, d = protos.shape
    for r in range(n_r):
        sel = [i for i in range(fused.shape[0]) if int(region[i]) == r]
        if not sel:
            continue
        f = torch.cat([fused[i].double().reshape(d, -1).t() for i in sel])  # (N_r, D)
        pr = prototypes[r].double()
        scores = (f / f.norm(dim=-1, keepdim=True)) @ (pr / pr.norm(dim=-1, keepdim=True)).t()
        s = sinkhorn(scores, iters, eps)
        target = (s.t() @ f) / s.sum(0)[:, None]
        protos[r] = momentum * pr + (1 - momentum) * target
    return protos

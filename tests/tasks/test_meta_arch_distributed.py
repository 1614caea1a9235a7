"""The distributed paths of the loss protocol on 2 gloo processes (CPU) against one process on
the concatenated batch: CMA with gathered negatives (losses and gradients), the teacher-centre
update and MGCL's row normalisation (``StepAccumulator``), DDP's idle parameters (``Student``),
the GCPL prototype update; and a batch whose modalities differ between processes (no
deadlock)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from skysense.losses import SkySenseLoss
from skysense.tasks.training.meta_arch import StepAccumulator, Student

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "losses"))
from losses_synth import make_batch  # noqa: E402  (the losses tests' synthetic features)

from tests.conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.slow]

WORLD, B = 2, 4
KW = dict(n_prototypes=41, head_hidden_dim=24, head_bottleneck_dim=16, n_clusters=3)


def full_batch():
    students, teachers, views = make_batch(b=B, seed=21, requires_grad=False)
    # Every sample has every modality (at least one valid step): equal CMA rows per process.
    for o in students + teachers:
        o["valid_hr"][:] = True
        o["valid_s2"][:, 0] = True
        o["valid_s1"][:, 0] = True
    protos = torch.randn(5, 4, 10, generator=torch.Generator().manual_seed(22))
    return students, teachers, views, protos


def take(d, sl):
    return {k: v[sl] for k, v in d.items()}


def leaves(outs):
    res = []
    for o in outs:
        o = dict(o)
        for k in list(o):
            if k.startswith("tokens_") or k == "fused":
                o[k] = o[k].clone().requires_grad_(True)
        res.append(o)
    return res


def prepare(loss, students, teachers, views, drop_s1):
    """Give ``loss`` a non-zero starting centre (the same everywhere); drop S1 if asked."""
    with torch.no_grad():
        loss.centering.center.copy_(
            torch.randn(loss.centering.center.shape, generator=torch.Generator().manual_seed(23))
        )
    if not drop_s1:
        return students, teachers, views
    drop = {"tokens_s1", "valid_s1", "s1_index"}
    return tuple(
        [{k: v for k, v in o.items() if k not in drop} for o in x]
        for x in (students, teachers, views)
    )


class Outputs(nn.Module):
    """An encoder stand-in: returns the given output of each view (matched by identity)."""

    def __init__(self, views, outputs):
        super().__init__()
        self.by_view = {id(v): o for v, o in zip(views, outputs)}

    def forward(self, view):
        return self.by_view[id(view)]


def step(loss, students, teachers, views, micro=1):
    """One optimizer step's forward/backward as ``MetaArch.step`` runs it, on this process's
    batch in ``micro`` micro-batches: the terms (summed over micro-batches / micro, as the
    trainer logs them), the rows, the outputs."""
    b = views[0]["view_affine"].shape[0]
    cuts = [slice(i * b // micro, (i + 1) * b // micro) for i in range(micro)]
    parts = [
        (
            [take(o, c) for o in students],
            [take(o, c) for o in teachers],
            [take(v, c) for v in views],
        )
        for c in cuts
    ]
    acc = StepAccumulator(loss, [p[1] for p in parts], [p[2] for p in parts])
    terms, rows, outs = {}, {}, []
    for ps, pt, pv in parts:
        out = Student(Outputs(pv, ps), loss)(pv, pt, loss.heads, loss.teacher_temp, acc.row_norm)
        acc.add(out)
        (out.total / micro).backward()
        for k, v in out.terms.items():
            terms[k] = terms.get(k, 0.0) + v / micro
        for k, n in out.rows.items():
            rows[k] = rows.get(k, 0) + n
        outs.append(out)
    acc.finish(loss.heads)
    return terms, rows, outs


def compute(students, teachers, views, protos, drop_s1=False):
    """Everything the test compares, on whatever batch this process holds."""
    torch.manual_seed(0)
    loss = SkySenseLoss(12, 10, **KW).train()
    students, teachers, views = prepare(loss, students, teachers, views, drop_s1)
    s = leaves(students)
    cma = loss.cma(s, views)
    res = {f"cma/{k}": v.detach() for k, v in cma.items()}
    if cma:
        sum(cma.values()).backward()
        for i, o in enumerate(s):
            for k in ("tokens_hr", "tokens_s2", "tokens_s1"):
                if k in o:
                    res[f"grad/{i}/{k}"] = o[k].grad.clone()
        for m, p in loss.cma.proj.items():
            if p.weight.grad is not None:
                res[f"grad/proj/{m}"] = p.weight.grad.clone()
    loss.zero_grad(set_to_none=True)
    _, _, (out,) = step(loss, students, teachers, views)  # training mode: the centres move
    res["centers"] = loss.centering.center.clone()
    res["total_finite"] = torch.tensor(bool(torch.isfinite(out.total)))
    # What DDP needs: a gradient for every parameter, on every process.
    res["grads_everywhere"] = torch.tensor(all(p.grad is not None for p in loss.parameters()))
    p = protos.clone()
    fused = torch.cat([t["fused"] for t in teachers])
    region = torch.cat([t["region"] for t in teachers])
    loss.gcpl.update(p, fused, region, momentum=0.8)
    res["prototypes"] = p
    return res


def mgcl_run(students, teachers, views, drop_s1=False, micro=1):
    """MGCL alone (CMA weighted 0), training mode, on whatever batch this process holds, in
    ``micro`` micro-batches (:func:`step`): the terms, rows, the gradients of the heads and
    of the student tokens, the centres after the step."""
    torch.manual_seed(0)
    loss = SkySenseLoss(12, 10, cma=0.0, **KW).train()
    students, teachers, views = prepare(loss, students, teachers, views, drop_s1)
    s = leaves(students)
    terms, rows, _ = step(loss, s, teachers, views, micro)
    res = {f"term/{k}": v for k, v in terms.items() if k.startswith("mgcl")}
    res.update({f"rows/{k}": torch.tensor(n) for k, n in rows.items()})
    for n, p in loss.heads.named_parameters():
        res[f"grad/heads.{n}"] = p.grad.clone()
    for i, o in enumerate(s):
        for k in ("tokens_hr", "tokens_s2", "tokens_s1", "fused"):
            if k in o:
                res[f"grad/{i}/{k}"] = o[k].grad.clone()
    res["centers"] = loss.centering.center.clone()
    return res


def _worker(rank, port, outdir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        students, teachers, views, protos = full_batch()
        sl = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        local = (
            [take(o, sl) for o in students],
            [take(o, sl) for o in teachers],
            [take(v, sl) for v in views],
        )
        res = {"even": compute(*local, protos)}
        # Process 1's batch has no S1 at all: nothing may hang, and the centres still agree.
        res["uneven"] = compute(*local, protos, drop_s1=rank == 1)
        # MGCL: the processes hold different numbers of rows (pixel pairs, matched steps).
        res["mgcl"] = mgcl_run(*local)
        res["mgcl_no_s1"] = mgcl_run(*local, drop_s1=rank == 1)
        res["mgcl_accum"] = mgcl_run(*local, micro=2)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(outdir)), nprocs=WORLD, join=True)
    return [torch.load(outdir / f"rank{r}.pt") for r in range(WORLD)]


def test_cma_gathered_equals_one_process(ranks):
    single = compute(*full_batch())
    per = [r["even"] for r in ranks]
    names = [k for k in single if k.startswith("cma/")]
    assert sorted(names) == ["cma/hr-s1", "cma/hr-s2", "cma/s2-s1"]
    for k in names:
        # The mean over processes of their losses is the loss of the whole batch ...
        torch.testing.assert_close((per[0][k] + per[1][k]) / 2, single[k], rtol=1e-5, atol=1e-6)
        # ... which the local rows alone (without gathered negatives) would not give.
        assert not torch.allclose(per[0][k], single[k], rtol=1e-3)
    for m in ("hr", "s2", "s1"):
        # DDP averages the replicated parameters' gradients over processes.
        avg = (per[0][f"grad/proj/{m}"] + per[1][f"grad/proj/{m}"]) / 2
        torch.testing.assert_close(avg, single[f"grad/proj/{m}"], rtol=1e-4, atol=1e-7)
        for v in range(2):
            key = f"grad/{v}/tokens_{m}"
            # Each process's own rows: world x the whole batch's gradient (DDP divides).
            got = torch.cat([per[0][key], per[1][key]]) / WORLD
            torch.testing.assert_close(got, single[key], rtol=1e-4, atol=1e-7)


def test_centres_and_prototypes_equal_one_process(ranks):
    single = compute(*full_batch())
    for r in ranks:
        torch.testing.assert_close(r["even"]["centers"], single["centers"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            r["even"]["prototypes"], single["prototypes"], rtol=1e-5, atol=1e-6
        )
    assert not torch.allclose(single["prototypes"], full_batch()[3])  # the update did move them


def test_modalities_differing_between_processes(ranks):
    """Process 1 has no S1: the CMA pairs with S1 run locally on process 0 only, the centres
    equal one process's on the whole batch with process 1's S1 steps all invalid."""
    students, teachers, views, protos = full_batch()
    for o in students + teachers:
        o["valid_s1"] = o["valid_s1"].clone()
        o["valid_s1"][B // WORLD :] = False
    single = compute(students, teachers, views, protos)
    u0, u1 = ranks[0]["uneven"], ranks[1]["uneven"]
    assert "cma/s2-s1" in u0 and "cma/s2-s1" not in u1
    assert bool(u0["total_finite"]) and bool(u1["total_finite"])
    assert bool(u0["grads_everywhere"]) and bool(u1["grads_everywhere"])
    # One process alone leaves the heads of absent modalities without gradient (AdamW skips them).
    no_s1 = compute(*full_batch(), drop_s1=True)
    assert not bool(no_s1["grads_everywhere"])
    for r in (u0, u1):
        torch.testing.assert_close(r["centers"], single["centers"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["prototypes"], single["prototypes"], rtol=1e-5, atol=1e-6)


def assert_mgcl_matches(per, single):
    """Per-process MGCL results against one process's on the whole batch: the terms and the
    heads' gradients averaged over processes (as the logs and DDP/FSDP average them), the
    tokens' gradients (each process's rows, world x the whole batch's: DDP divides), the
    centres."""
    terms = {k for r in per for k in r if k.startswith("term/")}
    assert terms == {k for k in single if k.startswith("term/")}

    def check(got, want, k, rtol):
        # Float32 sums in another order: the absolute slack scales with the tensor.
        atol = rtol * float(want.abs().max()) + 1e-9
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")

    for k in sorted(terms):
        # A term absent from a process's batch counts 0 there (as in the logs and gradients).
        check(sum(r.get(k, torch.tensor(0.0)) for r in per) / WORLD, single[k], k, 1e-5)
    for k in [k for k in single if k.startswith("grad/heads.")]:
        check(sum(r[k] for r in per) / WORLD, single[k], k, 1e-5)
    for k in [k for k in single if k.startswith("grad/") and not k.startswith("grad/heads.")]:
        # A process without the modality: the whole batch's rows of its half get no gradient.
        half = single[k].shape[0] // WORLD
        got = torch.cat([r.get(k, torch.zeros_like(single[k][:half])) for r in per]) / WORLD
        check(got, single[k], k, 1e-5)
    for r in per:
        torch.testing.assert_close(r["centers"], single["centers"], rtol=1e-5, atol=1e-6)


def test_mgcl_with_unequal_rows_equals_one_process(ranks):
    """MGCL's levels are means over rows, and the two processes hold different numbers of
    rows: each process's term is scaled by n_local * world / n_global, so that the average
    over processes (DDP/FSDP's, the logs') is the whole batch's mean, terms and gradients."""
    students, teachers, views, _ = full_batch()
    single = mgcl_run(students, teachers, views)
    per = [r["mgcl"] for r in ranks]
    unequal = [k for k in single if k.startswith("rows/") and int(per[0][k]) != int(per[1][k])]
    # The test has teeth: pixel and image rows of the series differ between the processes.
    assert {f"rows/mgcl/{m}/{lvl}" for m in ("s2", "s1") for lvl in ("pixel", "image")} <= set(
        unequal
    ), unequal
    for k in unequal:
        assert int(per[0][k]) + int(per[1][k]) == int(single[k])
    assert_mgcl_matches(per, single)


def test_mgcl_with_a_modality_on_one_process_equals_one_process(ranks):
    """Process 1 has no S1: its S1 terms are absent (0 in the average), process 0's S1 terms
    carry the world factor, and the average is the whole batch's (S1 invalid on process 1's
    half)."""
    students, teachers, views, _ = full_batch()
    for o in students + teachers:
        o["valid_s1"] = o["valid_s1"].clone()
        o["valid_s1"][B // WORLD :] = False
    single = mgcl_run(students, teachers, views)
    per = [r["mgcl_no_s1"] for r in ranks]
    assert "term/mgcl/s1/pixel" in per[0] and "term/mgcl/s1/pixel" not in per[1]
    assert_mgcl_matches(per, single)


def test_mgcl_accumulated_over_processes_equals_one_process(ranks):
    """Two processes, two micro-batches each (one ``StepAccumulator``): the terms, gradients
    and centres (updated once) of one call on the whole batch."""
    students, teachers, views, _ = full_batch()
    single = mgcl_run(students, teachers, views)
    per = [r["mgcl_accum"] for r in ranks]
    assert_mgcl_matches(per, single)

"""torch.compile friendliness (no graph break in any block's forward on the tiny preset) and
torch.export of the tiny encoder (the exported program gives the eager outputs)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import make_batch

from skysense.encoders import build_skysense


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_skysense("tiny").eval()


def _blocks(m):
    g = torch.Generator().manual_seed(0)
    kpm = torch.rand(32, 6, generator=g) < 0.3
    kpm[:, 0] = False
    return {
        "swin": (m.hr_encoder.stages[0].blocks[0], (torch.randn(2, 32, 32, 32),)),
        "swin_shifted": (m.hr_encoder.stages[2].blocks[1], (torch.randn(2, 8, 8, 128),)),
        "swin_shifted_padded": (m.hr_encoder.stages[2].blocks[1], (torch.randn(2, 6, 10, 128),)),
        "vit": (m.s2_encoder.blocks[0], (torch.randn(6, 17, 64),)),
        "fusion_masked": (m.fusion.blocks[0], (torch.randn(32, 6, 64), kpm)),
        "fusion_last": (m.fusion.blocks[-1].forward_head, (torch.randn(32, 6, 64), kpm)),
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    "name",
    ["swin", "swin_shifted", "swin_shifted_padded", "vit", "fusion_masked", "fusion_last"],
)
def test_no_graph_break_in_block_forward(model, name):
    block, args = _blocks(model)[name]
    # The whole block, the kernels' attention and its dispatch (logging included) traces as
    # one graph.
    torch._dynamo.reset()
    explain = torch._dynamo.explain(block)(*args)
    assert explain.graph_break_count == 0, [str(r.reason) for r in explain.break_reasons]
    assert explain.graph_count == 1


@pytest.mark.slow
def test_export_tiny_encoder_gives_the_same_outputs(model):
    batch = make_batch(2, 3, 2)
    program = torch.export.export(model, (batch,))
    fresh = make_batch(2, 3, 2, generator=torch.Generator().manual_seed(5))
    got = program.module()(fresh)
    with torch.no_grad():
        want = model(fresh)
    assert set(got) == set(want)
    for k, w in want.items():
        for a, b in zip(got[k], w) if isinstance(w, tuple) else [(got[k], w)]:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=k)

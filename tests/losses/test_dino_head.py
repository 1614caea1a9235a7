"""DINOHead: the MLP, the normalisations, the weight-normalised prototypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skysense.losses import DINOHead

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_head_against_plain_torch(n_layers):
    head = DINOHead(13, n_prototypes=37, hidden_dim=19, bottleneck_dim=7, n_layers=n_layers)
    x = torch.randn(11, 13, dtype=torch.float64)
    h = x
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(linears) == n_layers
    for i, lin in enumerate(linears):
        h = h @ lin.weight.double().t() + lin.bias.double()
        if i < n_layers - 1:
            h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU
    z = h / h.norm(dim=-1, keepdim=True)
    w = head.prototypes.double()
    w = w / w.norm(dim=-1, keepdim=True)
    got = head.double()(x)
    assert got.shape == (11, 7)
    torch.testing.assert_close(got, z)
    torch.testing.assert_close(head.prototype_weight(), w)
    torch.testing.assert_close(head.logits(x), z @ w.t())
    assert torch.allclose(head.prototype_weight().norm(dim=-1), torch.ones(37, dtype=torch.float64))


def test_prototype_scale_does_not_matter_but_direction_does():
    head = DINOHead(5, n_prototypes=9, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(3, 5)
    before = head.logits(x)
    with torch.no_grad():
        head.prototypes.mul_(torch.rand(9, 1) * 10 + 0.1)
    torch.testing.assert_close(head.logits(x), before)
    with torch.no_grad():
        head.prototypes[0] = -head.prototypes[0]
    torch.testing.assert_close(head.logits(x)[:, 0], -before[:, 0])


def test_gradient_of_prototypes_matches_weight_norm_with_unit_gain():
    """The free matrix normalised on use has the gradient of weight_norm(g = 1)."""
    head = DINOHead(6, n_prototypes=10, hidden_dim=8, bottleneck_dim=5).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.randn(4, 10, dtype=torch.float64)
    (head.logits(x) * target).sum().backward()
    v = head.prototypes.detach().clone().requires_grad_(True)
    z = head(x).detach()
    (z @ F.normalize(v, dim=-1).t() * target).sum().backward()
    torch.testing.assert_close(head.prototypes.grad, v.grad)


def test_bad_width_is_a_clear_error():
    head = DINOHead(8, n_prototypes=4, hidden_dim=4, bottleneck_dim=2)
    with pytest.raises(ValueError, match="width 5.*expects 8"):
        head(torch.randn(2, 5))

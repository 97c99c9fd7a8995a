"""The FedProx term against a hand computation: squared norm, shared parameters only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.fedprox import proximal_term


def test_value_and_gradient_match_hand_computation():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([3.0]))
    anchor = {"weight": torch.tensor([[0.0, 0.0]]), "bias": torch.tensor([1.0])}
    mu = 0.5
    term = proximal_term(model, anchor, mu)
    # (mu/2) * (1^2 + 2^2 + (3-1)^2) = 0.25 * 9
    assert term.item() == pytest.approx(2.25)
    term.backward()
    # d/dw (mu/2)||w - w0||^2 = mu (w - w0)
    assert torch.allclose(model.weight.grad, torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([1.0]))


def test_parameters_absent_from_the_anchor_are_not_pulled():
    model = nn.Linear(2, 1)
    term = proximal_term(model, {"weight": torch.zeros(1, 2)}, 1.0)
    term.backward()
    assert model.bias.grad is None


def test_zero_mu_is_exactly_fedavg():
    model = nn.Linear(2, 1)
    assert proximal_term(model, {"weight": torch.zeros(1, 2)}, 0.0).item() == 0.0


def test_fused_gradient_equals_autograd_of_the_term():
    from common.fedprox import ProximalGradient

    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    b.load_state_dict(a.state_dict())
    anchor = {k: v.detach() + torch.randn_like(v) for k, v in a.named_parameters() if k != "1.bias"}
    mu = 0.3
    value = proximal_term(a, anchor, mu)
    value.backward()
    fused_value = ProximalGradient(b, anchor, mu).apply()
    assert fused_value == pytest.approx(value.item(), rel=1e-5)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if name == "1.bias":
            assert pa.grad is None and pb.grad is None
        else:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name

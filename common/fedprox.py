"""The FedProx proximal term, computed by the site during local training."""

from __future__ import annotations

import torch
from torch import nn


def proximal_term(
    model: nn.Module,
    global_params: dict[str, torch.Tensor],
    mu: float,
) -> torch.Tensor:
    r"""(mu/2) * sum_k ||w_k - w_k^t||^2 over the shared trainable parameters.

    The norm is **squared**: Li et al. (2018) define the penalty on the squared
    L2 distance, whose gradient mu * (w - w^t) pulls linearly toward the global
    model. Summing unsquared norms (as Flower's docstring example does) gives a
    gradient of constant magnitude that never fades near the global model.
    Site-local norm tensors are absent from ``global_params`` and so are not
    pulled toward anything.
    """
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float32)
    if mu == 0.0:
        return total
    for key, anchor in global_params.items():
        total = total + (params[key] - anchor).pow(2).sum()
    return 0.5 * mu * total


class ProximalGradient:
    r"""The same penalty, applied to the gradients directly after ``backward()``.

    Its gradient is known in closed form, mu * (w - w^t), so instead of building
    an autograd graph over every shared tensor each step (a third of a small
    model's step time on a CPU), the difference is computed once with fused
    multi-tensor ops and added to the gradients; the value
    (mu/2) * sum ||w - w^t||^2 comes from the same differences. The result is
    identical to differentiating ``proximal_term`` (tested).
    """

    def __init__(self, model: nn.Module, global_params: dict[str, torch.Tensor], mu: float) -> None:
        params = dict(model.named_parameters())
        self.mu = mu
        self.params: list[torch.Tensor] = [params[k] for k in global_params]
        self.anchors = [global_params[k].detach() for k in global_params]

    @torch.no_grad()
    def apply(self) -> float:
        """Add mu * (w - w^t) to each shared parameter's gradient; return the penalty's value."""
        if self.mu == 0.0 or not self.params:
            return 0.0
        diffs = torch._foreach_sub(self.params, self.anchors)
        grads = []
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        torch._foreach_add_(grads, diffs, alpha=self.mu)
        squares = torch.stack(torch._foreach_norm(diffs)).pow(2).sum()
        return float(0.5 * self.mu * squares)

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

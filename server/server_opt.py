r"""Server-side adaptive optimisation (FedOpt, Reddi et al. 2021) with Flower's own FedAdam and FedYogi.

The round's aggregate :math:`\bar w` (weighted mean, or a robust one) defines
the pseudo-gradient :math:`\Delta_t = \bar w - w^t`, and the server moves by
Adam's or Yogi's step on it instead of by :math:`\Delta_t` itself:

.. math::
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) \Delta_t, \qquad
    w^{t+1} = w^t + \eta \, \frac{m_t}{\sqrt{v_t} + \tau}

with :math:`v_t` Adam's or Yogi's second moment. Flower's strategies compute
:math:`\bar w` themselves from the replies; fedseg has already screened and
aggregated them, so the aggregate is handed to Flower's step unchanged (the
``_GivenAggregate`` base takes FedAvg's place below FedAdam/FedYogi). The
moments live in server memory; after a server restart they start from zero.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedYogi

from common.config import FederationConfig
from common.wire import from_wire, to_wire

BETA_1, BETA_2 = 0.9, 0.99
"""Flower's (and the paper's) defaults for both FedAdam and FedYogi."""


class _GivenAggregate(FedAvg):
    """Stands in for FedAvg's averaging: returns the aggregate fedseg computed."""

    given: ArrayRecord | None = None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.given, None


class _Adam(FedAdam, _GivenAggregate):
    pass


class _Yogi(FedYogi, _GivenAggregate):
    pass


class ServerOptimizer:
    """Moves the global model by Flower's FedAdam or FedYogi step on each round's aggregate."""

    def __init__(self, cfg: FederationConfig) -> None:
        kind = {"adam": _Adam, "yogi": _Yogi}[cfg.server_optimizer]
        self.flower = kind(eta=cfg.server_lr, beta_1=BETA_1, beta_2=BETA_2, tau=cfg.server_tau)

    def step(self, server_round: int, reference: dict[str, np.ndarray], aggregate: ArrayRecord) -> ArrayRecord:
        """The new global model from the round's starting point ``reference`` and its ``aggregate``."""
        self.flower.current_arrays = {k: np.asarray(v, dtype=np.float32) for k, v in reference.items()}
        self.flower.given = aggregate
        moved, _ = self.flower.aggregate_train(server_round, [])
        return to_wire(from_wire(moved))  # Flower's step may promote to float64; the model is float32


def server_optimizer(cfg: FederationConfig) -> ServerOptimizer | None:
    return None if cfg.server_optimizer == "none" else ServerOptimizer(cfg)

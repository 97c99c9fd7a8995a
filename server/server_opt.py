r"""Server-side optimisation of the round's update with Flower's own FedAvgM, FedAdam and FedYogi.

The round's aggregate :math:`\bar w` (weighted mean, or a robust one) defines
the pseudo-gradient :math:`\Delta_t = \bar w - w^t`, and the server moves by an
optimiser's step on it instead of by :math:`\Delta_t` itself. ``momentum`` is
FedAvgM (Hsu et al. 2019) with server learning rate 1, so that with
:math:`\beta = 0` it is plain averaging:

.. math::
    v_t = \beta v_{t-1} + \Delta_t, \qquad w^{t+1} = w^t + v_t

It keeps the direction the rounds agree on and damps the one a single round's
sites pulled towards, and it lets the shared weights travel further per round
than one round's averaged update, which is shorter than any site's own when the
sites disagree. ``adam`` and ``yogi`` are FedOpt (Reddi et al. 2021):

.. math::
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) \Delta_t, \qquad
    w^{t+1} = w^t + \eta \, \frac{m_t}{\sqrt{v_t} + \tau}

with :math:`v_t` Adam's or Yogi's second moment. Flower's strategies compute
:math:`\bar w` themselves from the replies; fedseg has already screened and
aggregated them, so the aggregate is handed to Flower's step unchanged (the
``_GivenAggregate`` base takes FedAvg's place below FedAvgM/FedAdam/FedYogi).
The moments are saved with every round's checkpoint (``state``), so a server
restarted mid-run continues with the moments of the round it resumes from.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

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


class _Momentum(FedAvgM, _GivenAggregate):
    pass


class ServerOptimizer:
    """Moves the global model by Flower's FedAvgM, FedAdam or FedYogi step on each round's aggregate."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.keys: list[str] = []
        """The aggregate's tensor names in the order FedAvgM's momentum vector holds them."""
        if cfg.server_optimizer == "momentum":
            self.flower: _GivenAggregate = _Momentum(server_learning_rate=1.0, server_momentum=cfg.server_momentum)
        else:
            kind = {"adam": _Adam, "yogi": _Yogi}[cfg.server_optimizer]
            self.flower = kind(eta=cfg.server_lr, beta_1=BETA_1, beta_2=BETA_2, tau=cfg.server_tau)

    def step(self, server_round: int, reference: dict[str, np.ndarray], aggregate: ArrayRecord) -> ArrayRecord:
        """The new global model from the round's starting point ``reference`` and its ``aggregate``."""
        start = {k: np.asarray(reference[k], dtype=np.float32) for k in aggregate}  # FedAvgM pairs by position
        self.flower.current_arrays = (ArrayRecord({k: Array(v) for k, v in start.items()})
                                      if isinstance(self.flower, FedAvgM) else start)
        self.flower.given = aggregate
        if isinstance(self.flower, FedAvgM) and self.flower.momentum_vector is not None:
            by_key = dict(zip(self.keys, self.flower.momentum_vector, strict=True))  # loaded moments may be in
            self.flower.momentum_vector = [by_key[k] for k in aggregate.keys()]     # another order
        self.keys = list(aggregate.keys())  # before the step: Flower's FedAvgM empties the record it is given
        moved, _ = self.flower.aggregate_train(server_round, [])
        return to_wire(from_wire(moved))  # Flower's step may promote to float64; the model is float32

    def state(self) -> dict[str, np.ndarray]:
        """The moments after the last step, named ``<moment>/<tensor>``; empty before the first step."""
        if isinstance(self.flower, FedAvgM):
            vector = self.flower.momentum_vector
            moments = {"momentum": dict(zip(self.keys, vector, strict=True)) if vector is not None else {}}
        else:
            moments = {"m": self.flower.m_t or {}, "v": self.flower.v_t or {}}
        return {f"{name}/{k}": np.asarray(v, dtype=np.float32) for name, arrays in moments.items()
                for k, v in arrays.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Continue from ``state`` (as returned by ``state``)."""
        moments: dict[str, dict[str, np.ndarray]] = {}
        for name, value in state.items():
            moment, key = name.split("/", 1)
            moments.setdefault(moment, {})[key] = np.asarray(value, dtype=np.float32)
        if isinstance(self.flower, FedAvgM):
            self.keys = list(moments.get("momentum", {}))
            self.flower.momentum_vector = [moments["momentum"][k] for k in self.keys] if self.keys else None
        else:
            self.flower.m_t, self.flower.v_t = moments.get("m"), moments.get("v")


def server_optimizer(cfg: FederationConfig) -> ServerOptimizer | None:
    return None if cfg.server_optimizer == "none" else ServerOptimizer(cfg)

"""Server momentum (FedAvgM, Hsu et al. 2019) on the aggregated update.

With beta > 0 the server keeps a velocity v over the shared tensors and moves
the global model by it instead of by the round's plain update:

    v^{t+1} = beta * v^t + (w_agg - w^t),    w^{t+1} = w^t + v^{t+1}

Sites then travel further per round in directions they keep agreeing on,
which is what a federation with few local steps per round lacks compared with
training in one place. The velocity lives in server memory only; after a
restart of the server it starts again from zero.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


class ServerMomentum:
    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.velocity: dict[str, np.ndarray] = {}

    def step(self, reference: dict[str, np.ndarray], aggregate: ArrayRecord) -> ArrayRecord:
        """The next global model from the round's start ``reference`` and its aggregate."""
        moved = {}
        for key, array in aggregate.items():
            update = array.numpy().astype(np.float32) - reference[key]
            velocity = self.beta * self.velocity[key] + update if key in self.velocity else update
            self.velocity[key] = velocity
            moved[key] = Array(np.ascontiguousarray(reference[key] + velocity))
        return ArrayRecord(moved)

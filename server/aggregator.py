"""The server's update rule on a round's sound replies: robust.py's combination, then server_opt.py's step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, Message

from common import keys
from common.config import FederationConfig
from common.fingerprint import bounded_weights

from . import robust
from .server_opt import server_optimizer


class Aggregator:
    """Combines the shared tensors by ``federation.aggregator``, then moves by ``federation.server_optimizer``."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg
        self.server_optimizer = server_optimizer(cfg)

    def __call__(self, server_round: int, sound: Sequence[Message], reference: dict[str, np.ndarray] | None,
                 equal_weights: bool = False, server_step: bool = True) -> ArrayRecord:
        """w^{t+1} from the sound replies and the round's global model w^t (``reference``).

        Each site weighs its training cases, capped at ``WEIGHT_CAP_RATIO`` times the other sites'
        median (common/fingerprint.py: a count is the site's own claim), or 1 with ``equal_weights``
        (the robust aggregators give every site one vote whatever is asked). Without ``server_step`` the combination is
        returned as it is, for a caller that alters it before the server optimizer's ``step``.
        """
        weights = [1.0 if equal_weights else float(msg.content.metric_records[keys.METRICS][keys.NUM_EXAMPLES])
                   for msg in sound]
        weights = bounded_weights(weights)  # a count is the site's own claim: none weighs over 3x the others' median
        aggregate = robust.aggregate([msg.content.array_records[keys.ARRAYS] for msg in sound], weights, self.cfg,
                                     reference)
        return self.step(server_round, reference, aggregate) if server_step else aggregate

    def step(self, server_round: int, reference: dict[str, np.ndarray] | None, aggregate: ArrayRecord
             ) -> ArrayRecord:
        """The server optimizer's move from w^t by ``aggregate``; ``aggregate`` itself without one."""
        if self.server_optimizer is None or reference is None:
            return aggregate
        return self.server_optimizer.step(server_round, reference, aggregate)

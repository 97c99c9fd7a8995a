"""The combination of a round's sound training replies: each site's weight, then aggregation_rules.py's rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, Message

from common import keys
from common.config import FederationConfig
from common.fingerprint import bounded_weights
from common.records import number

from . import aggregation_rules


class Aggregator:
    """Combines the shared tensors of the sound replies by ``federation.aggregator``."""

    def __init__(self, cfg: FederationConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, sound: Sequence[Message], reference: dict[str, np.ndarray] | None, equal_weights: bool = False
    ) -> ArrayRecord:
        """The combination of the sound replies, given the round's global model w^t (``reference``).

        Each site weighs its training cases, capped at ``WEIGHT_CAP_RATIO`` times the other sites'
        median (common/fingerprint.py: a count is the site's own claim), or 1 with ``equal_weights``
        (the robust aggregators give every site one vote whatever is asked).
        """
        weights = [
            1.0 if equal_weights else float(number(msg.content.metric_records[keys.METRICS], keys.NUM_EXAMPLES))
            for msg in sound
        ]
        weights = bounded_weights(weights)  # a count is the site's own claim: none weighs over 3x the others' median
        return aggregation_rules.aggregate(
            [msg.content.array_records[keys.ARRAYS] for msg in sound], weights, self.cfg, reference
        )

"""What a round publishes: the mean made private, stepped by the server optimizer, and saved with its state.

The order is the guarantee's: central DP (server/dp.py) noises the round's mean first, and the server
optimizer (server/server_opt.py) then steps on the noised model only, post-processing that spends no budget.
The optimizer's state is saved beside every round's model, so a server restarted mid-run continues with the
velocity of the round it resumes from. None of this is inside the round's timed aggregation
(``aggregation_s`` in the metrics log), which measures the mean alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from .dp import CentralDP
from .recorder import RunRecorder
from .server_opt import ServerMomentum


@dataclass
class Release:
    """The post-mean steps of a round, each optional: DP noise, then the server optimizer's step."""

    privacy: CentralDP | None
    optimizer: ServerMomentum | None
    recorder: RunRecorder
    shapes: dict[str, tuple[int, ...]]

    def __call__(self, rnd: int, mean: ArrayRecord, sites: int, reference: dict[str, np.ndarray] | None) -> ArrayRecord:
        """The model round ``rnd`` publishes from the ``mean`` of ``sites`` sites, given w^t (``reference``)."""
        model = self.privacy.release(rnd, mean, sites) if self.privacy else mean
        return self.optimizer.step(reference, model) if self.optimizer and reference is not None else model

    def save(self, rnd: int, model: ArrayRecord) -> None:
        """Keep round ``rnd``'s model, and the optimizer's state beside it for a resume from it."""
        if self.optimizer is not None:
            self.optimizer.save(self.recorder.checkpoints, rnd)
        self.recorder.saved(rnd, model)

    def resume(self, from_round: int) -> None:
        """Continue the server optimizer with its state saved after ``from_round``, the round resumed from."""
        if self.optimizer is not None and from_round > 0:
            self.optimizer.restore(self.recorder.checkpoints, from_round, self.shapes)

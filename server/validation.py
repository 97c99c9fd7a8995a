"""The checks a site's reply passes before the server uses it.

A reply is used only if it is what an honest site running this model would
send: no error, the server's model signature, the declared metrics, exactly
the travelling keys with their shapes, finite values, and (for training) an
update whose size is in line with the other sites of the same round. The
size check is relative because there is no absolute scale for a good update:
it depends on the learning rate, the local steps and the data. An update
larger than ``norm_bound`` times the median size of the *other* sites'
updates (a site scaling its update by 100, or one whose training blew up
without producing NaN) is rejected; with two honest sites out of three or
better, the median of the others is an honest size. An update of exactly zero
(the global model sent back untrained) carries nothing but would dilute the
mean, and Flower's DP clipping divides by it, so it is rejected too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from common import keys


@dataclass(frozen=True)
class ReplyValidator:
    """What the server expects of every reply in this run."""

    signature: str
    shapes: dict[str, tuple[int, ...]]
    norm_bound: float = 0.0
    """Relative update-norm bound; 0 switches the check off."""

    def problem(self, msg: Message, is_train: bool) -> str | None:
        """Why a reply cannot be used, or None when it is sound."""
        if msg.has_error():
            return msg.error.reason or f"error code {msg.error.code}"
        content = msg.content
        identity = content.config_records.get(keys.IDENTITY)
        if identity is None or str(identity.get(keys.SIGNATURE)) != self.signature:
            return "model signature missing or different from the server's"
        metrics = content.metric_records.get(keys.METRICS)
        if metrics is None or float(metrics.get(keys.NUM_EXAMPLES, 0)) <= 0:
            return f"no positive '{keys.NUM_EXAMPLES}' in the reply metrics"
        required = keys.TRAIN_METRICS if is_train else keys.EVAL_REQUIRED
        missing = [k for k in required if k not in metrics]
        if missing:
            return f"reply metrics lack {missing}"
        if not all(np.isfinite(float(v)) for v in metrics.values() if not isinstance(v, list)):
            return "non-finite metric values"
        if not is_train:
            return "model arrays in an evaluation reply" if content.array_records else None
        return self._arrays_problem(content.array_records)

    def _arrays_problem(self, records: dict[str, ArrayRecord]) -> str | None:
        if set(records) != {keys.ARRAYS}:
            return f"a training reply must hold exactly one ArrayRecord '{keys.ARRAYS}', got {sorted(records)}"
        arrays = records[keys.ARRAYS]
        if set(arrays.keys()) != set(self.shapes):
            return "model arrays do not match the model's travelling keys"
        for key, array in arrays.items():
            if tuple(array.shape) != self.shapes[key]:
                return f"array '{key}' has shape {tuple(array.shape)}, expected {self.shapes[key]}"
            if not np.isfinite(array.numpy()).all():
                return f"array '{key}' holds NaN or Inf"
        return None

    def norm_problems(self, updates: Sequence[ArrayRecord], reference: dict[str, np.ndarray]) -> list[str | None]:
        """For each reply (already sound), why its update is out of line with the others, or None."""
        norms = [update_norm(u, reference) for u in updates]
        bounded = self.norm_bound > 0 and len(norms) > 1
        reasons: list[str | None] = []
        for k, norm in enumerate(norms):
            others = float(np.median(norms[:k] + norms[k + 1:])) if bounded else math.inf
            if norm == 0:
                reasons.append("update is exactly zero: the site sent the global model back untrained")
            elif norm > self.norm_bound * others:
                reasons.append(f"update norm {norm:.4g} exceeds {self.norm_bound:g} x the other sites' median "
                               f"{others:.4g}")
            else:
                reasons.append(None)
        return reasons


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """||w_k - w_global||_2 over all travelling tensors, one tensor at a time (float64 sum)."""
    total = 0.0
    for key, array in arrays.items():
        diff = (array.numpy().astype(np.float32) - reference[key]).ravel().astype(np.float64)
        total += float(diff @ diff)
    return math.sqrt(total)

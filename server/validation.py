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
better, the median of the others is an honest size. With fewer than three
sites there is no majority to say which size is honest (a site sending a
tiny update would otherwise get the honest one rejected), so the bound is
checked only from three sound replies on; ``clip_updates`` or DP clipping
bound two-site federations. An update that is zero to float32 precision
(smaller than ``ZERO_UPDATE_RATIO`` times the global model's norm: the model
sent back untrained, or 1e-30 added to it) carries nothing but would dilute
the mean, and Flower's DP clipping divides by it, so it is rejected too.

Every check reads a reply defensively: a value of the wrong type (a list
where a number belongs), an Array whose declared shape differs from its data,
or anything else that does not parse is a reason to leave the reply out,
never an exception that ends the run. Dice values must lie in [0, 1], since
the server picks its best model from them. Which records, metrics, keys and
dtypes a reply of each kind holds is common/reply_protocol.py, the very rules
the site's egress guard enforces before the reply leaves the hospital.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord

from common import keys, secagg
from common.records import number
from common.reply_protocol import DICE_METRICS, RULES, WIRE_FLOAT_DTYPES, masked_arrays, masked_rule

ZERO_UPDATE_RATIO = 1e-7
"""An update smaller than this times ||w_global|| is below float32 resolution: nothing was trained."""
MIN_SITES_FOR_BOUND = 3
"""The relative norm bound needs a majority of others to tell an honest size from a hostile one."""
TRAIN, EVALUATE = RULES[MessageType.TRAIN], RULES[MessageType.EVALUATE]
MASKED_TRAIN = masked_rule(TRAIN)


@dataclass(frozen=True)
class ReplyValidator:
    """What the server expects of every reply in this run."""

    signature: str
    shapes: dict[str, tuple[int, ...]]
    norm_bound: float = 0.0
    """Relative update-norm bound; 0 switches the check off."""

    def problem(self, msg: Message, is_train: bool) -> str | None:
        """Why a reply cannot be used, or None when it is sound. Never raises."""
        try:
            return self._problem(msg, is_train)
        except Exception as err:  # a reply that does not even parse is left out, never fatal
            return f"malformed reply ({type(err).__name__})"

    def received_problem(self, msg: Message) -> str | None:
        """Why a training reply's evaluation of the model it received (``keys.EVALUATION``) cannot be used."""
        try:
            if problem := self._identity_problem(msg):
                return problem
            evaluation = msg.content.metric_records.get(keys.EVALUATION)
            if evaluation is None:
                return f"no '{keys.EVALUATION}' record in the training reply: the received model was not evaluated"
            return metrics_problem(evaluation, EVALUATE.required)
        except Exception as err:  # as in problem(): never fatal
            return f"malformed reply ({type(err).__name__})"

    def secagg_problem(self, msg: Message) -> str | None:
        """Why a secure-aggregation reply (keys, shares, unmask) cannot be used: its identity, or a ``secagg``
        record not of its stage's form (common/secagg.py). Never raises."""
        try:
            if problem := self._identity_problem(msg):
                return problem
            record = msg.content.config_records.get(secagg.RECORD)
            if record is None or set(msg.content.array_records):
                return f"a secure-aggregation reply holds '{secagg.RECORD}' and no arrays"
            problems = secagg.reply_problems(msg.metadata.message_type, record)
            return problems[0] if problems else None
        except Exception as err:  # as in problem(): never fatal
            return f"malformed reply ({type(err).__name__})"

    def masked_problem(self, msg: Message, length: int) -> str | None:
        """Why a training reply under secure aggregation cannot be used: its identity, its metrics (no case
        count), or anything but one uint32 vector of ``length`` values. Never raises."""
        try:
            if problem := self._identity_problem(msg):
                return problem
            metrics = msg.content.metric_records.get(keys.METRICS)
            if metrics is None or keys.NUM_EXAMPLES in metrics:
                return f"the '{keys.METRICS}' record is missing or holds a case count"
            if problem := metrics_problem(metrics, MASKED_TRAIN.required):
                return problem
            expected = masked_arrays(length)
            records = msg.content.array_records
            if set(records) != {keys.ARRAYS} or set(records[keys.ARRAYS]) != set(expected):
                return f"a masked training reply must hold exactly one array '{secagg.MASKED}'"
            ((name, (shape, dtypes)),) = expected.items()
            values = records[keys.ARRAYS][name].numpy()
            if str(values.dtype) not in dtypes or values.shape != shape:
                return (
                    f"the masked vector is {values.dtype}{list(values.shape)}, expected {secagg.MASKED_DTYPE}[{length}]"
                )
            return None
        except Exception as err:  # as in problem(): never fatal
            return f"malformed reply ({type(err).__name__})"

    def _identity_problem(self, msg: Message) -> str | None:
        if msg.has_error():
            return msg.error.reason or f"error code {msg.error.code}"
        identity = msg.content.config_records.get(keys.IDENTITY)
        if identity is None or str(identity.get(keys.SIGNATURE)) != self.signature:
            return "model signature missing or different from the server's"
        return None

    def _problem(self, msg: Message, is_train: bool) -> str | None:
        if problem := self._identity_problem(msg):
            return problem
        content = msg.content
        metrics = content.metric_records.get(keys.METRICS)
        if metrics is None:
            return f"no '{keys.METRICS}' record in the reply"
        rule = TRAIN if is_train else EVALUATE
        if problem := metrics_problem(metrics, rule.required):
            return problem
        if not rule.has_arrays:
            return "model arrays in an evaluation reply" if content.array_records else None
        return self._arrays_problem(content.array_records)

    def _arrays_problem(self, records: Mapping[str, ArrayRecord]) -> str | None:
        if set(records) != {keys.ARRAYS}:
            return f"a training reply must hold exactly one ArrayRecord '{keys.ARRAYS}', got {sorted(records)}"
        arrays = records[keys.ARRAYS]
        if set(arrays.keys()) != set(self.shapes):
            return "model arrays do not match the model's travelling keys"
        for key, array in arrays.items():
            if tuple(array.shape) != self.shapes[key]:
                return f"array '{key}' has shape {tuple(array.shape)}, expected {self.shapes[key]}"
            if array.dtype not in WIRE_FLOAT_DTYPES:
                return f"array '{key}' has dtype {array.dtype}, expected one of {WIRE_FLOAT_DTYPES}"
            values = array.numpy()
            if values.shape != self.shapes[key] or str(values.dtype) != array.dtype:
                return (
                    f"array '{key}' declares {array.dtype}{list(array.shape)} but holds "
                    f"{values.dtype}{list(values.shape)}"
                )
            if not np.isfinite(values.astype(np.float32)).all():
                return f"array '{key}' holds NaN or Inf (in float32)"
        return None

    def norm_problems(self, updates: Sequence[ArrayRecord], reference: dict[str, np.ndarray]) -> list[str | None]:
        """For each reply (already sound), why its update is out of line with the others, or None."""
        norms = [update_norm(u, reference) for u in updates]
        zero = ZERO_UPDATE_RATIO * model_norm(reference)
        nonzero = [n for n in norms if n > zero]
        bounded = self.norm_bound > 0 and len(nonzero) >= MIN_SITES_FOR_BOUND
        reasons: list[str | None] = []
        for norm in norms:
            others = nonzero.copy()
            if norm > zero:
                others.remove(norm)
            median = float(np.median(others)) if bounded else math.inf
            if norm == 0:
                reasons.append("update is exactly zero: the site sent the global model back untrained")
            elif norm <= zero:
                reasons.append(
                    f"update norm {norm:.3g} is zero to float32 precision: the site sent the global "
                    f"model back untrained"
                )
            elif norm > self.norm_bound * median:
                reasons.append(
                    f"update norm {norm:.4g} exceeds {self.norm_bound:g} x the other sites' median {median:.4g}"
                )
            else:
                reasons.append(None)
        return reasons


def metrics_problem(metrics: MetricRecord, required: Sequence[str]) -> str | None:
    """Why a reply's metrics cannot be used: every value a finite number, counts positive, Dice in [0, 1]."""
    missing = [k for k in required if k not in metrics]
    if missing:
        return f"reply metrics lack {missing}"
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"metric '{name}' is a {type(value).__name__}, not a number"
        if not math.isfinite(float(value)):
            return f"metric '{name}' is not finite"
        if DICE_METRICS.fullmatch(name) and not 0.0 <= float(value) <= 1.0:
            return f"metric '{name}' is {float(value):.4g}, outside a Dice value's range [0, 1]"
    if keys.NUM_EXAMPLES in required and float(number(metrics, keys.NUM_EXAMPLES)) <= 0:
        return f"no positive '{keys.NUM_EXAMPLES}' in the reply metrics"
    return None


def model_norm(reference: dict[str, np.ndarray]) -> float:
    """||w_global||_2 over the travelling tensors (float64 sum)."""
    return math.sqrt(sum(float(np.square(v.astype(np.float64)).sum()) for v in reference.values()))


def update_norm(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """||w_k - w_global||_2 over all travelling tensors, one tensor at a time (float64 sum)."""
    total = 0.0
    for key, array in arrays.items():
        diff = (array.numpy().astype(np.float32) - reference[key]).ravel().astype(np.float64)
        total += float(diff @ diff)
    return math.sqrt(total)

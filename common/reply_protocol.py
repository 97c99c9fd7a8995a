"""What a site's reply of each kind may hold: defined once, enforced on both sides.

The site's egress guard (client/egress.py) blocks anything else before it
leaves the hospital; the centre's validator (server/validation.py) leaves out
any reply that is not of this form before it is used. Both read the rules
here, so the two sides can never disagree about what an honest reply is:

- ``train``: the identity record, the training metrics (``keys.TRAIN_METRICS``
  required) and one ArrayRecord ``keys.ARRAYS`` of the travelling tensors in a
  wire dtype; optionally ``keys.EVALUATION``, the received model's evaluation
  (an ``evaluate`` reply's metrics). Under secure aggregation (``masked_rule``,
  ``masked_arrays``) the arrays are one uint32 vector and there is no case count;
- ``evaluate``: the identity record and the evaluation metrics, no arrays;
- the fingerprint query: the case count and the ``keys.FINGERPRINT`` record;
- the cross-evaluation query: the cross-evaluation metrics, no arrays;
- the secure-aggregation queries: the ``secagg`` record of their stage, whose
  contents common/secagg.py checks (``reply_problems``), no arrays.

Every kind may add the timeline metrics (Unix times of the site's stages).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flwr.app import MessageType

from . import keys, secagg

FINGERPRINT_QUERY = f"{MessageType.QUERY}.{keys.FINGERPRINT_ACTION}"
CROSS_EVAL_QUERY = f"{MessageType.QUERY}.{keys.CROSS_EVAL_ACTION}"
WIRE_FLOAT_DTYPES = ("float32", "float16")
"""The dtypes a floating-point tensor may travel in (federation.wire_dtype)."""
DICE_METRICS = re.compile(
    rf"dice|dice_adapted|dice_personal|{keys.DICE_CLASS_PREFIX}\d+|dice_fusion|dice_annotator_\d+"
)
"""Metrics that are Dice values, hence in [0, 1]."""


@dataclass(frozen=True)
class ReplyRule:
    """What one kind of reply may hold: exactly these records (plus the ``optional`` ones), these metric
    names, at least ``required`` (in the order common/keys.py declares them)."""

    records: frozenset[str]
    metrics: frozenset[str]
    required: tuple[str, ...]
    optional: frozenset[str] = frozenset()

    @property
    def has_arrays(self) -> bool:
        """Whether this kind of reply carries model arrays (only training does)."""
        return keys.ARRAYS in self.records


def reply_rules(
    dice_classes: frozenset[str] = frozenset(), test_classes: frozenset[str] = frozenset()
) -> dict[str, ReplyRule]:
    """The rule of each message type a site answers (with its per-class Dice names); any other type may only
    get an error."""
    identity = {keys.METRICS, keys.IDENTITY}
    timeline = frozenset(keys.TIMELINE_METRICS)  # when the reply passed the site's stages: Unix times, nothing else
    return {
        MessageType.TRAIN: ReplyRule(
            frozenset({*identity, keys.ARRAYS}),
            frozenset({*keys.TRAIN_METRICS, keys.LEARNING_RATE, keys.NO_SCORE}) | timeline,
            keys.TRAIN_METRICS,
            optional=frozenset({keys.EVALUATION}),
        ),
        MessageType.EVALUATE: ReplyRule(
            frozenset(identity), frozenset(keys.EVAL_METRICS) | dice_classes | timeline, keys.EVAL_REQUIRED
        ),
        FINGERPRINT_QUERY: ReplyRule(
            frozenset({*identity, keys.FINGERPRINT}), frozenset({keys.NUM_EXAMPLES}) | timeline, (keys.NUM_EXAMPLES,)
        ),
        CROSS_EVAL_QUERY: ReplyRule(
            frozenset(identity),
            frozenset(keys.CROSS_EVAL_METRICS) | dice_classes | test_classes | timeline,
            (keys.NUM_EXAMPLES,),
        ),
        # secure aggregation: public keys, encrypted shares, shares for unmasking (common/secagg.py checks each)
        **{query: ReplyRule(frozenset({*identity, secagg.RECORD}), timeline, ()) for query in secagg.QUERIES},
    }


RULES = reply_rules()
"""The rules without per-class Dice names: what the centre checks of every reply's form."""


def masked_rule(train: ReplyRule) -> ReplyRule:
    """A training reply under secure aggregation: no case count (its mean weighs every site 1)."""
    return ReplyRule(
        train.records,
        train.metrics - {keys.NUM_EXAMPLES},
        tuple(k for k in train.required if k != keys.NUM_EXAMPLES),
        train.optional,
    )


def masked_arrays(length: int) -> dict[str, tuple[tuple[int, ...], frozenset[str]]]:
    """The arrays of a masked training reply: one uint32 vector as long as the travelling tensors together,
    in their place (name -> (shape, dtypes)); nothing unmasked may leave."""
    return {secagg.MASKED: ((length,), frozenset({secagg.MASKED_DTYPE}))}

"""A hostile or broken site's reply is rejected, logged with its reason, and changes nothing.

Five real sites train a real round (tests/helpers/hostile.py); site 5's reply is then
replaced by NaN weights, a wrongly shaped tensor, or its update scaled 100x,
as a site running modified code would send it. The server must reject it,
say why in the metrics log, and produce exactly the model the four honest
sites alone give, so the global Dice is untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MessageType

from common.metrics_log import Event, read_events
from common.runs import METRICS_FILE
from server.validation import ReplyValidator, update_norm
from tests.helpers.envelopes import reply as make_reply
from tests.helpers.hostile import nan_update, scaled_update, site_name, wrong_shape

pytestmark = pytest.mark.simulation

SCALE = 100.0
MIN_DICE_LOSS_UNCHECKED = 0.05
"""A 100x update let through must visibly hurt, or this test proves nothing."""


def _equal(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize(
    "attack, reason",
    [
        (lambda hostile_round, r: nan_update(r), "holds NaN or Inf"),
        (lambda hostile_round, r: wrong_shape(r), "has shape"),
        (lambda hostile_round, r: scaled_update(r, hostile_round.start, SCALE), "exceeds 10 x the other sites' median"),
    ],
    ids=["nan", "wrong-shape", "scaled-100x"],
)
def test_hostile_reply_is_rejected_and_the_model_unchanged(hostile_round, attack, reason):
    *honest, victim = hostile_round.honest
    name = f"reject-{reason.split()[0]}"
    arrays = hostile_round.aggregate([*honest, attack(hostile_round, victim)], name=name)
    assert _equal(arrays, hostile_round.aggregate(honest, name="four-honest"))
    failures = list(read_events(hostile_round.run / name / METRICS_FILE, Event.FAILURE))
    assert [(f["site"], f["stage"]) for f in failures] == [(site_name(victim), "train")]
    assert reason in failures[0]["reason"]
    assert all(np.isfinite(arrays[k].numpy()).all() for k in arrays)


def test_global_dice_is_unaffected_by_a_rejected_100x_site(hostile_round):
    *honest, victim = hostile_round.honest
    hostile = scaled_update(victim, hostile_round.start, SCALE)
    guarded = hostile_round.dice(hostile_round.aggregate([*honest, hostile], name="guarded"))
    assert guarded == hostile_round.dice(hostile_round.aggregate(honest, name="four-honest"))
    unchecked = hostile_round.dice(
        hostile_round.aggregate([*honest, hostile], "federation.norm_bound=0", name="unchecked")
    )
    assert unchecked < guarded - MIN_DICE_LOSS_UNCHECKED, (unchecked, guarded)


def test_honest_sites_pass_the_norm_bound(hostile_round):
    validator = ReplyValidator(hostile_round.signature, hostile_round.shapes, norm_bound=10.0)
    reference = {k: v.numpy() for k, v in hostile_round.start.items()}
    updates = [r.content["arrays"] for r in hostile_round.honest]
    assert validator.norm_problems(updates, reference) == [None] * len(updates)
    norms = hostile_round.norms()
    assert max(norms) < 3 * min(norms), norms


# --- the bound itself, on hand-made updates ---------------------------------------------


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((4,), value, np.float32))})


def test_norm_bound_is_relative_to_the_median_of_the_others():
    validator = ReplyValidator("sig", {"w": (4,)}, norm_bound=10.0)
    reference = {"w": np.zeros(4, np.float32)}
    reasons = validator.norm_problems([_arrays(1.0), _arrays(1.2), _arrays(0.9), _arrays(11.0)], reference)
    assert reasons[:3] == [None, None, None] and "exceeds 10 x" in reasons[3]
    assert validator.norm_problems([_arrays(1.0), _arrays(9.0)], reference) == [None, None]
    assert ReplyValidator("sig", {"w": (4,)}, norm_bound=0).norm_problems(
        [_arrays(1.0), _arrays(1.0), _arrays(1e6)], reference
    ) == [None, None, None]
    assert update_norm(_arrays(1.0), reference) == pytest.approx(2.0)


def test_evaluation_replies_may_not_carry_arrays():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from common import keys

    content = RecordDict(
        {
            keys.ARRAYS: _arrays(0.0),
            keys.IDENTITY: ConfigRecord({keys.SIGNATURE: "sig"}),
            keys.METRICS: MetricRecord({"dice": 0.5, "loss": 0.1, keys.NUM_EXAMPLES: 2}),
        }
    )
    problem = ReplyValidator("sig", {"w": (4,)}).problem(make_reply(content, 3, MessageType.EVALUATE), False)
    assert problem == "model arrays in an evaluation reply"


def test_every_aggregation_screens_its_own_replies(tmp_path):
    from common.config import load_config
    from common.metrics_log import MetricsLog
    from server.checkpoints import Checkpoints
    from server.strategy import FedSegStrategy
    from tests.helpers import messages

    def train_reply(node: int, value: float):
        return messages.train_reply(node, f"s{node}", arrays=_arrays(value), n=1, signature="sig")

    cfg = load_config(None, ["federation.run_name=t", "federation.min_sites=1"])
    strategy = FedSegStrategy(cfg, "sig", {"w": (4,)}, MetricsLog(tmp_path), Checkpoints(tmp_path / "ckpt"))
    first, _ = strategy.aggregate_train(1, [train_reply(1, 1.0)])
    second, _ = strategy.aggregate_train(2, [train_reply(1, 2.0), train_reply(2, float("nan"))])
    assert np.allclose(first["w"].numpy(), 1.0) and np.allclose(second["w"].numpy(), 2.0)

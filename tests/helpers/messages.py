"""Real Flower Messages for tests that call a strategy or a ClientApp handler directly: requests, the replies a
site (honest or hostile) sends, and the real strategy that receives them.

Requests and replies themselves are built in tests/helpers/envelopes.py.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import keys
from common.config import load_config
from common.metrics_log import MetricsLog, read_events
from server.checkpoints import Checkpoints
from server.strategy import FedSegStrategy
from tests.helpers.envelopes import reply
from tests.helpers.local_grid import over_the_wire

SIGNATURE = "sig"
SHAPES = {"w": (4, 4), "b": (4,)}
GLOBAL = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
TRAIN_METRICS = {keys.NUM_EXAMPLES: 3, "loss": 1.0, "proximal_loss": 0.1, "duration_s": 2.0}
EVAL_METRICS = {"dice": 0.5, "loss": 0.4, keys.NUM_EXAMPLES: 2}


def content(
    site: str,
    metrics: dict,
    arrays: ArrayRecord | None = None,
    signature: str = SIGNATURE,
    evaluation: dict | None = None,
) -> RecordDict:
    """A reply's records as site ``site`` would fill them: its metrics, its identity (the model ``signature`` it
    trained), and its arrays and its score of the received model when it has them."""
    body = RecordDict(
        {keys.METRICS: MetricRecord(metrics), keys.IDENTITY: ConfigRecord({keys.SITE: site, keys.SIGNATURE: signature})}
    )
    if arrays is not None:
        body[keys.ARRAYS] = arrays
    if evaluation is not None:
        body[keys.EVALUATION] = MetricRecord(evaluation)
    return body


def train_reply(
    node: int,
    site: str,
    step: float = 0.1,
    metrics: dict | None = None,
    arrays: ArrayRecord | None = None,
    *,
    n: int | None = None,
    signature: str = SIGNATURE,
    evaluation: dict | None = None,
) -> Message:
    """Site ``site`` on node ``node`` moved every weight of GLOBAL by ``step`` (or sends ``arrays``), claiming
    ``n`` training cases (TRAIN_METRICS' by default), after Flower's wire representation."""
    arrays = arrays or ArrayRecord({k: Array(v + np.float32(step)) for k, v in GLOBAL.items()})
    metrics = {**(metrics or TRAIN_METRICS), **({keys.NUM_EXAMPLES: n} if n is not None else {})}
    body = content(site, metrics, arrays, signature, evaluation)
    return over_the_wire(reply(body, node, MessageType.TRAIN))


def eval_reply(node: int, site: str, metrics: dict | None = None) -> Message:
    """Site ``site`` on node ``node`` scored the model it received (EVAL_METRICS by default)."""
    return over_the_wire(reply(content(site, metrics or EVAL_METRICS), node, MessageType.EVALUATE))


def real_strategy(
    tmp_path, *overrides: str, nodes: dict[int, str] | None = None, rounds: int = 1, round_offset: int = 0
) -> FedSegStrategy:
    """The real strategy for the tiny model (SHAPES), ``rounds`` rounds in all (one by default: it evaluates in
    its own step), from GLOBAL, with the registered node -> site names."""
    cfg = load_config(
        None, ["federation.run_name=attack", "federation.min_sites=1", f"federation.rounds={rounds}", *overrides]
    )
    strategy = FedSegStrategy(
        cfg, SIGNATURE, SHAPES, MetricsLog(tmp_path), Checkpoints(tmp_path / "ckpt"), round_offset=round_offset
    )
    strategy.node_sites.update(nodes or {})
    strategy.reference = {k: v.copy() for k, v in GLOBAL.items()}
    return strategy


def failures(tmp_path) -> dict[str, str]:
    """Site -> reason of each failure the run's metrics log holds."""
    return {e["site"]: e["reason"] for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "failure"}


def events(tmp_path, kind: str | None = None) -> list[dict]:
    """The run's metrics-log events (of one kind)."""
    return [e for e in read_events(tmp_path / "metrics.jsonl") if kind is None or e["event"] == kind]

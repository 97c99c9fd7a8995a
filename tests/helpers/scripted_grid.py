"""A scripted SuperLink under the centre's real receiving stack: each message the strategy sends is answered
by a function of the test (an honest or a hostile site), and the reply travels as a SuperNode's does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import keys
from common.metrics_log import MetricsLog
from common.records import number
from common.wire import from_wire, pack, unpack
from server.inbound import Inbox
from server.packed_grid import PackedGrid
from server.receiving_grid import ReceivingGrid
from server.strategy import FedSegStrategy
from tests.helpers.local_grid import InProcessGrid, over_the_wire, stamp
from tests.helpers.messages import EVAL_METRICS, GLOBAL, TRAIN_METRICS, content, real_strategy

Answer = Callable[[int, Message], "RecordDict | Error | None"]
"""What site ``node`` answers to a message: its reply's content, an error, or None (no reply, ever)."""


class ScriptedGrid(InProcessGrid):
    """The SuperLink's side of the run's grid: each message is answered by ``answer``, and the reply travels as
    a SuperNode's does (packed, then through Flower's wire format). Everything above it is the real stack:
    ``stack`` wraps it in server/packed_grid.py and server/receiving_grid.py as server/server_app.py does.

    ``late``: node -> how many pulls its replies wait before they can be pulled (a slow site).
    """

    def __init__(self, nodes: Iterable[int], answer: Answer, late: dict[int, int] | None = None) -> None:
        super().__init__(nodes)
        self.answer, self.late = answer, late or {}
        self._waiting: dict[str, tuple[int, Message]] = {}

    def _reply(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        request = stamp(over_the_wire(stamp(msg)))  # the SuperLink gives the delivered message its id
        request.content = unpack(request.content)  # what a site's ClientApp does first
        answered = self.answer(node, request)
        if answered is None:
            return None
        if isinstance(answered, RecordDict):
            try:
                answered = pack(answered)  # as the real ClientApp sends it
            except Exception:  # noqa: BLE001 - a hostile site's arrays may not even pack: they travel as they are
                pass
        try:
            return stamp(over_the_wire(stamp(Message(answered, reply_to=request))))
        except Exception:  # noqa: BLE001 - what Flower cannot serialize never leaves the site: no reply
            return None

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            reply = self._reply(msg)
            ids.append(msg.metadata.message_id)
            if reply is not None:
                self._waiting[msg.metadata.message_id] = (self.late.get(msg.metadata.dst_node_id, 0), reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        ready = []
        for message_id in message_ids:
            if message_id not in self._waiting:
                continue
            wait, reply = self._waiting[message_id]
            if wait > 0:
                self._waiting[message_id] = (wait - 1, reply)
                continue
            ready.append(self._waiting.pop(message_id)[1])
        return ready

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        return self.pull_messages(ids)


def stack(grid: Grid, run: Path, nodes: dict[int, str]) -> ReceivingGrid:
    """The ServerApp's receiving stack over ``grid``: packing (server/packed_grid.py), then the timeline grid with
    the receiving boundary (server/receiving_grid.py, server/inbound.py) over the registered node -> site names."""
    return ReceivingGrid(PackedGrid(grid), MetricsLog(run), 0.0, Inbox(nodes, run))


def honest_answer(nodes: dict[int, str], dice: Callable[[int, int], float] | None = None) -> Answer:
    """Each node answers as an honest site of the tiny model (SHAPES): it trains by 0.1 and scores the model it
    received with ``dice(node, round)`` (0.5 by default) on 2 cases, as the real ClientApp's records do."""

    def answer(node: int, msg: Message) -> RecordDict:
        config = msg.content.config_records[keys.CONFIG]
        rnd = int(number(config, keys.SERVER_ROUND)) if keys.SERVER_ROUND in config else 0
        score = dice(node, rnd) if dice is not None else 0.5
        if msg.metadata.message_type == MessageType.EVALUATE:
            return content(nodes[node], {**EVAL_METRICS, "dice": score})
        received = from_wire(msg.content.array_records[keys.ARRAYS])
        arrays = ArrayRecord({k: Array(v.numpy() + np.float32(0.1)) for k, v in received.items()})
        body = content(nodes[node], {**TRAIN_METRICS, "t_delivered": time.time()}, arrays)
        if config.get(keys.EVALUATE_RECEIVED):
            body[keys.EVALUATION] = MetricRecord({**EVAL_METRICS, "dice": dice(node, rnd - 1) if dice else 0.5})
        return body

    return answer


def run_rounds(
    tmp_path,
    nodes: dict[int, str],
    answer: Answer,
    rounds: int,
    *overrides: str,
    late: dict[int, int] | None = None,
    strategy: FedSegStrategy | None = None,
) -> FedSegStrategy:
    """``rounds`` rounds of the real strategy over the real receiving stack; the sites answer with ``answer``."""
    strategy = strategy or real_strategy(tmp_path, *overrides, nodes=nodes, rounds=rounds)
    grid = stack(ScriptedGrid(nodes, answer, late), tmp_path, strategy.node_sites)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
        num_rounds=rounds - strategy.round_offset,
        timeout=0.0,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    return strategy

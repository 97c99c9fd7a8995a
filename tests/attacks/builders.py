"""Builders shared by the attack tests (tests/attacks/): replies a hostile site sends, the real strategy
that receives them, and a one-site federation of the real ClientApp.

Replies are real Flower Messages that went through Flower's wire representation
(tests/local_grid.py ``over_the_wire``); the strategy is the real one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from common import keys
from common.config import load_config
from common.metrics_log import MetricsLog, read_events
from common.wire import from_wire, pack, unpack
from server.checkpoints import Checkpoints
from server.inbound import Inbox
from server.packed_grid import PackedGrid
from server.strategy import FedSegStrategy
from server.receiving_grid import ReceivingGrid
from tests.flower_messages import reply as make_reply
from tests.local_grid import InProcessGrid, over_the_wire, stamp
from tests.tiny import tiny

SIGNATURE = "sig"
SHAPES = {"w": (4, 4), "b": (4,)}
GLOBAL = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
TRAIN_METRICS = {keys.NUM_EXAMPLES: 3, "loss": 1.0, "proximal_loss": 0.1, "duration_s": 2.0}
EVAL_METRICS = {"dice": 0.5, "loss": 0.4, keys.NUM_EXAMPLES: 2}


def content(site: str, metrics: dict, arrays: ArrayRecord | None = None) -> RecordDict:
    """A reply's records as site ``site`` would fill them."""
    body = RecordDict({keys.METRICS: MetricRecord(metrics),
                          keys.IDENTITY: ConfigRecord({keys.SITE: site, keys.SIGNATURE: SIGNATURE})})
    if arrays is not None:
        body[keys.ARRAYS] = arrays
    return body


def train_reply(node: int, site: str, step: float = 0.1, metrics: dict | None = None,
                arrays: ArrayRecord | None = None) -> Message:
    """Site ``site`` on node ``node`` moved every weight by ``step`` (or sends ``arrays``)."""
    arrays = arrays or ArrayRecord({k: Array(v + np.float32(step)) for k, v in GLOBAL.items()})
    return over_the_wire(make_reply(content(site, metrics or TRAIN_METRICS, arrays), node, MessageType.TRAIN))


def eval_reply(node: int, site: str, metrics: dict | None = None) -> Message:
    return over_the_wire(make_reply(content(site, metrics or EVAL_METRICS), node, MessageType.EVALUATE))


def strategy_for(tmp_path, *overrides: str, nodes: dict[int, str] | None = None) -> FedSegStrategy:
    """The real strategy, configured for round 1 (of one: it evaluates in its own step) from GLOBAL, with the
    registered node -> site names."""
    cfg = load_config(None, ["federation.run_name=attack", "federation.min_sites=1", "federation.rounds=1",
                             *overrides])
    strategy = FedSegStrategy(cfg, SIGNATURE, SHAPES, MetricsLog(tmp_path), Checkpoints(tmp_path / "ckpt"))
    strategy.node_sites.update(nodes or {})
    strategy.reference = {k: v.copy() for k, v in GLOBAL.items()}
    return strategy


def failures(tmp_path) -> dict[str, str]:
    return {e["site"]: e["reason"] for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "failure"}



ONE_SITE = tiny("train.local_steps=1", "federation.min_sites=1", "simulation.cpus_per_site=1")


def one_site(tmp_path, data_dir, *overrides: str, site_settings: dict | None = None):
    """A one-site federation of the real ClientApp; ``site_settings`` go into the site's own site.yaml."""
    import yaml

    from common.runs import SIM_SITES_DIR, run_dir, simulated_site_config
    from tests.local_grid import federation

    cfg = federation(load_config(None, [*ONE_SITE, f"federation.runs_dir={tmp_path}", "federation.run_name=e",
                                        *overrides]), {"site-1": data_dir})
    path = simulated_site_config(run_dir(cfg) / SIM_SITES_DIR, 0)
    body = yaml.safe_load(path.read_text())
    body["site"].pop("max_norm_travel", None)  # the simulation lets everything travel; a hospital's default applies here
    body["site"].update(site_settings or {})
    path.write_text(yaml.safe_dump(body))
    return cfg



def predict_run(tmp_path, in_channels: int = 1):
    """A run folder as the centre hands it out, and a site.yaml, for ``fedseg-client predict``."""
    import yaml
    from safetensors.torch import save_file

    from common.plan import ChannelNorm, Plan
    from server.server_app import initial_weights

    cfg = load_config(None, ["model.channels=[8, 16, 32]", "model.strides=[2, 2]",
                             f"model.in_channels={in_channels}", "model.out_channels=2"])
    run = tmp_path / f"run-{in_channels}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    Plan((1.0, 1.2, 2.0), (16, 16, 16), (ChannelNorm("zscore"),) * in_channels, (24, 20, 16)).save(run / "plan.json")
    save_file(initial_weights(cfg)[0], str(run / "checkpoints" / "best.safetensors"))
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"site": {"name": "h", "state_dir": str(tmp_path / "state")}}))
    return run, site



# --- the centre's receiving stack, as the ServerApp builds it, over a scripted SuperLink -----------------------

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
        rnd = int(config.get(keys.SERVER_ROUND, 0))
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


def tiny_strategy(tmp_path, nodes: dict[int, str], rounds: int, *overrides: str,
                  round_offset: int = 0) -> FedSegStrategy:
    """The real strategy for the tiny model (SHAPES), ``rounds`` rounds in all, with the registered names."""
    cfg = load_config(None, ["federation.run_name=attack", "federation.min_sites=1", f"federation.rounds={rounds}",
                             *overrides])
    strategy = FedSegStrategy(cfg, SIGNATURE, SHAPES, MetricsLog(tmp_path), Checkpoints(tmp_path / "ckpt"),
                              round_offset=round_offset)
    strategy.node_sites.update(nodes)
    return strategy


def run_rounds(tmp_path, nodes: dict[int, str], answer: Answer, rounds: int, *overrides: str,
               late: dict[int, int] | None = None, strategy: FedSegStrategy | None = None) -> FedSegStrategy:
    """``rounds`` rounds of the real strategy over the real receiving stack; the sites answer with ``answer``."""
    strategy = strategy or tiny_strategy(tmp_path, nodes, rounds, *overrides)
    grid = stack(ScriptedGrid(nodes, answer, late), tmp_path, strategy.node_sites)
    strategy.start(grid=grid, initial_arrays=ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                   num_rounds=rounds - strategy.round_offset, timeout=0.0, train_config=ConfigRecord(),
                   evaluate_config=ConfigRecord())
    return strategy


def events(tmp_path, kind: str | None = None) -> list[dict]:
    """The run's metrics-log events (of one kind)."""
    return [e for e in read_events(tmp_path / "metrics.jsonl") if kind is None or e["event"] == kind]

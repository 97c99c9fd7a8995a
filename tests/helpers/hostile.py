"""A small trained federation of five real sites, and the hostile replies a broken or malicious site sends.

``trained_round`` warms a five-site federation up for six rounds with the
real strategy and the real ClientApp (tests/helpers/local_grid.py), then runs one
more training round and keeps everything that round produced: the global
model it started from and the five honest replies as the server received
them. Tests then swap one reply for a hostile one and aggregate again, and
score any candidate global model with every site's own evaluation (each site
uses its own normalization tensors, as in a real round).

Six warm-up rounds bring mean Dice to about 0.88, where one honest round
moves it by about 0.01, as in most rounds of a real federation. After only
two, one round moves Dice by 0.14, and a site that merely goes missing
already changes it by more than 0.02: no aggregator could be judged there.

Building it takes about a minute and a half on two cores, so it is built once per test
session and shared by test_validation.py and test_robust.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client import client_app
from common import keys
from common.config import FedsegConfig, apply_overrides, from_dict, load_config
from common.dataset import read_dataset, split_cases
from common.metrics_log import MetricsLog
from common.records import number
from server.checkpoints import Checkpoints
from server.server_app import initial_weights
from server.strategy import FedSegStrategy
from server.validation import update_norm
from simulations.synthetic import generate_federation
from tests.helpers.local_grid import LocalGrid, federation, over_the_wire
from tests.helpers.tiny import tiny

N_SITES = 5
WARMUP_ROUNDS = 6
SPLIT_SEED = 6
"""The seed whose per-case split gives each of these 4-case sites 3 training and 1 validation case, the split
the robustness targets were measured with (the split now draws each case alone, so seed 0 gives site-3 two of
each)."""
SETTINGS = tiny(
    "model.num_res_units=2",
    "train.local_steps=15",
    "train.batch_size=2",
    "train.lr=0.003",
    f"federation.rounds={WARMUP_ROUNDS}",
    "federation.min_sites=3",
    "simulation.cpus_per_site=1",
    f"data.split_seed={SPLIT_SEED}",
)
"""Two residual units per block: the model the robustness targets (test_robust.py) were measured with."""


@dataclass
class TrainedRound:
    """One training round of five honest sites, ready to be replayed with other replies."""

    cfg: FedsegConfig
    grid: LocalGrid
    signature: str
    shapes: dict[str, tuple[int, ...]]
    server_round: int
    start: ArrayRecord
    """The global model the round started from."""
    honest: list[Message]
    """The five replies as the server received them."""
    run: Path

    def strategy(self, *overrides: str, name: str = "replay") -> FedSegStrategy:
        """A fresh strategy for this round (with ``section.key=value`` overrides), configured for training."""
        cfg = from_dict(apply_overrides(self.cfg.to_dict(), list(overrides)), "replay settings")
        out = self.run / name
        out.mkdir(parents=True, exist_ok=True)
        strategy = FedSegStrategy(cfg, self.signature, self.shapes, MetricsLog(out), Checkpoints(out / "ckpt"))
        strategy.configure_train(self.server_round, self.start, ConfigRecord(), self.grid)
        return strategy

    def aggregate(self, replies: list[Message], *overrides: str, name: str = "replay") -> ArrayRecord | None:
        strategy = self.strategy(*overrides, name=name)
        arrays, _ = strategy.aggregate_train(self.server_round, [over_the_wire(r) for r in replies])
        return arrays

    def dice(self, arrays: ArrayRecord) -> float:
        """Mean Dice over the five sites of a global model, each site with its own norm tensors."""
        strategy = self.strategy(name="score")
        messages = strategy.configure_evaluate(self.server_round, arrays, ConfigRecord(), self.grid)
        replies = self.grid.send_and_receive(messages)
        dice = [float(number(r.content.metric_records[keys.METRICS], "dice")) for r in replies if r.has_content()]
        assert len(dice) == N_SITES, [r.error.reason for r in replies if r.has_error()]
        return float(np.mean(dice))

    def norms(self) -> list[float]:
        reference = {k: v.numpy() for k, v in self.start.items()}
        return [update_norm(r.content.array_records[keys.ARRAYS], reference) for r in self.honest]


def site_name(reply: Message) -> str:
    return str(reply.content.config_records[keys.IDENTITY][keys.SITE])


def replace_arrays(reply: Message, arrays: dict[str, np.ndarray]) -> Message:
    """``reply`` with its model arrays replaced (everything else as the site sent it)."""
    content = RecordDict({name: record for name, record in reply.content.items()})
    content[keys.ARRAYS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content, reply_to=reply_request(reply))


def reply_request(reply: Message) -> Message:
    """A stand-in for the request ``reply`` answered, so a rebuilt reply keeps its sender."""
    from tests.helpers.envelopes import incoming

    return incoming(
        RecordDict(), reply.metadata.message_type, reply.metadata.src_node_id, int(reply.metadata.group_id or 1)
    )


def scaled_update(reply: Message, start: ArrayRecord, factor: float) -> Message:
    """The site's update w_k - w_global multiplied by ``factor`` (negative: pushed the other way)."""
    arrays = {
        k: start[k].numpy() + factor * (a.numpy().astype(np.float32) - start[k].numpy())
        for k, a in reply.content.array_records[keys.ARRAYS].items()
    }
    return replace_arrays(reply, arrays)


def nan_update(reply: Message) -> Message:
    arrays = {k: a.numpy().copy() for k, a in reply.content.array_records[keys.ARRAYS].items()}
    first = next(iter(arrays))
    arrays[first].flat[0] = np.nan
    return replace_arrays(reply, arrays)


def wrong_shape(reply: Message) -> Message:
    arrays = {k: a.numpy() for k, a in reply.content.array_records[keys.ARRAYS].items()}
    first = next(iter(arrays))
    arrays[first] = np.zeros((*arrays[first].shape[:-1], arrays[first].shape[-1] + 1), np.float32)
    return replace_arrays(reply, arrays)


def trained_round(root: Path) -> TrainedRound:
    """Warm up a five-site federation, then record one honest round (the session's ``hostile_round`` fixture)."""
    datasets = generate_federation(root / "data", n_sites=N_SITES, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)
    cfg = federation(
        load_config(None, [*SETTINGS, f"federation.runs_dir={root / 'runs'}", "federation.run_name=hostile"]), datasets
    )
    weights, signature = initial_weights(cfg)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    run = Path(cfg.federation.runs_dir) / cfg.federation.run_name
    grid = LocalGrid(cfg, client_app.app)
    warmup = FedSegStrategy(cfg, signature, shapes, MetricsLog(run), Checkpoints(run / "checkpoints"))
    result = warmup.start(
        grid=grid,
        initial_arrays=ArrayRecord(weights),
        num_rounds=WARMUP_ROUNDS,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    server_round = WARMUP_ROUNDS + 1
    replay = FedSegStrategy(cfg, signature, shapes, MetricsLog(run / "honest"), Checkpoints(run / "honest"))
    honest = grid.send_and_receive(replay.configure_train(server_round, result.arrays, ConfigRecord(), grid))
    assert all(r.has_content() for r in honest), [r.error.reason for r in honest if r.has_error()]
    splits = [
        len(split_cases([c.case_id for c in read_dataset(d).cases], cfg.data.val_fraction, SPLIT_SEED)[1])
        for d in datasets.values()
    ]
    assert splits == [1] * N_SITES, f"the measured setting has one validation case per site, not {splits}"
    honest = sorted(honest, key=site_name)  # the last one (site-5) plays the hostile site in every test
    return TrainedRound(cfg, grid, signature, shapes, server_round, result.arrays, honest, run)

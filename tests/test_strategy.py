"""The server strategy with real Flower Messages: weighted mean, screening and the quorum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, MessageType, MetricRecord, RecordDict

from common import keys
from common.config import load_config
from common.files import read_jsonl
from common.metrics_log import MetricsLog, read_events
from server.checkpoints import Checkpoints
from server.strategy import FedSegStrategy, QuorumNotReached
from tests.flower_messages import reply

SIGNATURE = "abc123"
SHAPES = {"w": (2, 2), "b": (2,)}


def make_strategy(tmp_path, *overrides: str) -> FedSegStrategy:
    cfg = load_config(None, ["federation.run_name=t", *overrides])
    return FedSegStrategy(cfg, SIGNATURE, SHAPES, MetricsLog(tmp_path), Checkpoints(tmp_path / "ckpt"))


def train_reply(node: int, site: str, value: float, n: int, **changes) -> object:
    arrays = {"w": torch.full((2, 2), value), "b": torch.full((2,), value)}
    arrays.update(changes.pop("arrays", {}))
    metrics = {keys.NUM_EXAMPLES: n, "loss": 1.0, "proximal_loss": 0.1, "duration_s": 2.0}
    identity = {keys.SITE: site, keys.SIGNATURE: changes.pop("signature", SIGNATURE)}
    content = RecordDict({keys.ARRAYS: ArrayRecord(arrays), keys.METRICS: MetricRecord(metrics),
                          keys.IDENTITY: ConfigRecord(identity)})
    return reply(content, node, MessageType.TRAIN)


def test_weighted_mean_of_sound_replies_only(tmp_path):
    strategy = make_strategy(tmp_path)
    replies = [
        train_reply(11, "a", 1.0, 1),
        train_reply(12, "b", 4.0, 3),
        train_reply(13, "nan", 0.0, 5, arrays={"w": torch.full((2, 2), float("nan"))}),
        train_reply(14, "shape", 0.0, 5, arrays={"w": torch.zeros(3, 3)}),
        train_reply(15, "extra", 0.0, 5, arrays={"image_patch": torch.zeros(4, 4)}),
        train_reply(16, "other-model", 0.0, 5, signature="zzz"),
        reply(Error(1001, "site x: local training diverged"), 17, MessageType.TRAIN),
        reply(Error(1001, "unexplained"), 18, MessageType.TRAIN),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    mean = arrays["w"].numpy()
    assert np.allclose(mean, (1.0 * 1 + 4.0 * 3) / 4)
    events = list(read_events(tmp_path / "metrics.jsonl"))
    failed = {e["site"]: e["reason"] for e in events if e["event"] == "failure"}
    assert set(failed) == {"nan", "shape", "extra", "other-model", "x", "node-18"}
    assert "NaN" in failed["nan"] and "shape" in failed["shape"]
    trained = [e for e in events if e["event"] == "train"]
    assert {e["site"] for e in trained} == {"a", "b"}
    assert (tmp_path / "ckpt" / "round-0001.safetensors").is_file()


def test_below_quorum_skips_the_round_and_keeps_the_model(tmp_path):
    strategy = make_strategy(tmp_path, "federation.min_sites=2")
    arrays, metrics = strategy.aggregate_train(1, [train_reply(11, "a", 1.0, 1)])
    assert arrays is None and metrics is None
    events = list(read_jsonl(tmp_path / "metrics.jsonl"))
    assert any(e["event"] == "quorum-failure" and e["sites_ok"] == 1 for e in events)
    assert not (tmp_path / "ckpt" / "round-0001.safetensors").exists()


def test_below_quorum_can_stop_the_run(tmp_path):
    strategy = make_strategy(tmp_path, "federation.min_sites=2", "federation.on_quorum_failure=stop")
    with pytest.raises(QuorumNotReached, match="quorum is 2"):
        strategy.aggregate_train(1, [train_reply(11, "a", 1.0, 1)])


def test_float16_replies_are_averaged_in_float32(tmp_path):
    strategy = make_strategy(tmp_path)
    half = {"w": torch.full((2, 2), 1.0).half(), "b": torch.full((2,), 1.0).half()}
    arrays, _ = strategy.aggregate_train(1, [train_reply(11, "a", 0, 1, arrays=half), train_reply(12, "b", 2.0, 1)])
    assert arrays["w"].numpy().dtype == np.float32
    assert np.allclose(arrays["w"].numpy(), 1.5)


def test_evaluate_events_carry_dice_per_annotator_when_a_site_has_several(tmp_path):
    strategy = make_strategy(tmp_path)
    common = {keys.NUM_EXAMPLES: 2, "dice": 0.8, "loss": 0.3, f"{keys.DICE_CLASS_PREFIX}1": 0.8}
    annotated = {**common, "dice_fusion": 0.8, "dice_annotator_1": 0.75, "dice_annotator_2": 0.7}
    for node, site, metrics in ((21, "many", annotated), (22, "single", common)):
        content = RecordDict({keys.METRICS: MetricRecord(metrics), keys.IDENTITY: ConfigRecord({keys.SITE: site, keys.SIGNATURE: SIGNATURE})})
        strategy.aggregate_evaluate(1, [reply(content, node, MessageType.EVALUATE)])
    events = {e["site"]: e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "evaluate"}
    assert events["many"]["dice_fusion"] == 0.8 and events["many"]["dice_per_annotator"] == [0.75, 0.7]
    assert "dice_per_annotator" not in events["single"]

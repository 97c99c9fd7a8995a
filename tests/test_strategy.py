"""The server strategy with real Flower Messages: weighted mean, screening and the quorum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict

from common import keys
from common.config import load_config
from common.files import read_jsonl
from common.metrics_log import MetricsLog, read_events
from server.checkpoints import Checkpoints
from server.round_mean import QuorumNotReached
from server.strategy import FedSegStrategy
from tests.helpers import messages
from tests.helpers.envelopes import incoming, reply
from tests.helpers.local_grid import LocalGrid

SIGNATURE = "abc123"
SHAPES = {"w": (2, 2), "b": (2,)}


def make_strategy(tmp_path, *overrides: str) -> FedSegStrategy:
    cfg = load_config(None, ["federation.run_name=t", *overrides])
    return FedSegStrategy(cfg, SIGNATURE, SHAPES, MetricsLog(tmp_path), Checkpoints(tmp_path / "ckpt"))


def train_reply(
    node: int,
    site: str,
    value: float,
    n: int,
    arrays: dict | None = None,
    signature: str = SIGNATURE,
    evaluation: dict | None = None,
) -> Message:
    """Site ``site`` sends weights all equal to ``value`` (or ``arrays`` in their place), claiming ``n`` cases."""
    weights = {"w": torch.full((2, 2), value), "b": torch.full((2,), value), **(arrays or {})}
    return messages.train_reply(
        node, site, arrays=ArrayRecord(weights), n=n, signature=signature, evaluation=evaluation
    )


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


def test_a_site_that_never_answers_is_named_as_failed(tmp_path):
    """Flower hands over only the replies that came before the deadline; the silent site is still a failure."""
    strategy = make_strategy(tmp_path, "federation.round_timeout_s=30")
    strategy.node_sites.update({11: "a", 12: "b", 13: "c"})
    strategy.screen.outgoing = [incoming(RecordDict(), MessageType.TRAIN, node) for node in (11, 12, 13)]
    arrays, _ = strategy.aggregate_train(1, [train_reply(11, "a", 1.0, 1), train_reply(12, "b", 3.0, 1)])
    assert np.allclose(arrays["w"].numpy(), 2.0)
    failures = [e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "failure"]
    assert [(e["site"], e["stage"]) for e in failures] == [("c", "train")]
    assert failures[0]["reason"].startswith("no reply within federation.round_timeout_s (30 s)")
    assert strategy.recorder.tally(1).failed == ["c"]


def test_float16_replies_are_averaged_in_float32(tmp_path):
    strategy = make_strategy(tmp_path)
    half = {"w": torch.full((2, 2), 1.0).half(), "b": torch.full((2,), 1.0).half()}
    arrays, _ = strategy.aggregate_train(1, [train_reply(11, "a", 0, 1, arrays=half), train_reply(12, "b", 2.0, 1)])
    assert arrays["w"].numpy().dtype == np.float32
    assert np.allclose(arrays["w"].numpy(), 1.5)


def test_evaluate_events_carry_dice_per_annotator_when_a_site_has_several(tmp_path):
    strategy = make_strategy(tmp_path, "federation.rounds=1")  # the last round evaluates in its own step
    common = {keys.NUM_EXAMPLES: 2, "dice": 0.8, "loss": 0.3, f"{keys.DICE_CLASS_PREFIX}1": 0.8}
    annotated = {**common, "dice_fusion": 0.8, "dice_annotator_1": 0.75, "dice_annotator_2": 0.7}
    for node, site, metrics in ((21, "many", annotated), (22, "single", common)):
        content = messages.content(site, metrics, signature=SIGNATURE)
        strategy.aggregate_evaluate(1, [reply(content, node, MessageType.EVALUATE)])
    events = {e["site"]: e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "evaluate"}
    assert events["many"]["dice_fusion"] == 0.8 and events["many"]["dice_per_annotator"] == [0.75, 0.7]
    assert "dice_per_annotator" not in events["single"]


def test_a_round_is_evaluated_and_closed_with_the_next_rounds_training(tmp_path):
    """Round 1's Dice comes in round 2's training replies; a bad evaluation costs the evaluation only."""
    strategy = make_strategy(tmp_path, "federation.rounds=3")
    assert strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid=None) == []  # no message of its own
    strategy.aggregate_train(1, [train_reply(11, "a", 1.0, 1), train_reply(12, "b", 2.0, 1)])
    assert strategy.aggregate_evaluate(1, []) is None
    assert not [e for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "round"]

    def evaluation(dice: float) -> dict:
        return {keys.NUM_EXAMPLES: 2, "dice": dice, "loss": 0.3}

    strategy.aggregate_train(
        2,
        [
            train_reply(11, "a", 1.0, 1, evaluation=evaluation(0.6)),
            train_reply(12, "b", 2.0, 1, evaluation=evaluation(1.7)),  # not a Dice: its update still counts
            reply(Error(1001, "site c: local training diverged"), 13, MessageType.TRAIN),
        ],
    )
    events = list(read_events(tmp_path / "metrics.jsonl"))
    round_1 = [e for e in events if e["event"] == "round" and e["round"] == 1]
    assert len(round_1) == 1 and round_1[0]["dice_mean"] == pytest.approx(0.6) and round_1[0]["sites_ok"] == 2
    assert round_1[0]["sites_failed"] == ["b"]
    failures = {(e["round"], e["site"], e["stage"]) for e in events if e["event"] == "failure"}
    assert failures == {(1, "b", "evaluate"), (2, "c", "train")}
    assert {e["site"] for e in events if e["event"] == "train" and e["round"] == 2} == {"a", "b"}
    assert [e["event"] for e in events].index("round") < max(i for i, e in enumerate(events) if e["event"] == "train")
    assert strategy.recorder.checkpoints.state.best_round == 1
    assert strategy.recorder.checkpoints.state.best_dice == pytest.approx(0.6)


@pytest.mark.parametrize("optimizer, expected", [("momentum", 2.5), ("none", 2.0)])
def test_the_default_server_momentum_adds_half_the_previous_move(tmp_path, optimizer, expected):
    """Round 1 moves by its mean update (0 -> 1); round 2's sites move 1 -> 2 and the model goes on by
    half of round 1's move as well, unless the server averages plainly."""
    strategy = make_strategy(tmp_path, f"federation.server_optimizer={optimizer}", "federation.sites=[a, b]")
    grid = LocalGrid(strategy.cfg, app=None)
    model = ArrayRecord({"w": torch.zeros(2, 2), "b": torch.zeros(2)})
    for rnd, value in ((1, 1.0), (2, 2.0)):
        strategy.configure_train(rnd, model, ConfigRecord(), grid)
        model, _ = strategy.aggregate_train(rnd, [train_reply(11, "a", value, 1), train_reply(12, "b", value, 3)])
    assert np.allclose(model["w"].numpy(), expected) and np.allclose(model["b"].numpy(), expected)
    assert model["w"].numpy().dtype == np.float32


def test_a_resumed_run_continues_with_the_saved_momentum(tmp_path):
    """A server restarted after round 2 takes round 3 exactly as an uninterrupted one would."""
    overrides = ("federation.server_optimizer=momentum", "federation.sites=[a, b]")

    def rounds(strategy: FedSegStrategy, model: ArrayRecord, values: list[float]) -> ArrayRecord:
        grid = LocalGrid(strategy.cfg, app=None)
        for server_round, value in enumerate(values, start=1):
            strategy.configure_train(server_round, model, ConfigRecord(), grid)
            aggregated, _ = strategy.aggregate_train(
                server_round, [train_reply(11, "a", value, 1), train_reply(12, "b", value + 1, 1)]
            )
            assert aggregated is not None
            model = aggregated
        return model

    start = ArrayRecord({"w": torch.zeros(2, 2), "b": torch.zeros(2)})
    straight = rounds(make_strategy(tmp_path / "straight", *overrides), start, [1.0, 2.0, 4.0])
    first = make_strategy(tmp_path / "crash", *overrides)
    after_two = rounds(first, start, [1.0, 2.0])
    assert (tmp_path / "crash" / "ckpt" / "server-optimizer-0002.safetensors").is_file()

    def restarted(resume: bool) -> np.ndarray:
        strategy = FedSegStrategy(
            first.cfg,
            SIGNATURE,
            SHAPES,
            MetricsLog(tmp_path / "crash"),
            Checkpoints(tmp_path / "crash" / "ckpt"),
            round_offset=2,
        )
        if resume:
            strategy.release.resume(2)
        return rounds(strategy, after_two, [4.0])["w"].numpy()

    assert np.allclose(restarted(resume=True), straight["w"].numpy())
    from_zero = restarted(resume=False)
    assert not np.allclose(from_zero, straight["w"].numpy()), "the saved moments matter"

    # damaged or foreign moments cost the momentum, never the run
    saved = tmp_path / "crash" / "ckpt" / "server-optimizer-0002.safetensors"
    good = saved.read_bytes()
    Checkpoints(tmp_path / "crash" / "ckpt").save_optimizer(2, {"momentum/w": np.zeros((3, 3), np.float32)})
    assert np.allclose(restarted(resume=True), from_zero)
    saved.write_bytes(good[: len(good) // 2])
    assert np.allclose(restarted(resume=True), from_zero)

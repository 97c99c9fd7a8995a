"""Attacks by a hostile site: a registered hospital that runs modified code and sends whatever it likes.

Each test goes through the real code path: replies built as real Flower Messages
(over Flower's wire format) and handed to the real strategy or planner, or the
real ClientApp's replies tampered with after they left the site
(tests/local_grid.py). Regressions of issue 11 keep their finding numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from common import keys
from common.config import load_config
from common.metrics_log import MetricsLog, read_events
from server.checkpoints import Checkpoints
from server.strategy import FedSegStrategy
from tests.attacks.builders import (
    EVAL_METRICS,
    GLOBAL,
    SHAPES,
    SIGNATURE,
    TRAIN_METRICS,
    eval_reply,
    failures,
    strategy_for,
    train_reply,
)
from tests.local_grid import over_the_wire


# --- finding 2: one registered site's malformed reply must never end the run ---------------------------------


def _declared_shape_lie() -> ArrayRecord:
    """An Array whose header says (4, 4) while its bytes hold 5 x 5 values."""
    arrays = ArrayRecord({k: Array(v + np.float32(0.1)) for k, v in GLOBAL.items()})
    real = Array(np.zeros((5, 5), np.float32))
    arrays["w"] = Array(dtype=real.dtype, shape=(4, 4), stype=real.stype, data=real.data)
    return arrays


def test_finding_2_malformed_replies_are_left_out_and_logged(tmp_path):
    strategy = strategy_for(tmp_path)
    replies = [
        train_reply(1, "honest", 0.1),
        train_reply(2, "list-count", metrics={**TRAIN_METRICS, keys.NUM_EXAMPLES: [5.0]}),
        train_reply(3, "list-loss", metrics={**TRAIN_METRICS, "loss": [1.0, 2.0]}),
        train_reply(4, "shape-lie", arrays=_declared_shape_lie()),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), GLOBAL["w"] + 0.1)
    assert metrics["loss"] == 1.0
    assert set(failures(tmp_path)) == {"list-count", "list-loss", "shape-lie"}
    evaluated = strategy.aggregate_evaluate(1, [eval_reply(1, "honest"),
                                                eval_reply(2, "list-count", {**EVAL_METRICS, "hd95": [1.0]})])
    assert evaluated["dice_mean"] == 0.5


def test_finding_2_a_packed_reply_whose_layout_lies_is_left_out(tmp_path):
    """A site's reply arrives packed (common/wire.py); a layout that misstates the sizes never reaches aggregation."""
    from common.wire import pack
    from server.packed_grid import unpacked

    lying = train_reply(2, "layout-lie")
    lying.content = pack(lying.content)
    lying.content[keys.LAYOUT]["shapes"] = [4, 3, 5]  # 12 + 5 values claimed, 16 + 4 sent
    honest = train_reply(1, "honest", 0.1)
    honest.content = pack(honest.content)
    replies = [unpacked(over_the_wire(r)) for r in (honest, lying)]
    assert keys.LAYOUT not in replies[0].content and keys.LAYOUT in replies[1].content
    strategy = strategy_for(tmp_path)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), GLOBAL["w"] + 0.1)
    assert set(failures(tmp_path)) == {"layout-lie"}


def test_finding_2_planning_leaves_out_a_malformed_or_odd_site(tmp_path, tiny_federation):
    from client.client_app import app
    from server.planning import plan_federation
    from tests.local_grid import LocalGrid, federation

    def tamper(node: int, reply: Message) -> Message:
        if node == 1:  # a CT flag that is not a list
            reply.content[keys.FINGERPRINT][f"{keys.FINGERPRINT_PREFIX}ct"] = 1.0
        if node == 2:  # a site with two channels
            reply.content[keys.FINGERPRINT][f"{keys.FINGERPRINT_PREFIX}channels"] = 2
        return reply

    cfg = federation(load_config(None, ["model.channels=[8, 16, 32]", "model.strides=[2, 2]",
                                        f"federation.runs_dir={tmp_path / 'runs'}", "federation.run_name=p",
                                        "federation.min_sites=1"]), tiny_federation)
    metrics_log = MetricsLog(tmp_path)
    plan = plan_federation(LocalGrid(cfg, app, tamper), cfg, tmp_path / "runs" / "p", metrics_log)
    metrics_log.close()
    assert plan.provenance["sites"] == ["site-3"]
    assert set(failures(tmp_path)) == {"site-1", "site-2"}


# --- finding 3: a fingerprint cannot poison the plan ----------------------------------------------------------


def test_finding_3_plan_poisoning_is_bounded(tmp_path, tiny_federation):
    from client.client_app import app
    from server.planning import plan_federation
    from tests.local_grid import LocalGrid, federation

    def poison(node: int, reply: Message) -> Message:
        if node == 3:  # a billion cases at 0.05 mm
            record = reply.content[keys.FINGERPRINT]
            record[f"{keys.FINGERPRINT_PREFIX}cases"] = 10**9
            for axis in ("x", "y", "z"):
                record[f"{keys.FINGERPRINT_PREFIX}spacing_{axis}"] = [0.05] * 7
        return reply

    def plan_with(tamper, name: str):
        cfg = federation(load_config(None, ["model.channels=[8, 16, 32]", "model.strides=[2, 2]",
                                            f"federation.runs_dir={tmp_path / 'runs'}",
                                            f"federation.run_name={name}"]), tiny_federation)
        return plan_federation(LocalGrid(cfg, app, tamper), cfg, tmp_path / "runs" / name, MetricsLog(tmp_path))

    honest = plan_with(None, "honest")
    claims = plan_with(poison, "billion")
    assert failures(tmp_path)["site-3"].startswith("fingerprint of site site-3: 'fp_cases'")
    assert claims.provenance["sites"] == ["site-1", "site-2"]
    assert min(claims.target_spacing) >= min(honest.target_spacing)

    def tiny_spacing(node: int, reply: Message) -> Message:
        if node == 3:  # a plausible count, an absurd spacing
            for axis in ("x", "y", "z"):
                reply.content[keys.FINGERPRINT][f"{keys.FINGERPRINT_PREFIX}spacing_{axis}"] = [0.011] * 7
        return reply

    poisoned = plan_with(tiny_spacing, "tiny-spacing")
    voxels = np.prod(np.asarray(poisoned.median_shape, float))
    assert voxels <= 4 * np.prod(np.asarray(honest.median_shape, float)), (poisoned, honest)



# --- finding 5: a site's name comes from its registered key, never from its reply -----------------------------


def test_finding_5_a_site_cannot_speak_for_another(tmp_path):
    strategy = strategy_for(tmp_path, nodes={1: "hospital-a", 2: "hospital-b"})
    replies = [train_reply(1, "hospital-a", 0.1), train_reply(2, "hospital-a", 0.3)]
    strategy.aggregate_train(1, replies)
    events = list(read_events(tmp_path / "metrics.jsonl"))
    assert [e["site"] for e in events if e["event"] == "train"] == ["hospital-a"]
    assert "claims to be site 'hospital-a'" in failures(tmp_path)["hospital-b"]
    assert strategy.node_sites == {1: "hospital-a", 2: "hospital-b"}


# --- finding 6: aggregation integrity ---------------------------------------------------------------------------


def test_finding_6_best_model_tiny_updates_and_float32_overflow(tmp_path):
    strategy = strategy_for(tmp_path, "federation.min_sites=1")
    strategy.aggregate_train(1, [train_reply(1, "a", 0.1), train_reply(2, "b", 0.2)])
    strategy.aggregate_evaluate(1, [eval_reply(1, "a"), eval_reply(2, "b", {**EVAL_METRICS, "dice": 1e6})])
    assert strategy.recorder.checkpoints.state.best_dice == 0.5
    assert "outside a Dice value's range" in failures(tmp_path)["b"]

    two = strategy_for(tmp_path / "two")
    arrays, _ = two.aggregate_train(1, [train_reply(1, "honest", 0.1), train_reply(2, "tiny", 1e-6)])
    assert "honest" not in failures(tmp_path / "two") and arrays is not None

    zero = strategy_for(tmp_path / "zero")
    zero.aggregate_train(1, [train_reply(1, "honest", 0.1), train_reply(2, "almost-zero", 1e-30)])
    assert "zero to float32 precision" in failures(tmp_path / "zero")["almost-zero"]

    huge = ArrayRecord({"w": Array(np.full((4, 4), 1e300)), "b": Array(np.ones(4, np.float32))})
    unbounded = strategy_for(tmp_path / "f64", "federation.norm_bound=0")
    arrays, _ = unbounded.aggregate_train(1, [train_reply(1, "honest", 0.1), train_reply(2, "f64", arrays=huge)])
    assert np.isfinite(arrays["w"].numpy()).all()
    assert "f64" in failures(tmp_path / "f64")
    assert torch.isfinite(torch.as_tensor(arrays["w"].numpy())).all()



# --- finding 8: DP with a fixed denominator, an honest budget on resume, checked by an independent accountant ---


def test_finding_8_dp_sensitivity_resume_and_epsilon(tmp_path):
    import dataclasses

    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant

    from server.dp import PrivacyResumeRefused, gaussian_epsilon, with_privacy
    from tests.local_grid import LocalGrid

    def wrapper(run, z: float, offset: int = 0):
        cfg = load_config(None, ["federation.run_name=dp", "federation.min_sites=1", f"privacy.noise_multiplier={z:.12f}",
                                 "privacy.clipping_norm=1.0"])
        cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, sites=["a", "b", "c"]))
        log = MetricsLog(run)
        inner = FedSegStrategy(cfg, SIGNATURE, SHAPES, log, Checkpoints(run / "ckpt"), round_offset=offset)
        return with_privacy(inner, cfg.privacy, log), LocalGrid(cfg, app=None), log

    # Two of three listed sites reply: the released mean still divides by three (a missing site is a zero update).
    dp, grid, log = wrapper(tmp_path / "run", 1e-9)
    start = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    dp.configure_train(1, start, ConfigRecord(), grid)
    arrays, _ = dp.aggregate_train(1, [train_reply(1, "a", 0.01), train_reply(2, "b", 0.01)])
    assert np.allclose(arrays["b"].numpy(), 2 * 0.01 / 3, atol=1e-6)
    (privacy,) = [e for e in read_events(tmp_path / "run" / "metrics.jsonl") if e["event"] == "privacy"]
    assert privacy["denominator"] == 3 and privacy["noise_std"] == pytest.approx(1e-9 / 3)
    log.close()

    # Resuming after that round with another noise multiplier would count its release at the wrong noise.
    with pytest.raises(PrivacyResumeRefused, match="noise_multiplier"):
        wrapper(tmp_path / "run", 0.5, offset=1)

    # The accountant agrees with Google's dp-accounting PLD accountant.
    for z, rounds in ((1.0, 4), (0.8, 10)):
        pld = PLDAccountant()
        pld.compose(SelfComposedDpEvent(GaussianDpEvent(z), rounds))
        assert gaussian_epsilon(z, rounds, 1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)


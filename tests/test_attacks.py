"""Attacks from the security review (issue 11), one test per finding, each on the real code path.

Validation, aggregation and planning attacks are replies a hostile site would
send, built as real Flower Messages and handed to the real strategy or
planner (the ClientApp's replies travel through Flower's wire format in
tests/local_grid.py). Wire attacks run against real processes on 127.0.0.1;
disk attacks against real NIfTI files.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import keys
from common.config import load_config
from common.metrics_log import MetricsLog, read_events
from server.checkpoints import Checkpoints
from server.strategy import FedSegStrategy
from tests.flower_messages import reply as make_reply
from tests.local_grid import over_the_wire

SIGNATURE = "sig"
SHAPES = {"w": (4, 4), "b": (4,)}
GLOBAL = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
TRAIN_METRICS = {keys.NUM_EXAMPLES: 3, "loss": 1.0, "proximal_loss": 0.1, "duration_s": 2.0}
EVAL_METRICS = {"dice": 0.5, "loss": 0.4, keys.NUM_EXAMPLES: 2}


def _content(site: str, metrics: dict, arrays: ArrayRecord | None = None) -> RecordDict:
    content = RecordDict({keys.METRICS: MetricRecord(metrics),
                          keys.IDENTITY: ConfigRecord({keys.SITE: site, keys.SIGNATURE: SIGNATURE})})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return content


def train_reply(node: int, site: str, step: float = 0.1, metrics: dict | None = None,
                arrays: ArrayRecord | None = None) -> Message:
    """Site ``site`` on node ``node`` moved every weight by ``step`` (or sends ``arrays``)."""
    arrays = arrays or ArrayRecord({k: Array(v + np.float32(step)) for k, v in GLOBAL.items()})
    return over_the_wire(make_reply(_content(site, metrics or TRAIN_METRICS, arrays), node, MessageType.TRAIN))


def eval_reply(node: int, site: str, metrics: dict | None = None) -> Message:
    return over_the_wire(make_reply(_content(site, metrics or EVAL_METRICS), node, MessageType.EVALUATE))


def strategy_for(tmp_path, *overrides: str, nodes: dict[int, str] | None = None) -> FedSegStrategy:
    """The real strategy, configured for round 1 from GLOBAL, with the registered node -> site names."""
    cfg = load_config(None, ["federation.run_name=attack", "federation.min_sites=1", *overrides])
    strategy = FedSegStrategy(cfg, SIGNATURE, SHAPES, MetricsLog(tmp_path), Checkpoints(tmp_path / "ckpt"))
    strategy.node_sites.update(nodes or {})
    strategy.tally.reference = {k: v.copy() for k, v in GLOBAL.items()}
    return strategy


def failures(tmp_path) -> dict[str, str]:
    return {e["site"]: e["reason"] for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "failure"}


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


def test_finding_3_a_received_plan_is_bounded_and_old_caches_go(tmp_path):
    from client.site_state import SiteState
    from common.plan import Plan, PlanError

    plan = Plan((1.0, 1.0, 1.0), (16, 16, 16), (), (32, 32, 32))
    hostile = Plan((0.001, 0.001, 0.001), (16, 16, 16), (), (32, 32, 32))
    with pytest.raises(PlanError, match="outside"):
        Plan.from_json(hostile.to_json())
    state = SiteState(tmp_path / "state")
    for version in ("0123456789ab", plan.version):
        (state.cache_dir / f"plan-{version}" / "case").mkdir(parents=True)
    (state.cache_dir / "keep-me").mkdir()
    assert state.prune_cache(plan.version) == ["plan-0123456789ab"]
    assert sorted(p.name for p in state.cache_dir.iterdir()) == ["keep-me", f"plan-{plan.version}"]


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
    assert strategy.checkpoints.state.best_dice == 0.5
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


# --- findings 9 and 10: the egress guard, per reply type, with the site's own bound -----------------------------

TINY = ["model.channels=[8, 16, 32]", "model.strides=[2, 2]", "data.patch_size=[16, 16, 16]",
        "train.local_steps=1", "train.batch_size=1", "train.hd95=false", "federation.min_sites=1",
        "simulation.cpus_per_site=1"]


def one_site(tmp_path, data_dir, *overrides: str, site_settings: dict | None = None):
    """A one-site federation of the real ClientApp; ``site_settings`` go into the site's own site.yaml."""
    import yaml

    from common.runs import run_dir, simulated_site_config
    from tests.local_grid import federation

    cfg = federation(load_config(None, [*TINY, f"federation.runs_dir={tmp_path}", "federation.run_name=e",
                                        *overrides]), {"site-1": data_dir})
    path = simulated_site_config(run_dir(cfg), 0)
    body = yaml.safe_load(path.read_text())
    body["site"].update(site_settings or {})
    path.write_text(yaml.safe_dump(body))
    return cfg


def test_finding_9_each_reply_type_holds_exactly_its_keys_and_failures_end_in_a_fixed_reason(
        tmp_path, tiny_federation):
    from flwr.app import Error

    from client import client_app, egress
    from server.server_app import initial_weights
    from tests.flower_messages import incoming
    from tests.local_grid import LocalGrid

    cfg = one_site(tmp_path, tiny_federation["site-1"])
    site = client_app.Site.resolve(LocalGrid(cfg, client_app.app).context(1))
    weights, _ = initial_weights(cfg)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()})
    identity = ConfigRecord({keys.SITE: "site-1", keys.SIGNATURE: site.signature})

    def sent(message_type: str, content) -> Message:
        request = incoming(RecordDict(), message_type, node_id=1)
        return egress.guard(Message(content, reply_to=request), request, site)

    blocked = f"site site-1: {egress.BLOCKED_REASON}"
    train_with_fp = RecordDict({keys.ARRAYS: arrays, keys.IDENTITY: identity,
                                keys.METRICS: MetricRecord({**TRAIN_METRICS, "fp_extent_x": [41.0, 42.0]})})
    assert sent(MessageType.TRAIN, train_with_fp).error.reason == blocked
    eval_with_arrays = RecordDict({keys.ARRAYS: arrays, keys.IDENTITY: identity,
                                   keys.METRICS: MetricRecord(EVAL_METRICS)})
    assert sent(MessageType.EVALUATE, eval_with_arrays).error.reason == blocked
    named = Error(code=1001, reason="site site-1: patient Jane Doe of ward B has no lesion")
    assert sent(MessageType.EVALUATE, named).error.reason == blocked
    honest = RecordDict({keys.IDENTITY: identity, keys.METRICS: MetricRecord(EVAL_METRICS)})
    assert sent(MessageType.EVALUATE, honest).has_content()

    audit = site.state.root / egress.EGRESS_FILE
    audit.unlink()
    audit.mkdir()  # the audit write now fails (as on a full or read-only disk)
    reply = sent(MessageType.EVALUATE, honest)
    assert reply.error.reason == blocked and str(site.state.root) not in reply.error.reason


def test_finding_10_the_site_bounds_what_travels_whatever_the_centre_asks(tmp_path, tiny_federation):
    from client import client_app, egress
    from server.server_app import initial_weights
    from tests.local_grid import LocalGrid

    def one_round(name: str, site_settings: dict) -> tuple[Message, list[dict]]:
        cfg = one_site(tmp_path / name, tiny_federation["site-1"], "model.norm=batch", "train.norm_mode=shared",
                       site_settings=site_settings)
        weights, signature = initial_weights(cfg)
        run = tmp_path / name
        strategy = FedSegStrategy(cfg, signature, {k: tuple(v.shape) for k, v in weights.items()},
                                  MetricsLog(run), Checkpoints(run / "ckpt"))
        grid = LocalGrid(cfg, client_app.app)
        (received,) = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(weights), ConfigRecord(), grid))
        return received, egress.EgressLog(tmp_path / name / "e" / "sites" / "site-1").entries()

    received, audit = one_round("default", {})
    assert received.has_error() and received.error.reason == f"site site-1: {egress.BLOCKED_REASON}"
    assert any("running_mean" in p and "max_norm_travel" in p for p in audit[0]["blocked"])
    allowed, _ = one_round("opted-in", {"max_norm_travel": "shared"})
    assert allowed.has_content() and any(k.endswith("running_mean") for k in allowed.content[keys.ARRAYS])

"""Attacks by a hostile site: a registered hospital that runs modified code and sends whatever it likes.

Each test goes through the real code path: replies built as real Flower Messages
(over Flower's wire format) and handed to the real strategy or planner, or the
real ClientApp's replies tampered with after they left the site
(tests/helpers/local_grid.py). Each test names the finding it is a regression of
(issue 11 and the review) in its docstring.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import keys
from common.config import load_config
from common.metrics_log import MetricsLog, read_events
from server.checkpoints import Checkpoints
from server.strategy import FedSegStrategy
from tests.helpers.messages import (
    EVAL_METRICS,
    GLOBAL,
    SHAPES,
    SIGNATURE,
    TRAIN_METRICS,
    eval_reply,
    failures,
    real_strategy,
    train_reply,
)

# --- finding 2: one registered site's malformed reply must never end the run ---------------------------------


def _declared_shape_lie() -> ArrayRecord:
    """An Array whose header says (4, 4) while its bytes hold 5 x 5 values."""
    arrays = ArrayRecord({k: Array(v + np.float32(0.1)) for k, v in GLOBAL.items()})
    real = Array(np.zeros((5, 5), np.float32))
    arrays["w"] = Array(dtype=real.dtype, shape=(4, 4), stype=real.stype, data=real.data)
    return arrays


def test_malformed_replies_are_left_out_and_logged(tmp_path):
    """Regression of finding 2."""
    strategy = real_strategy(tmp_path)
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
    evaluated = strategy.aggregate_evaluate(
        1, [eval_reply(1, "honest"), eval_reply(2, "list-count", {**EVAL_METRICS, "hd95": [1.0]})]
    )
    assert evaluated["dice_mean"] == 0.5


def test_a_packed_reply_whose_layout_lies_is_left_out(tmp_path):
    """A site's reply arrives packed (common/wire.py); a layout that misstates the sizes never reaches aggregation.
    Through the ServerApp's receiving stack, the lie is a failure of the node's registered site. (finding 2)"""
    from server.inbound import UNPACKABLE
    from tests.helpers.messages import events
    from tests.helpers.scripted_grid import honest_answer, run_rounds

    sites = {1: "honest", 2: "layout-lie"}
    honest = honest_answer(sites)

    def answer(node: int, msg: Message) -> RecordDict:
        from common.wire import pack

        body = pack(honest(node, msg))
        if node == 2 and keys.LAYOUT in body:
            body.config_records[keys.LAYOUT]["shapes"] = [4, 3, 5]  # 12 + 5 values claimed, 16 + 4 sent
        return body

    from safetensors.numpy import load_file

    from common.runs import LAST_CHECKPOINT

    strategy = run_rounds(tmp_path, sites, answer, 1)
    last = load_file(strategy.recorder.checkpoints.dir / LAST_CHECKPOINT)
    assert np.allclose(last["w"], GLOBAL["w"] + 0.1)
    assert {e["site"]: e["reason"] for e in events(tmp_path, "failure")} == {
        "layout-lie": f"site layout-lie: {UNPACKABLE}"
    }


def test_planning_leaves_out_a_malformed_or_odd_site(tmp_path, tiny_federation):
    """Regression of finding 2."""
    from client.client_app import app
    from server.planning import plan_federation
    from tests.helpers.local_grid import LocalGrid, federation

    def tamper(node: int, reply: Message) -> Message:
        if node == 1:  # a CT flag that is not a list
            reply.content.metric_records[keys.FINGERPRINT][f"{keys.FINGERPRINT_PREFIX}ct"] = 1.0
        if node == 2:  # a site with two channels
            reply.content.metric_records[keys.FINGERPRINT][f"{keys.FINGERPRINT_PREFIX}channels"] = 2
        return reply

    cfg = federation(
        load_config(
            None,
            [
                "model.channels=[8, 16, 32]",
                "model.strides=[2, 2]",
                f"federation.runs_dir={tmp_path / 'runs'}",
                "federation.run_name=p",
                "federation.min_sites=1",
            ],
        ),
        tiny_federation,
    )
    metrics_log = MetricsLog(tmp_path)
    plan = plan_federation(LocalGrid(cfg, app, tamper), cfg, tmp_path / "runs" / "p", metrics_log)
    metrics_log.close()
    assert plan.provenance["sites"] == ["site-3"]
    assert set(failures(tmp_path)) == {"site-1", "site-2"}


# --- finding 3: a fingerprint cannot poison the plan ----------------------------------------------------------


def test_plan_poisoning_is_bounded(tmp_path, tiny_federation):
    """Regression of finding 3."""
    from client.client_app import app
    from server.planning import plan_federation
    from tests.helpers.local_grid import LocalGrid, federation

    def poison(node: int, reply: Message) -> Message:
        if node == 3:  # a billion cases at 0.05 mm
            record = reply.content.metric_records[keys.FINGERPRINT]
            record[f"{keys.FINGERPRINT_PREFIX}cases"] = 10**9
            for axis in ("x", "y", "z"):
                record[f"{keys.FINGERPRINT_PREFIX}spacing_{axis}"] = [0.05] * 7
        return reply

    def plan_with(tamper, name: str):
        cfg = federation(
            load_config(
                None,
                [
                    "model.channels=[8, 16, 32]",
                    "model.strides=[2, 2]",
                    f"federation.runs_dir={tmp_path / 'runs'}",
                    f"federation.run_name={name}",
                ],
            ),
            tiny_federation,
        )
        return plan_federation(LocalGrid(cfg, app, tamper), cfg, tmp_path / "runs" / name, MetricsLog(tmp_path))

    honest = plan_with(None, "honest")
    claims = plan_with(poison, "billion")
    assert failures(tmp_path)["site-3"].startswith("fingerprint of site site-3: 'fp_cases'")
    assert claims.provenance["sites"] == ["site-1", "site-2"]
    assert min(claims.target_spacing) >= min(honest.target_spacing)

    def tiny_spacing(node: int, reply: Message) -> Message:
        if node == 3:  # a plausible count, an absurd spacing
            for axis in ("x", "y", "z"):
                reply.content.metric_records[keys.FINGERPRINT][f"{keys.FINGERPRINT_PREFIX}spacing_{axis}"] = [0.011] * 7
        return reply

    poisoned = plan_with(tiny_spacing, "tiny-spacing")
    voxels = np.prod(np.asarray(poisoned.median_shape, float))
    assert voxels <= 4 * np.prod(np.asarray(honest.median_shape, float)), (poisoned, honest)


# --- finding 5: a site's name comes from its registered key, never from its reply -----------------------------


def test_a_site_cannot_speak_for_another(tmp_path):
    """Regression of finding 5."""
    strategy = real_strategy(tmp_path, nodes={1: "hospital-a", 2: "hospital-b"})
    replies = [train_reply(1, "hospital-a", 0.1), train_reply(2, "hospital-a", 0.3)]
    strategy.aggregate_train(1, replies)
    events = list(read_events(tmp_path / "metrics.jsonl"))
    assert [e["site"] for e in events if e["event"] == "train"] == ["hospital-a"]
    assert "claims to be site 'hospital-a'" in failures(tmp_path)["hospital-b"]
    assert strategy.node_sites == {1: "hospital-a", 2: "hospital-b"}


# --- finding 6: aggregation integrity ---------------------------------------------------------------------------


def test_best_model_tiny_updates_and_float32_overflow(tmp_path):
    """Regression of finding 6."""
    strategy = real_strategy(tmp_path, "federation.min_sites=1")
    strategy.aggregate_train(1, [train_reply(1, "a", 0.1), train_reply(2, "b", 0.2)])
    strategy.aggregate_evaluate(1, [eval_reply(1, "a"), eval_reply(2, "b", {**EVAL_METRICS, "dice": 1e6})])
    assert strategy.recorder.checkpoints.state.best_dice == 0.5
    assert "outside a Dice value's range" in failures(tmp_path)["b"]

    two = real_strategy(tmp_path / "two")
    arrays, _ = two.aggregate_train(1, [train_reply(1, "honest", 0.1), train_reply(2, "tiny", 1e-6)])
    assert "honest" not in failures(tmp_path / "two") and arrays is not None

    zero = real_strategy(tmp_path / "zero")
    zero.aggregate_train(1, [train_reply(1, "honest", 0.1), train_reply(2, "almost-zero", 1e-30)])
    assert "zero to float32 precision" in failures(tmp_path / "zero")["almost-zero"]

    huge = ArrayRecord({"w": Array(np.full((4, 4), 1e300)), "b": Array(np.ones(4, np.float32))})
    unbounded = real_strategy(tmp_path / "f64", "federation.norm_bound=0")
    arrays, _ = unbounded.aggregate_train(1, [train_reply(1, "honest", 0.1), train_reply(2, "f64", arrays=huge)])
    assert np.isfinite(arrays["w"].numpy()).all()
    assert "f64" in failures(tmp_path / "f64")
    assert torch.isfinite(torch.as_tensor(arrays["w"].numpy())).all()


# --- finding 8: DP with a fixed denominator, an honest budget on resume, checked by an independent accountant ---


@pytest.mark.simulation
def test_dp_sensitivity_resume_and_epsilon(tmp_path):
    """Regression of finding 8."""
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.pld import PLDAccountant

    from server.dp import PrivacyResumeRefused, gaussian_epsilon
    from tests.helpers.local_grid import LocalGrid

    def wrapper(run, z: float, offset: int = 0):
        cfg = load_config(
            None,
            [
                "federation.run_name=dp",
                "federation.min_sites=1",
                f"privacy.noise_multiplier={z:.12f}",
                "privacy.clipping_norm=1.0",
            ],
        )
        cfg = cfg.replace(federation=cfg.federation.replace(sites=["a", "b", "c"]))
        log = MetricsLog(run)
        strategy = FedSegStrategy(cfg, SIGNATURE, SHAPES, log, Checkpoints(run / "ckpt"), round_offset=offset)
        return strategy, LocalGrid(cfg, app=None), log

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


# --- issue 21: every reply passes the centre's receiving boundary (server/inbound.py), through the real stack ----

SITES = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c", 4: "hospital-d", 5: "hospital-e"}


def _packed_honest(node: int, msg: Message) -> RecordDict:
    """What an honest site of the tiny model sends, packed for travel."""
    from common.wire import pack
    from tests.helpers.scripted_grid import honest_answer

    body = honest_answer(SITES)(node, msg)
    assert isinstance(body, RecordDict)  # an honest site always answers
    return pack(body)


def _with_flat(body: RecordDict, **array: object) -> RecordDict:
    """``body`` (packed) with its flat float32 Array rebuilt from ``array`` (dtype, shape, stype, data)."""
    from common.wire import PACKED_PREFIX

    flat = body.array_records[keys.ARRAYS][PACKED_PREFIX + "float32"]
    fields: dict[str, Any] = {
        "dtype": flat.dtype,
        "shape": tuple(flat.shape),
        "stype": flat.stype,
        "data": flat.data,
    } | array
    body[keys.ARRAYS] = ArrayRecord({PACKED_PREFIX + "float32": Array(**fields)})
    return body


def _hostile_packing(node: int, msg: Message) -> RecordDict:
    """Nodes 2-5 send replies that do not deserialize; node 1 is honest."""
    body = _packed_honest(node, msg)
    if keys.LAYOUT not in body and node != 5:  # an evaluation carries no arrays
        return body
    if node == 2:  # an array of a serialization numpy does not know
        return _with_flat(body, stype="torch.Tensor")
    if node == 3:  # bytes that are not an .npy file
        return _with_flat(body, data=b"\x93NUMPY this is not one")
    if node == 4:  # an empty tensor declared with a shape too large to exist: its size, 0, adds up
        layout = body.config_records[keys.LAYOUT]
        for key, more in (("names", ["huge"]), ("dtypes", ["float32"]), ("ndims", [2]), ("shapes", [0, 2**62])):
            entries = layout[key]
            assert isinstance(entries, list)
            layout[key] = [*entries, *more]
        return body
    if node == 5:  # a timing metric as a list
        body.metric_records[keys.METRICS]["t_delivered"] = [1.0, 2.0]
    return body


def test_replies_that_do_not_deserialize_never_end_the_run(tmp_path):
    """H2: a non-numpy stype, bytes that are not .npy, an empty tensor of a huge shape, a timing metric as a list:
    each is left out with a fixed reason under its registered name, and the run goes on with the honest site.
    (review finding H2)"""
    from server.inbound import MALFORMED, UNPACKABLE
    from tests.helpers.messages import events
    from tests.helpers.scripted_grid import run_rounds

    strategy = run_rounds(tmp_path, SITES, _hostile_packing, 2)
    assert [e["site"] for e in events(tmp_path, "train")] == ["hospital-a"] * 2
    assert strategy.recorder.checkpoints.state.last_round == 2
    reasons = {(e["round"], e["site"]): e["reason"] for e in events(tmp_path, "failure")}
    for rnd in (1, 2):
        assert reasons[rnd, "hospital-b"] == f"site hospital-b: {UNPACKABLE}"
        assert reasons[rnd, "hospital-c"] == f"site hospital-c: {UNPACKABLE}"
        assert reasons[rnd, "hospital-d"] == f"site hospital-d: {UNPACKABLE}"
        assert reasons[rnd, "hospital-e"] == f"site hospital-e: {MALFORMED}"
    assert {e["site"] for e in events(tmp_path, "timeline")} == set(SITES.values())


def test_planning_goes_on_without_a_site_whose_reply_does_not_deserialize(tmp_path, tiny_federation):
    """H2 at planning: a fingerprint reply with an array of an unknown serialization ended the run before it began.
    (review finding H2)"""
    from client.client_app import app
    from common.wire import pack
    from server.inbound import UNPACKABLE
    from server.planning import plan_federation
    from tests.helpers.local_grid import LocalGrid, federation
    from tests.helpers.scripted_grid import ScriptedGrid, stack

    cfg = federation(
        load_config(
            None,
            [
                "model.channels=[8, 16, 32]",
                "model.strides=[2, 2]",
                f"federation.runs_dir={tmp_path / 'runs'}",
                "federation.run_name=p",
                "federation.min_sites=1",
            ],
        ),
        tiny_federation,
    )
    sites = LocalGrid(cfg, app)
    names = {1: "site-1", 2: "site-2", 3: "site-3"}

    def answer(node: int, msg: Message) -> RecordDict:
        body = app(msg, sites.context(node)).content
        if node == 3:
            body = pack(
                RecordDict(
                    {
                        **dict(body.items()),
                        keys.ARRAYS: ArrayRecord(
                            {"a": Array(np.zeros(2, np.float32)), "b": Array(np.zeros(3, np.float32))}
                        ),
                    }
                )
            )
            body = _with_flat(body, stype="torch.Tensor")
        return body

    run = tmp_path / "runs" / "p"
    grid = stack(ScriptedGrid(names, answer), run, dict(names))
    plan = plan_federation(grid, cfg, run, grid._log, grid.inbox.node_sites)
    assert plan.provenance["sites"] == ["site-1", "site-2"]
    assert failures(run)["site-3"] == f"site site-3: {UNPACKABLE}"


def _dice_by_round(node: int, rnd: int) -> float:
    return 0.4 + 0.1 * rnd


def test_a_site_claiming_many_cases_cannot_pick_the_best_round(tmp_path):
    """M1: site d says it scored round 1 on 10^12 cases at Dice 1.0, every later round at 0.0; the three honest
    sites improve every round. Its count is refused at the boundary, so the best model is the last round's.
    (review finding M1)"""
    from server.inbound import TOO_MANY_CASES
    from tests.helpers.messages import events
    from tests.helpers.scripted_grid import honest_answer, run_rounds

    sites = {n: SITES[n] for n in (1, 2, 3, 4)}
    honest = honest_answer(sites, _dice_by_round)

    def answer(node: int, msg: Message) -> RecordDict:
        body = honest(node, msg)
        if node == 4:
            for record in (keys.EVALUATION, keys.METRICS):
                if record in body and "dice" in body[record]:
                    claim = (
                        record == keys.EVALUATION and msg.content.config_records[keys.CONFIG][keys.SERVER_ROUND] == 2
                    )
                    body[record]["dice"] = 1.0 if claim else 0.0
                    body[record][keys.NUM_EXAMPLES] = 10**12 if claim else 2
        return body

    strategy = run_rounds(tmp_path, sites, answer, 4)
    state = strategy.recorder.checkpoints.state
    assert state.best_round == 4, state
    assert events(tmp_path, "failure")[0]["reason"] == f"site hospital-d: {TOO_MANY_CASES}"


def test_case_counts_are_held_to_what_the_site_declared_at_planning(tmp_path):
    """A site that declared 3 training cases cannot weigh its update or its Dice by more, also after a restart
    (the declarations live in the run folder); an evaluation's count is capped in the round's weighted Dice.
    (review finding M1)"""
    from common.fingerprint import bounded_weights
    from common.runs import DECLARED_CASES_FILE
    from server.inbound import TOO_MANY_CASES, Inbox
    from tests.helpers.messages import events
    from tests.helpers.scripted_grid import ScriptedGrid, honest_answer, run_rounds, stack

    sites = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}
    honest = honest_answer(sites)

    def answer(node: int, msg: Message) -> RecordDict:
        if msg.metadata.message_type == "query.fingerprint":
            return RecordDict(
                {
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3}),
                    keys.FINGERPRINT: MetricRecord({"fp_cases": 3, "fp_val_cases": 1}),
                    keys.IDENTITY: ConfigRecord({keys.SITE: sites[node], keys.SIGNATURE: SIGNATURE}),
                }
            )
        body = honest(node, msg)
        if node == 3:
            body.metric_records[keys.METRICS][keys.NUM_EXAMPLES] = (
                50 if msg.metadata.message_type == MessageType.TRAIN else 9000
            )
        if node == 2 and msg.metadata.message_type == MessageType.EVALUATE:
            body.metric_records[keys.METRICS][keys.NUM_EXAMPLES] = (
                4  # within its 3 + 1 declared cases (a site that ended up
            )
            # not training scores all of them)
        return body

    declare = stack(ScriptedGrid(sites, answer), tmp_path, dict(sites))
    query = RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 0})})
    declare.send_and_receive([declare.create_message(query, "query.fingerprint", n, "0") for n in sites])
    assert Inbox({}, tmp_path).declared == {name: (3, 1) for name in sites.values()}, tmp_path / DECLARED_CASES_FILE
    run_rounds(tmp_path, sites, answer, 2)  # a new stack: the declarations come from the run folder
    refused = [e for e in events(tmp_path, "failure") if e["site"] == "hospital-c"]
    assert [e["reason"] for e in refused] == [f"site hospital-c: {TOO_MANY_CASES}"] * 3
    (last,) = [e for e in events(tmp_path, "round") if e["round"] == 2]
    assert last["dice_weighted"] == pytest.approx(0.5)
    assert bounded_weights([2.0, 2.0, 90_000.0]) == [2.0, 2.0, 6.0]


def test_a_site_is_named_by_its_node_in_every_event(tmp_path):
    """M2: hospital-b claims to be hospital-a in every reply, and is slow (its replies arrive after the round):
    its timeline, late-reply and failure events name hospital-b, and hospital-a's record is only hospital-a's.
    (review finding M2)"""
    from tests.helpers.messages import events
    from tests.helpers.scripted_grid import honest_answer, run_rounds

    sites = {1: "hospital-a", 2: "hospital-b"}
    honest = honest_answer(sites)

    def answer(node: int, msg: Message) -> RecordDict:
        body = honest(node, msg)
        body.config_records[keys.IDENTITY][keys.SITE] = "hospital-a"
        return body

    run_rounds(tmp_path, sites, answer, 3, late={2: 1})
    named = [(e["event"], e["site"]) for e in events(tmp_path) if e.get("site") and e["event"] != "failure"]
    assert ("late-reply", "hospital-b") in named
    assert {site for event, site in named if event in ("late-reply", "timeline")} == {"hospital-a", "hospital-b"}
    assert [site for event, site in named if event == "timeline"].count("hospital-a") == 3 + 1
    assert {site for event, site in named if event in ("train", "evaluate")} == {"hospital-a"}


def test_cross_site_cells_and_held_out_sites_follow_the_registry(tmp_path):
    """M2: a site cannot file a cross-site score under another hospital's name, and a held-out hospital that
    claims a training site's name is still kept out of training. (review finding M2)"""
    import torch

    from common.runs import run_dir
    from server.cross_eval import cross_evaluate, training_grid
    from server.site_registry import write_nodes
    from tests.helpers.scripted_grid import ScriptedGrid, stack

    sites = {1: "hospital-a", 2: "hospital-b", 3: "hospital-h"}
    cfg = load_config(
        None,
        [
            "federation.run_name=m2",
            f"federation.runs_dir={tmp_path}",
            "federation.sites=[hospital-a, hospital-b]",
            "federation.held_out_sites=[hospital-h]",
        ],
    )
    run = run_dir(cfg)
    run.mkdir(parents=True)
    write_nodes(run, sites)

    def answer(node: int, msg: Message) -> RecordDict:
        claimed = "hospital-a" if node in (2, 3) else sites[node]
        return RecordDict(
            {
                keys.METRICS: MetricRecord({"dice": 0.9 if node == 2 else 0.6, "trained": 1.0, keys.NUM_EXAMPLES: 2}),
                keys.IDENTITY: ConfigRecord({keys.SITE: claimed, keys.SIGNATURE: SIGNATURE}),
            }
        )

    grid = stack(ScriptedGrid(sites, answer), run, dict(sites))
    assert list(training_grid(grid, cfg).get_node_ids()) == [1, 2]
    cells = cross_evaluate(grid, cfg, SIGNATURE, {"last": {"w": torch.ones(4, 4)}}, grid._log, run)
    assert [(c.site, c.dice) for c in cells] == [("hospital-a", 0.6)]
    assert "claims to be site 'hospital-a'" in failures(run)["hospital-b"]


def test_a_sites_text_stays_on_one_line_of_the_centres_console(tmp_path):
    """L2: an error reason with a newline and terminal escape sequences is one escaped line in the metrics log
    and on the console. (review finding L2)"""
    from flwr.app import Error

    from common.progress import describe
    from tests.helpers.messages import events
    from tests.helpers.scripted_grid import honest_answer, run_rounds

    sites = {1: "hospital-a", 2: "hospital-b"}
    honest = honest_answer(sites)
    forged = "site hospital-b: disk\n2026-01-01 INFO round 9: 3/3 site(s) replied\x1b[2J\x1b]0;owned\x07"

    def answer(node: int, msg: Message) -> RecordDict | Error:
        return Error(code=1001, reason=forged) if node == 2 else honest(node, msg)

    run_rounds(tmp_path, sites, answer, 1)
    failure = events(tmp_path, "failure")[0]
    line = describe(failure)
    assert failure["site"] == "hospital-b" and "\\n2026-01-01" in failure["reason"]
    assert len(line.splitlines()) == 1 and "\x1b" not in line and "\x07" not in line
    assert len(describe({**failure, "site": "b\nforged", "reason": forged}).splitlines()) == 1


def test_a_site_claiming_a_million_training_cases_weighs_no_more_than_three_times_the_others():
    """Item 3: a site's weight in the mean is capped (common/fingerprint.py bounded_weights), whatever it claims."""
    from common.config import FederationConfig
    from server.aggregator import Aggregator
    from tests.helpers.messages import GLOBAL, TRAIN_METRICS, train_reply

    def moved(step: float, cases: int):
        return train_reply(cases, f"s{cases}", step, {**TRAIN_METRICS, keys.NUM_EXAMPLES: cases})

    plain = Aggregator(FederationConfig(server_optimizer="none"))
    mean = plain([moved(0.0, 10), moved(0.0, 11), moved(1.0, 10**6)], GLOBAL)
    assert float(mean["b"].numpy()[0]) == pytest.approx(3 * 10.5 / (21 + 3 * 10.5))  # capped at 3 x the median
    honest = plain([moved(0.0, 10), moved(1.0, 20)], GLOBAL)
    assert float(honest["b"].numpy()[0]) == pytest.approx(20 / 30)  # within the cap: FedAvg's weighted mean


def test_a_small_site_with_more_validation_than_training_cases_is_scored(tmp_path):
    """The per-case split can give a site of 8 cases 5 for validation and 3 for training (the demo's site-3
    did): its score counts within what it declared, so it is kept; a count beyond both is refused."""
    from server.inbound import TOO_MANY_CASES, Inbox
    from tests.helpers.messages import EVAL_METRICS, eval_reply

    inbox = Inbox({1: "hospital-a"}, tmp_path)
    inbox.declared["hospital-a"] = (3, 5)  # its fingerprint's training and validation cases
    kept = inbox.receive(eval_reply(1, "hospital-a", {**EVAL_METRICS, keys.NUM_EXAMPLES: 5}), 1)
    assert not kept.has_error(), kept.error.reason
    refused = inbox.receive(eval_reply(1, "hospital-a", {**EVAL_METRICS, keys.NUM_EXAMPLES: 9}), 1)
    assert refused.has_error() and refused.error.reason.endswith(TOO_MANY_CASES)

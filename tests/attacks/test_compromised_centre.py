"""Attacks by a compromised or impersonated centre: what a site receives is checked before it is used, and
what leaves the site is bounded by the site, whatever the centre asks.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import keys
from common.files import read_jsonl
from tests.helpers.messages import EVAL_METRICS, TRAIN_METRICS
from tests.helpers.site_harness import one_site


def test_a_received_plan_is_bounded_and_old_caches_go(tmp_path):
    """Regression of finding 3."""
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


# --- findings 9 and 10: the egress guard, per reply type, with the site's own bound -----------------------------


def test_each_reply_type_holds_exactly_its_keys_and_failures_end_in_a_fixed_reason(tmp_path, tiny_federation):
    """Regression of finding 9."""
    from flwr.app import Error

    from client import client_app, egress
    from server.server_app import initial_weights
    from tests.helpers.envelopes import incoming
    from tests.helpers.local_grid import LocalGrid

    cfg = one_site(tmp_path, tiny_federation["site-1"])
    site = client_app.Site.resolve(LocalGrid(cfg, client_app.app).context(1))
    weights, _ = initial_weights(cfg)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()})
    identity = ConfigRecord({keys.SITE: "site-1", keys.SIGNATURE: site.signature})

    def sent(message_type: str, content) -> Message:
        request = incoming(RecordDict(), message_type, node_id=1)
        return egress.guard(Message(content, reply_to=request), request, site)

    blocked = f"site site-1: {egress.BLOCKED_REASON}"
    train_with_fp = RecordDict(
        {
            keys.ARRAYS: arrays,
            keys.IDENTITY: identity,
            keys.METRICS: MetricRecord({**TRAIN_METRICS, "fp_extent_x": [41.0, 42.0]}),
        }
    )
    assert sent(MessageType.TRAIN, train_with_fp).error.reason == blocked
    eval_with_arrays = RecordDict(
        {keys.ARRAYS: arrays, keys.IDENTITY: identity, keys.METRICS: MetricRecord(EVAL_METRICS)}
    )
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


def test_the_site_bounds_what_travels_whatever_the_centre_asks(tmp_path, tiny_federation):
    """Regression of finding 10."""
    from client import client_app, egress
    from tests.helpers.local_grid import LocalGrid, model_strategy

    def one_round(name: str, site_settings: dict) -> tuple[Message, list[dict]]:
        cfg = one_site(
            tmp_path / name,
            tiny_federation["site-1"],
            "model.norm=batch",
            "train.norm_mode=shared",
            site_settings=site_settings,
        )
        strategy, weights = model_strategy(cfg, tmp_path / name)
        grid = LocalGrid(cfg, client_app.app)
        (received,) = grid.send_and_receive(strategy.configure_train(1, ArrayRecord(weights), ConfigRecord(), grid))
        return received, egress.EgressLog(tmp_path / name / "e" / "sites" / "site-1").entries()

    received, audit = one_round("default", {})
    assert received.has_error() and received.error.reason == f"site site-1: {egress.BLOCKED_REASON}"
    assert any("running_mean" in p and "max_norm_travel" in p for p in audit[0]["blocked"])
    allowed, _ = one_round("opted-in", {"max_norm_travel": "shared"})
    assert allowed.has_content() and any(k.endswith("running_mean") for k in allowed.content[keys.ARRAYS])


# --- finding 4: nothing computed from fewer than site.min_cohort cases, and nothing exact ------------------------


def test_nothing_leaves_from_fewer_than_the_minimum_cohort_and_nothing_exact(tmp_path, tiny_federation):
    """Regression of finding 4."""
    from client import client_app
    from client.reasons import SANITIZED_REASONS, TooFewCases
    from common.dataset import read_dataset
    from common.fingerprint import site_fingerprint
    from server.server_app import initial_weights
    from tests.helpers.envelopes import incoming
    from tests.helpers.local_grid import LocalGrid
    from tests.helpers.nifti_cases import nnunet_dataset

    cfg = one_site(tmp_path, tiny_federation["site-1"], site_settings={"min_cohort": 5})  # 3 train, 1 val case
    grid = LocalGrid(cfg, client_app.app)
    weights, signature = initial_weights(cfg)
    config = ConfigRecord(
        {keys.SERVER_ROUND: 1, keys.SIGNATURE: signature, keys.WIRE_DTYPE: "float32", keys.PROXIMAL_MU: 0.0}
    )
    content = RecordDict({keys.CONFIG: config, keys.ARRAYS: ArrayRecord(weights)})
    refused = f"site site-1: {SANITIZED_REASONS[TooFewCases]}"
    for message_type, body in (
        ("query.fingerprint", RecordDict({keys.CONFIG: config})),
        (MessageType.EVALUATE, content),
        (MessageType.TRAIN, content),
    ):
        (answer,) = grid.send_and_receive([incoming(body, message_type, node_id=1)])
        assert answer.has_error() and answer.error.reason == refused, message_type

    spec = read_dataset(nnunet_dataset(tmp_path / "Dataset009_Six", n_cases=6))
    record = site_fingerprint(spec, [c.case_id for c in spec.cases])
    lesion_voxels = 6 * 3**3  # every case holds one 3 x 3 x 3 lesion
    assert record["fp_fg_voxels_0"] == 160.0 != lesion_voxels
    assert not any(name.startswith(("fp_fg_sum", "fp_fg_sumsq")) for name in record)


# --- finding 1: every task type Flower can start at a site passes the bundle guard ------------------------------


def test_every_task_command_flower_can_start_is_guarded(tmp_path, monkeypatch):
    """Flower's own SuperExec launcher starts an AgentApp task the way it would for a bundle with an
    ``agentapp`` component: it finds the site's guard, not Flower's flwr-agentapp, and the refusal is recorded.
    (finding 1)"""
    import os
    import subprocess

    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    from client.bundle_guard import guard_env, write_launcher

    bin_dir = write_launcher(tmp_path / "guard-bin").parent
    assert {p.name for p in bin_dir.iterdir()} == set(TASK_TYPE_TO_COMMAND.values())
    decisions = tmp_path / "bundles.jsonl"
    for name, value in guard_env(bin_dir, ["0" * 64], decisions, dict(os.environ)).items():
        monkeypatch.setenv(name, value)
    spawned, popen = [], subprocess.Popen

    def started(*args, **kwargs):  # Flower's launch, then wait for the process it started
        spawned.append(popen(*args, **kwargs))
        spawned[-1].wait(60)
        return spawned[-1]

    monkeypatch.setattr(subprocess, "Popen", started)
    for task in (TaskType.AGENT_APP, TaskType.CONNECTOR, TaskType.MODEL):
        spec = ExecutionSpec(
            task_type=task,
            runtime_api_address="127.0.0.1:9",
            token="t",
            insecure=True,
            root_certificates_path=None,
            runtime_dependency_install=False,
            parent_pid=None,
            suppress_output=False,
            task_id=1,
        )
        assert SubprocessExecutor().launch(spec).status == "accepted"
    refused = list(read_jsonl(decisions))
    assert [r["task"] for r in refused] == ["flwr-agentapp", "flwr-connector", "flwr-model"]
    assert {r["decision"] for r in refused} == {"refused"} and all(p.returncode == 1 for p in spawned)


# --- issue 21: everything a site receives passes its receiving boundary (client/inbound.py) ---------------------


def _site(tmp_path, tiny_federation, *overrides: str):
    """A one-site federation of the real ClientApp, its grid, its state folder and its model signature."""
    from client import client_app
    from client.site import Site
    from tests.helpers.local_grid import LocalGrid

    cfg = one_site(tmp_path, tiny_federation["site-1"], *overrides)
    grid = LocalGrid(cfg, client_app.app)
    site = Site.resolve(grid.context(1))
    return cfg, grid, site.state.root, site.signature


def _files(root) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _with_id(msg: Message, message_id: str) -> Message:
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


FINGERPRINT_QUERY = "query.fingerprint"


def _fingerprint_query() -> RecordDict:
    return RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 0})})


def test_a_message_id_from_the_centre_never_names_a_file(tmp_path, tiny_federation):
    """H1: the SuperNode notes each pull in a file named after the message id, and the ClientApp reads and
    deletes that file; an id such as ``../egress.jsonl`` or an absolute path names no file at all.
    (review finding H1)"""
    import types
    from functools import partial

    from client import client_app
    from client.supernode import record_pull
    from client.timeline import pull_note
    from common.flower.supernode import note_pulls
    from tests.helpers.envelopes import incoming

    cfg, grid, state, _ = _site(tmp_path / "site", tiny_federation)
    (answer,) = grid.send_and_receive([incoming(_fingerprint_query(), FINGERPRINT_QUERY, 1)])
    assert answer.has_content()
    outside = tmp_path / "outside.txt"
    outside.write_text("1.0")
    (state / "victim").write_text("1.0")  # a float, so the ClientApp would read it as a pull time and delete it
    before = _files(tmp_path)

    # The SuperNode's patched pull (common/flower/supernode.py, noting as client/supernode.py does) around a
    # stand-in for Flower's own function.
    loop = types.ModuleType("flwr_pull_stand_in")
    loop._pull_and_store_message = lambda *args, receive, **kwargs: receive()
    assert note_pulls(loop, partial(record_pull, state))
    hostile = [
        "../egress.jsonl",
        "../yaml.py",
        "../site.json",
        f"../../../{outside.name}",
        str(outside),
        "A" * 64,
        "0" * 63 + "/",
    ]
    for message_id in hostile:
        request = _with_id(incoming(_fingerprint_query(), FINGERPRINT_QUERY, 1), message_id)
        loop._pull_and_store_message(receive=lambda request=request: (request, None))
    assert _files(tmp_path) == before
    honest = incoming(_fingerprint_query(), FINGERPRINT_QUERY, 1)
    loop._pull_and_store_message(receive=lambda: (honest, None))
    assert pull_note(state, honest.metadata.message_id).is_file()

    # The ClientApp reads the note of the message it handles, and deletes it: never a file the id points at.
    victim = _with_id(incoming(_fingerprint_query(), FINGERPRINT_QUERY, 1), "../victim")
    assert client_app.app(victim, grid.context(1)).has_content()
    assert (state / "victim").read_text() == "1.0" and outside.read_text() == "1.0"
    assert not (state / "yaml.py").exists()


def test_a_history_that_cannot_be_written_never_sends_the_sites_paths(tmp_path, tiny_federation):
    """L1: the reply the egress guard let out leaves as it is when the site's own history cannot record it (here
    a folder where the file belongs), instead of an exception whose text, with the site's paths, Flower sends.
    (review finding L1)"""
    from client import client_app
    from client.egress import EgressLog
    from common.runs import HISTORY_FILE
    from tests.helpers.envelopes import incoming

    _, grid, state, _ = _site(tmp_path, tiny_federation)
    (state / HISTORY_FILE).unlink(missing_ok=True)
    (state / HISTORY_FILE).mkdir()
    reply = client_app.app(incoming(_fingerprint_query(), FINGERPRINT_QUERY, 1), grid.context(1))
    assert reply.has_content() and keys.FINGERPRINT in reply.content.metric_records
    assert EgressLog(state).entries()[-1]["status"] == "sent"


def test_a_hostile_configuration_is_refused_with_one_fixed_reason(tmp_path, tiny_federation):
    """L2: a cross-eval model name with a newline never reaches site.log; and every value of the wrong type or
    shape is refused before a handler reads it, with the one fixed reason, nothing written at the site.
    (review finding L2 and the site boundary)"""
    import math

    from client.inbound import MalformedMessage
    from client.reasons import SANITIZED_REASONS
    from common.runs import SITE_LOG
    from tests.helpers.envelopes import incoming

    _, grid, state, signature = _site(tmp_path, tiny_federation)
    refused = f"site site-1: {SANITIZED_REASONS[MalformedMessage]}"
    arrays = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})
    lying = ArrayRecord(
        {
            "w": Array(
                dtype="float32", shape=(3, 3), stype="numpy.ndarray", data=Array(np.zeros((2, 2), np.float32)).data
            )
        }
    )
    base = {keys.SIGNATURE: signature, keys.WIRE_DTYPE: "float32", keys.SERVER_ROUND: 1}
    hostile = [
        (
            "query.cross_eval",
            {**base, keys.CROSS_EVAL_TASK: "evaluate", keys.CROSS_EVAL_MODEL: "last\n2026-01-01 INFO site-1: forged"},
            arrays,
        ),
        ("query.cross_eval", {**base, keys.CROSS_EVAL_TASK: "evaluate", keys.CROSS_EVAL_MODEL: "\x1b[2Jlast"}, arrays),
        (MessageType.TRAIN, {**base, keys.SERVER_ROUND: [1, 2], keys.PROXIMAL_MU: 0.0}, arrays),
        (MessageType.TRAIN, {**base, keys.PROXIMAL_MU: math.nan}, arrays),
        (MessageType.TRAIN, {**base, keys.PROXIMAL_MU: 0.0, keys.SERVER_ROUND: True}, arrays),
        (MessageType.EVALUATE, {**base, keys.SIGNATURE: b"bytes"}, arrays),
        (MessageType.EVALUATE, base, lying),
    ]
    before = _files(state)
    for message_type, config, records in hostile:
        content = RecordDict({keys.CONFIG: ConfigRecord(config), keys.ARRAYS: records})
        (reply,) = grid.send_and_receive([incoming(content, message_type, 1)])
        assert reply.has_error() and reply.error.reason == refused, (message_type, config)
    unicode_round = incoming(_fingerprint_query(), FINGERPRINT_QUERY, 1)
    unicode_round.metadata.__dict__["_group_id"] = "\u00b2"
    (reply,) = grid.send_and_receive([unicode_round])
    assert reply.has_error() and reply.error.reason == refused
    log = (state / SITE_LOG).read_text() if (state / SITE_LOG).is_file() else ""
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()) and "\x1b" not in log
    changed = {k for k, v in _files(state).items() if before.get(k) != v}
    assert changed <= {"egress.jsonl", SITE_LOG}, changed


def test_messages_of_other_models_never_touch_a_runs_trained_tensors(tmp_path, tiny_federation):
    """L3: after a round of training, messages carrying other model signatures (alternating, as a confused or
    hostile centre could send) are refused, and the run's own norm tensors stay exactly as they were trained.
    (review finding L3)"""
    from client.reasons import SANITIZED_REASONS, SignatureMismatch
    from server.server_app import initial_weights
    from tests.helpers.envelopes import incoming

    cfg, grid, state, signature = _site(tmp_path, tiny_federation, "model.norm=batch", "train.norm_mode=local")
    weights, _ = initial_weights(cfg)
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()})

    def config(sig: str, rnd: int) -> ConfigRecord:
        return ConfigRecord(
            {keys.SERVER_ROUND: rnd, keys.SIGNATURE: sig, keys.WIRE_DTYPE: "float32", keys.PROXIMAL_MU: 0.0}
        )

    (trained,) = grid.send_and_receive(
        [incoming(RecordDict({keys.CONFIG: config(signature, 1), keys.ARRAYS: arrays}), MessageType.TRAIN, 1)]
    )
    assert trained.has_content(), trained.error.reason if trained.has_error() else None
    tensors = {k: v for k, v in _files(state).items() if k.endswith(".safetensors")}
    assert tensors, "batch norm with norm_mode local keeps tensors at the site"
    mismatch = f"site site-1: {SANITIZED_REASONS[SignatureMismatch]}"
    for sig in ("0" * 16, "f" * 16, "0" * 16, "f" * 16):
        for message_type, rnd in ((MessageType.TRAIN, 2), (MessageType.EVALUATE, 1)):
            body = RecordDict({keys.CONFIG: config(sig, rnd), keys.ARRAYS: arrays})
            (reply,) = grid.send_and_receive([incoming(body, message_type, 1)])
            assert reply.has_error() and reply.error.reason == mismatch
    assert {k: v for k, v in _files(state).items() if k.endswith(".safetensors")} == tensors

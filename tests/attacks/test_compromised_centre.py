"""Attacks by a compromised or impersonated centre: what a site receives is checked before it is used, and
what leaves the site is bounded by the site, whatever the centre asks.
"""

from __future__ import annotations

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import keys
from common.files import read_jsonl
from common.metrics_log import MetricsLog
from server.checkpoints import Checkpoints
from server.strategy import FedSegStrategy
from tests.attacks.builders import EVAL_METRICS, TRAIN_METRICS, one_site


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



# --- findings 9 and 10: the egress guard, per reply type, with the site's own bound -----------------------------

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


# --- finding 4: nothing computed from fewer than site.min_cohort cases, and nothing exact ------------------------


def test_finding_4_minimum_cohort_and_coarse_aggregates(tmp_path, tiny_federation):
    from client import client_app
    from client.reasons import SANITIZED_REASONS, TooFewCases
    from common.dataset import read_dataset
    from common.fingerprint import site_fingerprint
    from server.server_app import initial_weights
    from tests.flower_messages import incoming
    from tests.local_grid import LocalGrid
    from tests.nifti_cases import nnunet_dataset

    cfg = one_site(tmp_path, tiny_federation["site-1"], site_settings={"min_cohort": 5})  # 3 train, 1 val case
    grid = LocalGrid(cfg, client_app.app)
    weights, signature = initial_weights(cfg)
    config = ConfigRecord({keys.SERVER_ROUND: 1, keys.SIGNATURE: signature, keys.WIRE_DTYPE: "float32",
                           keys.PROXIMAL_MU: 0.0})
    content = RecordDict({keys.CONFIG: config, keys.ARRAYS: ArrayRecord(weights)})
    refused = f"site site-1: {SANITIZED_REASONS[TooFewCases]}"
    for message_type, body in (("query.fingerprint", RecordDict({keys.CONFIG: config})),
                               (MessageType.EVALUATE, content), (MessageType.TRAIN, content)):
        (answer,) = grid.send_and_receive([incoming(body, message_type, node_id=1)])
        assert answer.has_error() and answer.error.reason == refused, message_type

    spec = read_dataset(nnunet_dataset(tmp_path / "Dataset009_Six", n_cases=6))
    record = site_fingerprint(spec, [c.case_id for c in spec.cases])
    lesion_voxels = 6 * 3 ** 3  # every case holds one 3 x 3 x 3 lesion
    assert record["fp_fg_voxels_0"] == 160.0 != lesion_voxels
    assert not any(name.startswith(("fp_fg_sum", "fp_fg_sumsq")) for name in record)



# --- finding 1: every task type Flower can start at a site passes the bundle guard ------------------------------


def test_finding_1_every_task_command_flower_can_start_is_guarded(tmp_path, monkeypatch):
    """Flower's own SuperExec launcher starts an AgentApp task the way it would for a bundle with an
    ``agentapp`` component: it finds the site's guard, not Flower's flwr-agentapp, and the refusal is recorded."""
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
        spec = ExecutionSpec(task_type=task, runtime_api_address="127.0.0.1:9", token="t", insecure=True,
                             root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                             suppress_output=False, task_id=1)
        assert SubprocessExecutor().launch(spec).status == "accepted"
    refused = list(read_jsonl(decisions))
    assert [r["task"] for r in refused] == ["flwr-agentapp", "flwr-connector", "flwr-model"]
    assert {r["decision"] for r in refused} == {"refused"} and all(p.returncode == 1 for p in spawned)



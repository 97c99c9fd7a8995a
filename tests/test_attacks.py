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
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common import keys
from common.config import load_config
from common.files import read_jsonl
from common.metrics_log import MetricsLog, read_events
from server.checkpoints import Checkpoints
from server.strategy import FedSegStrategy
from tests.flower_messages import reply as make_reply
from tests.local_grid import over_the_wire
from tests.tiny import tiny

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


# --- findings 9 and 10: the egress guard, per reply type, with the site's own bound -----------------------------

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


# --- finding 12: local files ---------------------------------------------------------------------------------


def _predict_run(tmp_path, in_channels: int = 1):
    """A run folder as the centre hands it out, and a site.yaml, for ``fedseg-client predict``."""
    import yaml
    from safetensors.torch import save_file

    from common.plan import ChannelNorm, Plan
    from server.server_app import initial_weights

    cfg = load_config(None, ["model.channels=[8, 16, 32]", "model.strides=[2, 2]",
                             f"model.in_channels={in_channels}"])
    run = tmp_path / f"run-{in_channels}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    Plan((1.0, 1.2, 2.0), (16, 16, 16), (ChannelNorm("zscore"),) * in_channels, (24, 20, 16)).save(run / "plan.json")
    save_file(initial_weights(cfg)[0], str(run / "checkpoints" / "best.safetensors"))
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"site": {"name": "h", "state_dir": str(tmp_path / "state")}}))
    return run, site


def test_finding_12_local_files_are_private_and_carry_no_identifiers(tmp_path, tiny_federation, centre):
    import json
    import os
    import stat

    import nibabel as nib

    from client import client_app
    from client.cli import main
    from common.dataset import DatasetError, read_dataset
    from tests.local_grid import LocalGrid
    from tests.nifti_cases import RAS, nnunet_dataset, phantom

    # Permissions: the state directory (cache of preprocessed scans) is owner-only whatever the umask.
    old = os.umask(0o022)
    try:
        cfg = one_site(tmp_path / "perm", tiny_federation["site-2"])
        grid = LocalGrid(cfg, client_app.app)
        from tests.flower_messages import incoming
        (answer,) = grid.send_and_receive([incoming(RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 0})}),
                                                    "query.fingerprint", node_id=1)])
        assert answer.has_content()
        state = tmp_path / "perm" / "e" / "sites" / "site-1"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
    finally:
        os.umask(old)
    server_state = centre["root"] / "server-state"
    assert stat.S_IMODE((server_state / "superlink.db").stat().st_mode) == 0o600
    assert stat.S_IMODE(server_state.stat().st_mode) == 0o700

    # PHI in the header of an input never reaches the prediction.
    run, site = _predict_run(tmp_path)
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    image = nib.Nifti1Image(phantom()[0], RAS)
    image.header["descrip"] = b"DOE^JANE 1970-01-01 MRN123456"
    image.header["db_name"] = b"PATIENT_DOE"
    image.header["aux_file"] = b"MRN123456"
    image.header["intent_name"] = b"DOE"
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"DOE^JANE"))
    nib.save(image, str(scans / "head_0000.nii.gz"))
    assert main(["predict", "--config", str(site), "--run", str(run), "--input", str(scans),
                 "--output", str(out)]) == 0
    seg = out / "head_seg.nii.gz"
    assert b"DOE" not in nib.load(str(seg)).header.binaryblock and not nib.load(str(seg)).header.extensions
    assert stat.S_IMODE(seg.stat().st_mode) == 0o600

    # Two inputs that map to one output name are refused; a two-channel case is one case.
    nib.save(nib.Nifti1Image(phantom(seed=1)[0], RAS), str(scans / "head_0001.nii.gz"))
    before = seg.read_bytes()
    assert main(["predict", "--config", str(site), "--run", str(run), "--input", str(scans),
                 "--output", str(out)]) == 2
    assert seg.read_bytes() == before
    run2, _ = _predict_run(tmp_path, in_channels=2)
    assert main(["predict", "--config", str(site), "--run", str(run2), "--input", str(scans),
                 "--output", str(tmp_path / "out2")]) == 0
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["head_seg.nii.gz"]

    # A case id of '..' (an MSD entry named '...nii.gz') is refused before any cache folder is touched.
    msd = tmp_path / "msd"
    nnunet = nnunet_dataset(tmp_path / "nn", n_cases=1)
    (msd / "imagesTr").mkdir(parents=True)
    (nnunet / "imagesTr" / "case_000_0000.nii.gz").rename(msd / "imagesTr" / "...nii.gz")
    (msd / "labelsTr").mkdir()
    (nnunet / "labelsTr" / "case_000.nii.gz").rename(msd / "labelsTr" / "x.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "lesion"},
        "training": [{"image": "./imagesTr/...nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(DatasetError, match="not a safe folder name"):
        read_dataset(msd)


# --- wire attacks: one deployed centre on 127.0.0.1, shared by findings 7, 11 and 12 ----------------------------

WIRE_SITES = ["site-1"]


@pytest.fixture(scope="module")
def centre(tmp_path_factory):
    """``fedseg-server start`` with TLS, node auth and an allow-listed site that never connects, so the
    centre stays up (waiting for it) while the tests attack its gateway."""
    import yaml

    from server.certs import init_pki
    from tests.deploy_harness import (
        GATEWAY_HOST,
        Launched,
        allow,
        federation_yaml,
        make_site,
        snapshot_app,
        wait_for,
    )

    root = tmp_path_factory.mktemp("centre")
    app, _ = snapshot_app(root / "app")
    fed = federation_yaml(root, app, WIRE_SITES, rounds=1, min_sites=1, run_name="wire", round_timeout_s=600.0,
                          cross_eval=False)
    init_pki(root / "certs", [], [GATEWAY_HOST])
    for name in WIRE_SITES:
        allow(fed, name, make_site(root, name, root / "no-data", fed, ["0" * 64]))
    server = Launched(root / "server.out", "fedseg-server", "start", "--config", str(fed))
    try:
        wait_for(lambda: "sites connect to" in server.output(), 180, "the centre to come up", server)
        cfg = yaml.safe_load(fed.read_text())
        yield {"root": root, "cfg": cfg, "server": server, "run": root / "runs" / "wire",
               "address": (GATEWAY_HOST, cfg["server"]["fleet_port"]), "ca": str(root / "certs" / "ca.crt")}
    finally:
        server.terminate()


def _tls(centre, timeout: float = 20.0):
    """A raw TLS connection to the gateway, as any network peer can open."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=centre["ca"])
    raw = socket.create_connection(centre["address"], timeout=timeout)
    return context.wrap_socket(raw, server_hostname=centre["address"][0])


def _closed_within(sock, seconds: float) -> bool:
    """Whether the gateway answers or closes ``sock`` within ``seconds`` (reads until EOF or timeout)."""
    import time

    deadline = time.monotonic() + seconds
    sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(4096):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_finding_7_the_gateway_holds_against_a_flooding_peer(centre):
    import concurrent.futures

    import httpx

    url = f"https://{centre['address'][0]}:{centre['address'][1]}"
    with httpx.Client(verify=centre["ca"], timeout=10) as peer:
        # Exactly the endpoints a registered SuperNode uses: self-registration is not one of them.
        assert peer.post(url + "/v1/fleet/register-node", content=b"").status_code == 403
        assert peer.post(url + "/v1/fleet/get-run", content=b"",
                         headers={"content-type": "application/protobuf"}).status_code == 401
        # A forged log line in the path stays on one line of gateway.log.
        assert peer.post(url + "/v1/control/x%0A2026-01-01 INFO forged: admin login", content=b"").status_code == 403

    from server.fleet_gateway import HEADER_TIMEOUT_S, MAX_CONNECTIONS

    def oversized() -> bytes:
        with _tls(centre) as sock:  # announces 10 GB, sends nothing: refused before a byte of body is read
            sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
            sock.settimeout(5)
            return sock.recv(64)

    def slow_head() -> bool:
        with _tls(centre) as sock:  # slowloris: a head that never ends
            sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n")
            return _closed_within(sock, HEADER_TIMEOUT_S + 5)

    def stalled_body() -> bytes:
        with _tls(centre) as sock:
            sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            sock.settimeout(20)
            return sock.recv(64)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(oversized), pool.submit(slow_head), pool.submit(stalled_body)]
        too_large, head_cut, body_cut = (f.result(timeout=60) for f in answers)
    assert too_large.startswith(b"HTTP/1.1 413")
    assert head_cut
    assert body_cut.startswith(b"HTTP/1.1 408")

    idle = [_tls(centre) for _ in range(MAX_CONNECTIONS)]  # bounded: exactly the limit
    try:
        with httpx.Client(verify=centre["ca"], timeout=10) as peer:
            assert peer.post(url + "/v1/fleet/get-run", content=b"").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    log = (centre["root"] / "server-state" / "gateway.log").read_text()
    assert "forged" in log and not any(line.startswith("2026-01-01 INFO forged") for line in log.splitlines())


def test_finding_11_sites_get_only_what_they_need(centre):
    import tomllib

    from common.config import from_yaml_text
    from common.plan import Plan
    from server.planning import plan_config

    shipped = tomllib.loads((centre["run"] / "run-config.toml").read_text())[keys.RUN_CONFIG_KEY]
    for secret in (str(centre["root"]), *WIRE_SITES):  # no centre path, no site's name
        assert secret not in shipped, secret
    assert from_yaml_text(shipped, "run config").model.channels == centre["cfg"]["model"]["channels"]

    plan = Plan((1.0, 1.0, 1.0), (16, 16, 16), (), (32, 32, 32),
                provenance={"sites": WIRE_SITES, "num_cases": 9, "class_fraction": [0.97, 0.03]})
    sent = Plan.from_json(str(plan_config(plan)[keys.PLAN]))
    assert sent == plan and sent.provenance == {}


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


# --- finding 13: the containers' install (pip install ., not editable) runs a deployed federation ----------------

SHIPPED = ("pyproject.toml", "README.md", "common", "server", "client", "simulations")
"""What deploy/Dockerfile.* copy into /opt/fedseg before ``pip install .``."""


def _fresh_install(root) -> object:
    """A new venv with fedseg installed from a copy of the release exactly as the Dockerfiles do; torch and
    the other dependencies come from the shared venv (a .pth file), so nothing large is downloaded."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    from importlib import metadata
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    release = root / "opt-fedseg"
    release.mkdir()
    for name in SHIPPED:
        if (repo / name).is_dir():
            shutil.copytree(repo / name, release / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(repo / name, release / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q"]
    subprocess.run([*pip, "."], cwd=release, env=env, check=True, timeout=600)
    # Flower's executables, for the fresh interpreter (the package itself is the shared one's version).
    subprocess.run([*pip, "--ignore-installed", f"flwr=={metadata.version('flwr')}"], env=env, check=True,
                   timeout=600)
    return venv / "bin", release


def test_finding_13_a_non_editable_install_runs_a_deployed_federation(tmp_path, tiny_federation, monkeypatch):
    import yaml

    from common.bundle import bundle_sha256
    from server.certs import init_pki
    from tests.deploy_harness import (
        GATEWAY_HOST,
        Launched,
        allow,
        events,
        federation_yaml,
        make_site,
        run_cli,
        wait_for,
        write_yaml,
    )

    bin_dir, release = _fresh_install(tmp_path)
    fed = federation_yaml(tmp_path, release, ["site-1"], rounds=1, min_sites=1, run_name="installed",
                          cross_eval=False)
    body = yaml.safe_load(fed.read_text())
    body["server"]["app_dir"] = ""  # as in deploy/federation.yaml: the installation's own release
    write_yaml(fed, body)
    init_pki(tmp_path / "certs", [], [GATEWAY_HOST])
    site = make_site(tmp_path, "site-1", tiny_federation["site-1"], fed, [bundle_sha256(release)])
    allow(fed, "site-1", site)

    monkeypatch.delenv("PYTHONPATH", raising=False)  # from here on, only the installed copy runs
    approve = run_cli(str(bin_dir / "fedseg-client"), "approve", "--config", str(site))
    assert approve.returncode == 0 and bundle_sha256(release) in approve.stdout, approve.stderr
    server = Launched(tmp_path / "server.out", str(bin_dir / "fedseg-server"), "start", "--config", str(fed))
    daemon = Launched(tmp_path / "site.out", str(bin_dir / "fedseg-client"), "start", "--config", str(site))
    try:
        wait_for(lambda: server.proc.poll() is not None, 400, "the installed federation to finish", server, daemon)
    finally:
        daemon.terminate()
        server.terminate()
    assert server.proc.returncode == 0, server.output()[-3000:]
    log = events(tmp_path / "runs" / "installed")
    assert [e["site"] for e in log if e["event"] == "train"] == ["site-1"]
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed"

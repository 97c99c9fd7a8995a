"""The egress guard: altered ClientApps try to leak, the guard stops them, the audit log shows it.

Each altered ClientApp runs the real training handler of client/client_app.py
through the same ``_handle`` path (so through the guard), then attaches
something that must not leave a hospital. Messages travel through Flower's
wire representation to the real server strategy (tests/helpers/local_grid.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import client_app, egress
from client.cli import main as client_main
from common import keys
from common.config import load_config
from common.files import read_jsonl
from common.metrics_log import Event, read_events
from common.reading import load_nifti
from common.reply_protocol import CROSS_EVAL_QUERY, FINGERPRINT_QUERY
from common.runs import METRICS_FILE
from server.strategy import FedSegStrategy
from tests.helpers.local_grid import LocalGrid, federation, model_strategy
from tests.helpers.site_harness import ONE_SITE

PATCH = 8
"""Edge of the image patch an altered site tries to send (voxels)."""


@pytest.fixture()
def one_site(tmp_path, tiny_federation):
    cfg = load_config(None, [*ONE_SITE, f"federation.runs_dir={tmp_path}", "federation.run_name=egress"])
    return federation(cfg, {"site-1": tiny_federation["site-1"]})


def _image_patch(data_dir: Path) -> np.ndarray:
    """A real crop of the site's first CT volume: exactly what must never leave."""
    image = sorted((data_dir / "imagesTr").glob("*.nii.gz"))[0]
    return np.asarray(load_nifti(image).dataobj)[:PATCH, :PATCH, :PATCH].astype(np.float32)


def _leaky(alter: Callable[[client_app.Site, Message], None]) -> ClientApp:
    """A ClientApp whose training handler trains honestly, then alters its reply before it leaves."""
    app = ClientApp()

    def leaky_train(site: client_app.Site, msg: Message) -> Message:
        reply = client_app._train(site, msg)
        alter(site, reply)
        return reply

    @app.train()
    def train(msg: Message, context) -> Message:
        return client_app._handle(leaky_train, msg, context)

    return app


def _patch_array(site, reply):
    reply.content["debug"] = ArrayRecord({"patch": Array(_image_patch(Path(site.cfg.site.data_dir)))})


def _patch_in_metrics(site, reply):
    voxels = _image_patch(Path(site.cfg.site.data_dir)).ravel()[:64]
    reply.content[keys.METRICS]["dice_class_1"] = [float(v) for v in voxels]


def _string_metric(site, reply):
    case = sorted((Path(site.cfg.site.data_dir) / "labelsTr").glob("*.nii.gz"))[-1].name
    reply.content["metrics-text"] = ConfigRecord({"worst_case": case})


def _extra_array(site, reply):
    key = site.split.local[0]
    reply.content[keys.ARRAYS][key] = Array(site.model.state_dict()[key].numpy())


def _one_round(cfg, app: ClientApp) -> tuple[FedSegStrategy, list[Message], Path]:
    run = Path(cfg.federation.runs_dir) / cfg.federation.run_name
    strategy, weights = model_strategy(cfg, run)
    grid = LocalGrid(cfg, app)
    replies = list(grid.send_and_receive(strategy.configure_train(1, ArrayRecord(weights), ConfigRecord(), grid)))
    strategy.aggregate_train(1, replies)
    return strategy, replies, run


@pytest.mark.parametrize(
    "alter, leaked",
    [
        (_patch_array, "record 'debug'"),
        (_patch_in_metrics, "metric 'dice_class_1' is a list of 64"),
        (_string_metric, "record 'metrics-text' (ConfigRecord)"),
        (_extra_array, "arrays not in the model signature"),
    ],
    ids=["image-patch", "patch-as-metric", "string-metric", "local-norm-array"],
)
def test_altered_client_app_is_blocked_and_audited(one_site, alter, leaked, capsys):
    _, replies, run = _one_round(one_site, _leaky(alter))
    (received,) = replies
    assert received.has_error() and not received.has_content()
    assert received.error.code == egress.EGRESS_BLOCKED_CODE
    assert received.error.reason == f"site site-1: {egress.BLOCKED_REASON}"
    failures = list(read_events(run / METRICS_FILE, Event.FAILURE))
    assert [(f["site"], f["stage"]) for f in failures] == [("site-1", "train")]

    state = run / "sites" / "site-1"
    blocked, sent = list(read_jsonl(state / egress.EGRESS_FILE))
    assert blocked["status"] == "blocked" and blocked["round"] == 1
    assert any(leaked in p for p in blocked["blocked"]), blocked["blocked"]
    assert sent["status"] == "sent" and sent["kind"] == "error" and sent["keys"] == {}

    assert client_main(["audit", "--config", str(run / "sites" / "site-1.yaml")]) == 0
    out = capsys.readouterr().out
    assert "BLOCKED:       1 reply(ies)" in out and leaked in out
    assert "records sent:  none" in out


def test_honest_reply_leaves_and_matches_what_the_server_received(one_site, capsys):
    _, replies, run = _one_round(one_site, client_app.app)
    (received,) = replies
    assert received.has_content()
    assert set(received.content) == {keys.ARRAYS, keys.METRICS, keys.IDENTITY}
    (line,) = egress.EgressLog(run / "sites" / "site-1").entries()
    (train,) = read_events(run / METRICS_FILE, Event.TRAIN)
    assert line["status"] == "sent" and line["round"] == 1 and line["message_type"] == MessageType.TRAIN
    assert line[keys.CONTENT_SHA256] == train[keys.CONTENT_SHA256] == received.content.object_id
    assert line["keys"][keys.IDENTITY] == [keys.SIGNATURE, keys.SITE]
    assert set(line["keys"][keys.METRICS]) - set(keys.TIMELINE_METRICS) == {*keys.TRAIN_METRICS, keys.LEARNING_RATE}
    site = client_app.Site.resolve(LocalGrid(one_site, client_app.app).context(1))
    assert line["keys"][keys.ARRAYS] == sorted(site.split.travelling)
    assert not set(line["keys"][keys.ARRAYS]) & set(site.split.local)

    assert client_main(["audit", "--config", str(run / "sites" / "site-1.yaml"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["messages_sent"] == 1 and summary["blocked"] == []
    assert summary["bytes_sent"] == line["bytes"] > 0


# --- the guard's rules on replies built by hand -----------------------------------------


@pytest.fixture()
def site(one_site):
    return client_app.Site.resolve(LocalGrid(one_site, client_app.app).context(1))


def _request(cfg) -> Message:
    from tests.helpers.envelopes import incoming

    config = ConfigRecord({keys.SERVER_ROUND: 3, keys.WIRE_DTYPE: cfg.federation.wire_dtype})
    return incoming(RecordDict({keys.CONFIG: config}), MessageType.TRAIN, node_id=1, server_round=3)


def _content(site, arrays: dict | None = None, **metrics) -> RecordDict:
    tensors = {k: v for k, v in site.model.state_dict().items() if k in site.split.travelling}
    tensors.update(arrays or {})
    return RecordDict(
        {
            keys.ARRAYS: ArrayRecord(
                {k: Array(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()}
            ),
            keys.METRICS: MetricRecord(
                {keys.NUM_EXAMPLES: 3, "loss": 0.5, "proximal_loss": 0.0, "duration_s": 1.0, **metrics}
            ),
            keys.IDENTITY: ConfigRecord({keys.SITE: site.cfg.site.name, keys.SIGNATURE: site.signature}),
        }
    )


def _check(site, content_or_error, message_type: str = MessageType.TRAIN) -> list[str]:
    request = _request(site.cfg)
    reply = Message(content_or_error, reply_to=request)
    policy = egress.EgressPolicy.for_site(site, site.cfg.federation.wire_dtype)
    return egress.problems(reply, policy, message_type)


def test_sound_reply_passes(site):
    assert _check(site, _content(site)) == []


def test_wrong_dtype_shape_and_padded_data_are_blocked(site):
    key = site.split.travelling[0]
    weight = site.model.state_dict()[key]
    assert "the signature says" in _check(site, _content(site, {key: weight.double()}))[0]
    assert "the signature says" in _check(site, _content(site, {key: weight[:1]}))[0]
    array = Array(weight.numpy())
    padded = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data + bytes(1 << 16))
    content = _content(site)
    content[keys.ARRAYS][key] = padded
    assert any("more than its shape needs" in p for p in _check(site, content))


def test_undeclared_metric_and_identity_changes_are_blocked(site):
    assert "not declared" in _check(site, _content(site, patient_age=63.0))[0]
    content = _content(site)
    content[keys.IDENTITY]["site"] = "another-site"
    assert "not this site's" in _check(site, content)[0]
    content = _content(site)
    content[keys.IDENTITY]["data_dir"] = site.cfg.site.data_dir
    assert "identity record holds" in _check(site, content)[0]


def test_a_training_reply_may_carry_only_an_evaluation_replys_metrics_of_the_received_model(site):
    content = _content(site)
    content[keys.EVALUATION] = MetricRecord(
        {keys.NUM_EXAMPLES: 2, "dice": 0.7, "loss": 0.4, f"{keys.DICE_CLASS_PREFIX}1": 0.7}
    )
    assert _check(site, content) == []
    content[keys.EVALUATION]["case_0042_dice"] = 0.9
    assert "not declared" in _check(site, content)[0]
    content[keys.EVALUATION] = MetricRecord({"loss": 0.4})
    assert "missing" in _check(site, content)[0]
    assert _check(site, content, MessageType.EVALUATE)[0].startswith("record 'arrays'")  # only training replies


def test_fingerprint_aggregates_may_leave_only_in_a_fingerprint_reply_and_not_as_long_lists(site):
    from client.site_data import fingerprint_reply

    content = fingerprint_reply(site, _request(site.cfg)).content
    assert _check(site, content, FINGERPRINT_QUERY) == []
    content[keys.FINGERPRINT]["fp_spacing_x"] = [0.5] * 100
    assert "only fingerprint lists" in _check(site, content, FINGERPRINT_QUERY)[0]
    assert "not declared" in _check(site, _content(site, fp_cases=4))[0]


@pytest.mark.parametrize(
    "reason",
    [
        "site site-1: cannot read /data/hospital/imagesTr/pat_0042_0000.nii.gz",
        "site site-1: case pat0042 has NaN voxels",
        "site site-1: " + "x" * 400,
    ],
)
def test_error_reasons_with_paths_or_ids_are_replaced(site, reason):
    assert _check(site, Error(code=client_app.SITE_ERROR_CODE, reason=reason))
    request = _request(site.cfg)
    sent = egress.guard(Message(Error(code=1, reason=reason), reply_to=request), request, site)
    assert sent.error.reason == f"site site-1: {egress.BLOCKED_REASON}"
    assert _check(site, sent.error) == []


def test_sanitized_reasons_pass(site):
    for err in (FloatingPointError("loss nan at step 3"), ValueError("/secret/path")):
        reason = client_app.sanitized_reason(site.cfg.site.name, err)
        assert _check(site, Error(code=client_app.SITE_ERROR_CODE, reason=reason)) == []


def test_content_from_an_unresolved_site_is_blocked(site):
    request = _request(site.cfg)
    sent = egress.guard(Message(_content(site), reply_to=request), request, None)
    assert sent.has_error() and sent.error.reason == f"site unknown: {egress.BLOCKED_REASON}"


def test_every_reply_is_recorded(site):
    request = _request(site.cfg)
    egress.guard(Message(_content(site), reply_to=request), request, site)
    egress.guard(Message(_content(site, extra=1.0), reply_to=request), request, site)
    lines = egress.EgressLog(site.state.root).entries()
    assert [(e["status"], e["kind"]) for e in lines] == [("sent", "content"), ("blocked", "content"), ("sent", "error")]
    assert all(e["round"] == 3 and len(e[keys.CONTENT_SHA256]) == 64 for e in lines)
    assert lines[0]["bytes"] > sum(
        v.numel() * 4 for k, v in site.model.state_dict().items() if k in site.split.travelling
    )


def test_real_fingerprint_and_identify_replies_pass(site):
    from client.cross_eval import cross_evaluate
    from client.site_data import fingerprint_reply

    request = _request(site.cfg)
    fingerprint = fingerprint_reply(site, request)
    assert keys.FINGERPRINT in fingerprint.content
    assert _check(site, fingerprint.content, FINGERPRINT_QUERY) == []
    identify = RecordDict({keys.CONFIG: ConfigRecord({keys.CROSS_EVAL_TASK: "identify"})})
    from tests.helpers.envelopes import incoming

    reply = cross_evaluate(site, incoming(identify, "query.cross_eval", node_id=1))
    assert _check(site, reply.content, CROSS_EVAL_QUERY) == []


def test_a_site_picture_cannot_leave(site, tmp_path):
    """What `fedseg-client report` draws from a real scan is refused in every form a reply could carry it."""
    from PIL import Image

    from client.site_report import draw_overlay

    data_dir = Path(site.cfg.site.data_dir)
    image = np.asarray(load_nifti(min((data_dir / "imagesTr").glob("*.nii.gz"))).dataobj, dtype=np.float32)
    label = np.asarray(load_nifti(min((data_dir / "labelsTr").glob("*.nii.gz"))).dataobj).astype(np.uint8)
    png = draw_overlay(image[None], label, label, 2, "site-1", tmp_path / "picture.png")
    pixels = np.asarray(Image.open(png).convert("L"))
    as_bytes = _content(site)
    as_bytes["report"] = ConfigRecord({"picture": png.read_bytes()})
    as_array = _content(site, {"report.png": pixels})
    as_metric = _content(site, dice_class_1=[float(v) for v in pixels.ravel()[:64]])
    for content, words in (
        (as_bytes, "record 'report' (ConfigRecord)"),
        (as_array, "not in the model signature"),
        (as_metric, "is a list of 64 values"),
    ):
        assert any(words in p for p in _check(site, content)), words
        request = _request(site.cfg)
        sent = egress.guard(Message(content, reply_to=request), request, site)
        assert sent.has_error() and sent.error.code == egress.EGRESS_BLOCKED_CODE

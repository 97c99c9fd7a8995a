"""Cross-site evaluation: the matrix of a real simulation with a held-out site (``own_run``: SuperLink, Ray,
NIfTI, shared with test_own_sites), norm adaptation, and hostile cross-eval replies."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from common import keys
from common.config import load_config
from common.files import read_jsonl
from common.model import build_model
from common.norm_adapt import adapt_norm
from common.runs import CROSS_EVAL_FILE
from server.cross_eval import resolve_checkpoint
from server.report import write_report


@pytest.mark.simulation
def test_matrix_has_every_site_and_the_held_out_one_adapted(own_run):
    cells = json.loads((own_run / CROSS_EVAL_FILE).read_text())["cells"]
    last = [c for c in cells if c["model"].startswith("last")]
    trained = {c["site"] for c in last if c["trained"]}
    held_out = [c for c in last if not c["trained"]]
    assert trained == {"north", "south", "dicom"}
    assert [c["site"] for c in held_out] == ["east"]
    assert held_out[0]["dice_adapted"] is not None and 0.0 <= held_out[0]["dice_adapted"] <= 1.0
    assert all(c["dice_adapted"] is None for c in last if c["trained"])
    # the held-out site never trained: no train event, no local norm tensors in its state
    events = list(read_jsonl(own_run / "metrics.jsonl"))
    assert not any(e["event"] == "train" and e["site"] == "east" for e in events)
    assert not list((own_run / "sites" / "east").glob("runs/*/norm/*")), "the held-out site kept norm tensors"
    assert list((own_run / "sites" / "north").glob("runs/own-*/norm/round-0002.safetensors"))
    # the trained sites' evaluation of the last round equals their cross-eval cell (same model, same norm)
    final_round = max(e["round"] for e in events if e["event"] == "round")
    for c in last:
        if c["trained"]:
            ev = next(
                e for e in events if e["event"] == "evaluate" and e["round"] == final_round and e["site"] == c["site"]
            )
            assert c["dice"] == pytest.approx(ev["dice"], abs=1e-6)


@pytest.mark.simulation
def test_only_numbers_left_the_sites(own_run, tmp_path):
    """Every cross-eval reply, per the site's own egress audit, held metrics and identity only: no arrays."""
    for site in ("north", "east"):
        egress = own_run / "sites" / site / "egress.jsonl"
        assert egress.is_file(), f"every site keeps an egress audit log: {egress} is missing"
        sent = list(read_jsonl(egress))
        cross = [e for e in sent if e["message_type"] == "query.cross_eval"]
        assert cross and all(e["status"] == "sent" for e in cross)
        for entry in cross:
            assert set(entry["keys"]) == {"metrics", "identity"}
            assert set(entry["keys"]["metrics"]) <= {
                *keys.CROSS_EVAL_METRICS,
                *keys.TIMELINE_METRICS,
                "dice_class_1",
                "test_dice_class_1",
            }
    centre = shutil.copytree(own_run, tmp_path / "run", ignore=shutil.ignore_patterns("sites", "flwr-home"))
    report = write_report(centre).read_text()  # on a copy: the shared run stays as the simulation left it
    assert "east" in report and "no (held out)" in report


@pytest.mark.simulation
def test_checkpoint_names_resolve_with_a_clear_error(own_run):
    assert resolve_checkpoint(own_run, "last").is_file()
    assert resolve_checkpoint(own_run, "round-0001").is_file()
    with pytest.raises(FileNotFoundError, match="round-NNNN"):
        resolve_checkpoint(own_run, "round-0099")


def test_norm_adaptation_reestimates_only_batch_norm_statistics(tiny_federation):
    cfg = load_config(
        None,
        [
            "model.channels=[4, 8, 16]",
            "model.in_channels=1",
            "model.out_channels=2",
            "model.strides=[2, 2]",
            "model.num_res_units=1",
            "model.norm=batch",
            "data.patch_size=[16, 16, 16]",
            "data.spacing=[1.5, 1.5, 1.5]",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images = [torch.randn(1, 20, 20, 20).numpy() * 3 + 5 for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert adapt_norm(model, images, cfg.data, steps=3, batch_size=2, seed=0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert any(k.endswith("running_mean") for k in changed)
    mean = torch.cat([v.flatten() for k, v in after.items() if k.endswith("running_mean")])
    assert mean.abs().max() > 0.5, "statistics should follow the site's intensities (mean ~5), not the init (0)"
    instance = build_model(
        load_config(
            None,
            [
                "model.channels=[4, 8, 16]",
                "model.in_channels=1",
                "model.out_channels=2",
                "model.strides=[2, 2]",
                "model.norm=instance",
            ],
        ).model
    )
    kept = {k: v.clone() for k, v in instance.state_dict().items()}
    assert not adapt_norm(instance, images, cfg.data, steps=3, batch_size=2, seed=0)
    assert all(torch.equal(kept[k], v) for k, v in instance.state_dict().items())


def test_a_hostile_cross_eval_reply_is_left_out_not_fatal():
    """Dice values outside [0, 1], NaN, lists or infinite counts make a failed cell, never an exception."""
    from flwr.app import MetricRecord, RecordDict

    from server.cross_eval import MESSAGE_TYPE, Cell, _cell
    from tests.helpers.envelopes import reply as site_reply

    def reply(**metrics):
        return site_reply(RecordDict({keys.METRICS: MetricRecord(metrics)}), 1, MESSAGE_TYPE)

    for bad in (
        {"dice": 1e6},
        {"dice": float("nan")},
        {"dice": [0.5, 0.5]},
        {"dice": 0.5, "dice_personal": -1.0},
        {"dice": 0.5, keys.NUM_EXAMPLES: float("inf")},
        {"dice": 0.5, "dice_class_1": 2.0},
    ):
        assert isinstance(_cell("last", reply(**bad), "site-1", {}), str), bad
    assert isinstance(_cell("last", reply(dice=0.5, dice_personal=0.6), "site-1", {}), Cell)

"""The ClientApp's handlers on real NIfTI data: local tensors survive restarts, errors stay sanitized."""

from __future__ import annotations

import pytest
import torch
from flwr.app import MessageType
from safetensors.torch import load_file

from client.site_state import SiteState
from common import keys
from common.params import run_model
from common.wire import unpack
from tests.helpers.site_harness import context, handle, run_fresh, server_message, site_setup


@pytest.mark.processes
def test_norm_tensors_survive_a_fresh_client_process(tmp_path, tiny_federation):
    cfg, site_yaml = site_setup(tmp_path, tiny_federation["site-1"])
    assert run_fresh(cfg, site_yaml, "train", 1)["error"] is None
    saved = load_file(SiteState(tmp_path / "site-1-state").run(cfg).norm_path(1))
    norm_keys = (".weight", ".bias", ".running_mean", ".running_var", ".num_batches_tracked")  # FedBN: all stay
    assert saved and all(k.endswith(norm_keys) for k in saved) and any(k.endswith(".running_mean") for k in saved)
    assert any(
        not torch.equal(v, torch.ones_like(v)) and not torch.equal(v, torch.zeros_like(v)) for v in saved.values()
    ), "training should have moved the site's norm weights"
    restored = tmp_path / "restored.safetensors"
    run_fresh(cfg, site_yaml, "evaluate", 2, out=restored)
    again = load_file(restored)
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_reply_carries_only_travelling_arrays_and_numbers(tmp_path, tiny_federation):
    cfg, site_yaml = site_setup(tmp_path, tiny_federation["site-2"], "site-2")
    reply = handle(cfg, site_yaml, MessageType.TRAIN)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    _, split, _ = run_model(cfg)
    sent = reply.content  # as it leaves: packed, with the layout that names the travelling tensors
    assert set(sent.config_records) == {keys.IDENTITY, keys.LAYOUT}
    assert sorted(sent[keys.LAYOUT]["names"]) == sorted(split.travelling)
    arrays = unpack(sent).array_records[keys.ARRAYS]
    assert set(arrays) == set(split.travelling)
    assert not set(arrays) & set(split.local)
    metrics = reply.content.metric_records[keys.METRICS]
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert metrics[keys.NUM_EXAMPLES] == 3
    evaluation = handle(cfg, site_yaml, MessageType.EVALUATE)
    assert 0.0 <= evaluation.content.metric_records[keys.METRICS]["dice"] <= 1.0


def test_a_training_message_scores_the_received_model_first_as_an_evaluation_message_would(tmp_path, tiny_federation):
    from client import client_app

    cfg, site_yaml = site_setup(tmp_path, tiny_federation["site-1"])
    assert not handle(cfg, site_yaml, MessageType.TRAIN).has_error()  # now the site has norm tensors of its own
    separate = handle(cfg, site_yaml, MessageType.EVALUATE, 2).content[keys.METRICS]
    asked = server_message(cfg, MessageType.TRAIN, 2)
    asked.content[keys.CONFIG][keys.EVALUATE_RECEIVED] = True
    reply = client_app.train(asked, context(cfg, site_yaml))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    riding = reply.content.metric_records[keys.EVALUATION]
    for name in ("dice", "loss", keys.NUM_EXAMPLES, f"{keys.DICE_CLASS_PREFIX}1"):
        assert riding[name] == pytest.approx(separate[name], abs=1e-6), name
    assert keys.EVALUATION not in handle(cfg, site_yaml, MessageType.TRAIN, 3).content  # not asked: not sent


def test_failure_reason_holds_no_paths_or_case_names(tmp_path, tiny_federation):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_federation["site-3"], broken)
    victim = sorted((broken / "imagesTr").glob("*.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    cfg, site_yaml = site_setup(tmp_path, broken, "site-3")
    reply = handle(cfg, site_yaml, MessageType.TRAIN)
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("site site-3:")
    assert "/" not in reason and "Traceback" not in reason and victim.stem.split("_0000")[0] not in reason
    site_log = (tmp_path / "site-3-state" / "site.log").read_text()
    assert "Traceback" in site_log, "the full story stays in the site's own log"


def test_each_site_log_gets_only_its_own_sites_records(tmp_path, tiny_federation):
    """One process serving two sites (a Ray actor does) must not write one site's traceback into the other's log."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_federation["site-3"], broken)
    victim = sorted((broken / "imagesTr").glob("*.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    cfg_ok, yaml_ok = site_setup(tmp_path, tiny_federation["site-1"], "site-1")
    cfg_bad, yaml_bad = site_setup(tmp_path, broken, "site-3")
    assert not handle(cfg_ok, yaml_ok, MessageType.EVALUATE).has_error()
    assert handle(cfg_bad, yaml_bad, MessageType.EVALUATE).has_error()
    assert not handle(cfg_ok, yaml_ok, MessageType.EVALUATE).has_error()
    assert "Traceback" in (tmp_path / "site-3-state" / "site.log").read_text()
    assert "Traceback" not in (tmp_path / "site-1-state" / "site.log").read_text()
    # every fedseg logger reaches the site's log, common/ code run for the site included (one naming rule)
    assert "INFO fedseg.common: preprocessing case" in (tmp_path / "site-1-state" / "site.log").read_text()

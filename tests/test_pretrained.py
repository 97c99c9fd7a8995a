"""model.init_weights: the centre's start model from an export folder, a run folder, a safetensors file or a
MONAI bundle's models/model.pt, mapped by name and shape, and a file that would run code refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from client.cli import main as client_main
from common.config import load_config
from common.metrics_log import MetricsLog, read_events
from common.params import run_model, select
from common.runs import METRICS_FILE, site_view
from server.pretrained import EVENT, PretrainedError, start_weights
from tests.helpers.run_folders import TINY

OTHER_SEED = "train.seed=7"
"""The new run's own seeded init differs from the file's values, so a loaded tensor is told from a seeded one."""


def _cfg(*overrides: str):
    return load_config(None, [*TINY, OTHER_SEED, *overrides])


def _start(tmp_path, *overrides: str):
    """start_weights as the ServerApp calls it, with the metrics log event it writes."""
    log = MetricsLog(tmp_path / "new-run")
    weights, signature = start_weights(_cfg(*overrides), log)
    log.close()
    events = [e for e in read_events(tmp_path / "new-run" / METRICS_FILE) if e["event"] == EVENT]
    return weights, signature, events


def _seeded(*overrides: str) -> tuple[dict[str, torch.Tensor], str]:
    model, split, signature = run_model(_cfg(*overrides))
    return select(model, split.travelling), signature


def test_start_from_an_export_folder_and_from_a_run_folder(tmp_path, trained_site):
    run, site, _ = trained_site
    exported = tmp_path / "exported"
    assert client_main(["export", "--config", str(site), "--run", str(run), "--out", str(exported)]) == 0
    file = load_file(str(exported / "model.safetensors"))
    seeded, seeded_signature = _seeded()
    for folder in (exported, run):
        weights, signature, events = _start(tmp_path, f"model.init_weights={folder}")
        assert signature == seeded_signature  # the signature every site checks is unchanged
        assert weights.keys() == seeded.keys()
        assert all(torch.equal(weights[k], file[k]) for k in weights)
        assert any(not torch.equal(weights[k], seeded[k]) for k in weights)
        (event,) = events[-1:]
        assert event["loaded"] == len(weights) and event["new"] == [] and event["skipped"] == []
    # the export holds the site's norm tensors too: FedBN keeps those at the sites, so they are reported, not sent
    assert _start(tmp_path, f"model.init_weights={exported}")[2][-1]["at_sites"] > 0


def test_a_partly_matching_safetensors_file_reports_skipped_and_new(tmp_path):
    bigger = run_model(_cfg("model.channels=[8, 16, 48]", "train.seed=3"))[0].state_dict()
    bigger["extra.weight"] = torch.ones(3)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in bigger.items()}, str(path))
    seeded, _ = _seeded()
    weights, _, (event,) = _start(tmp_path, f"model.init_weights={path}")
    shapes_differ = {k for k in seeded if k in bigger and bigger[k].shape != seeded[k].shape}
    same = {k for k in seeded if k in bigger and bigger[k].shape == seeded[k].shape}
    assert shapes_differ and same
    assert all(torch.equal(weights[k], bigger[k]) for k in same)
    assert all(torch.equal(weights[k], seeded[k]) for k in shapes_differ)  # seeded, as if no file were given
    assert set(event["new"]) == shapes_differ and event["new_total"] == len(shapes_differ)
    full = run_model(_cfg())[0].state_dict()  # norm tensors too: the file's are skipped the same way
    misfits = {k for k, v in bigger.items() if k not in full or full[k].shape != v.shape}
    assert event["loaded"] == len(same) and event["skipped_total"] == len(misfits)
    skipped = {line.split(" ")[0]: line for line in event["skipped"]}
    assert skipped.keys() == misfits
    assert "no tensor of that name" in skipped["extra.weight"]
    assert all("shape" in skipped[k] for k in shapes_differ)


def test_a_bundle_model_pt_state_dict_is_loaded(tmp_path):
    source = run_model(_cfg("train.seed=3"))[0].state_dict()
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    torch.save({"module." + k: v for k, v in source.items()}, bundle / "models" / "model.pt")  # DataParallel names
    weights, _, (event,) = _start(tmp_path, f"model.init_weights={bundle}")
    assert all(torch.equal(weights[k], source[k]) for k in weights)
    assert event["source"].endswith("models/model.pt") and event["new"] == []
    nested = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": source, "epoch": 3}, nested)
    assert all(torch.equal(start_weights(_cfg(f"model.init_weights={nested}"))[0][k], source[k]) for k in weights)


class RunsCode:
    """What a hostile model.pt holds: unpickling it calls a function of the attacker's choice."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "the pickle ran"))


def test_a_model_pt_with_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    ran = tmp_path / "the-pickle-ran.txt"
    torch.save({**run_model(_cfg())[0].state_dict(), "payload": RunsCode(ran)}, path)
    with pytest.raises(PretrainedError) as err:
        start_weights(_cfg(f"model.init_weights={path}"))
    message = str(err.value)
    assert str(path) in message and "would run code" in message and "torch.save(model.state_dict()" in message
    assert "weights_only=False" not in message  # never advise loading it unsafely
    assert not ran.exists()


def test_hostile_or_unrelated_files_are_refused_with_the_file_named(tmp_path):
    state = run_model(_cfg())[0].state_dict()
    nan = tmp_path / "nan.safetensors"
    key = next(k for k, v in state.items() if v.is_floating_point())
    save_file(
        {**{k: v.contiguous() for k, v in state.items()}, key: torch.full_like(state[key], float("nan"))}, str(nan)
    )
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"encoder.layer.0.weight": torch.ones(4, 4)}, str(unrelated))
    not_weights = tmp_path / "notes.pt"
    not_weights.write_bytes(b"this is not a torch file")
    for path, words in (
        (nan, f"{key} holds NaN"),
        (unrelated, "none of the 1 tensors"),
        (not_weights, "not a torch.save file"),
        (tmp_path / "missing.pt", "does not exist"),
        (tmp_path, "folder without weights"),
    ):
        with pytest.raises(PretrainedError) as err:
            start_weights(_cfg(f"model.init_weights={path}"))
        assert str(path) in str(err.value) and words in str(err.value), str(err.value)


def test_the_comparison_can_start_a_federation_from_another_federation_model(tmp_path, capsys):
    from simulations.cli import main as sim_main
    from simulations.compare_run import PRETRAINED_METHOD, methods_for, with_overrides

    other = run_model(_cfg("train.seed=3"))[0]
    checkpoint = tmp_path / "other-run" / "checkpoints" / "last.safetensors"
    checkpoint.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(checkpoint))
    base = _cfg()
    assert PRETRAINED_METHOD not in {m.name for m in methods_for(base, [])}
    (method,) = [m for m in methods_for(base, [], str(checkpoint.parent.parent)) if m.name == PRETRAINED_METHOD]
    weights, _ = start_weights(with_overrides(base, list(method.overrides)))
    assert all(torch.equal(weights[k], other.state_dict()[k]) for k in weights)
    assert sim_main(["compare", "--quick", "--pretrained", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "--pretrained" in capsys.readouterr().err and not (tmp_path / "results.jsonl").exists()


def test_the_start_weights_path_stays_at_the_centre():
    """model.init_weights names a centre path; the site view sites receive has no such field (the weights travel as
    the model)."""
    cfg = load_config(None, ["model.init_weights=/centre/runs/federation-a"])
    view = site_view(cfg)
    assert cfg.model.init_weights and "init_weights" not in view.to_yaml() and "/centre/" not in view.to_yaml()

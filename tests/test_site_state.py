"""A site's model belongs to its run (issue 20): real ClientApp handlers, a real tiny U-Net, real NIfTI cases.

One site takes part in several runs of the same model: run A (three rounds,
best = round 2, cross-evaluated with personalization), then run B. A centre of
one site is played by the test: each round's checkpoint is the site's own
reply, saved as the server saves it (server/checkpoints.py).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ConfigRecord, MessageType, RecordDict
from safetensors.torch import load_file, save_file

from client import client_app
from client.cli import main
from client.site import Site
from client.site_data import SiteData, open_split
from client.site_model import load_run_model, load_site_model
from client.site_state import SiteState
from common import keys
from common.config import ConfigError, load_config
from common.dataset import split_cases
from common.evaluation import evaluate
from common.params import load_merged, run_model, select
from common.runs import CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, PLAN_FILE, ROUND_CHECKPOINT, run_dir
from common.wire import from_wire, to_wire, unpack
from server.checkpoints import Checkpoints
from server.server_app import initial_weights
from server.site_package import package_run
from tests.helpers.envelopes import incoming
from tests.helpers.nifti_cases import nnunet_dataset
from tests.helpers.site_harness import context
from tests.helpers.tiny import tiny

SITE = "site-1"
CROSS_EVAL = f"{MessageType.QUERY}.{keys.CROSS_EVAL_ACTION}"
RUN_SETTINGS = ("federation.rounds=3", "train.personalize_steps=2", "train.adapt_norm_steps=1")


class CentreOfOne:
    """A run folder as the centre writes it, driven through the real ClientApp handlers of one site."""

    def __init__(self, root: Path, site_yaml: Path, name: str, run_id: str, *overrides: str) -> None:
        self.cfg = load_config(
            None,
            tiny(
                f"federation.run_name={name}",
                f"federation.run_id={run_id}",
                f"federation.runs_dir={root / 'runs'}",
                *RUN_SETTINGS,
                *overrides,
            ),
        )
        self.site_yaml = site_yaml
        self.run = run_dir(self.cfg)
        self.run.mkdir(parents=True)
        (self.run / CONFIG_FILE).write_text(self.cfg.to_yaml())
        self.checkpoints = Checkpoints(self.run / CHECKPOINT_DIR)
        self.initial, self.signature = initial_weights(self.cfg)
        site_cfg = self.cfg.replace(site=load_config(site_yaml).site)
        SiteData.open(site_cfg, SiteState(Path(site_cfg.site.state_dir))).plan.save(self.run / PLAN_FILE)

    @property
    def state(self):
        return SiteState(Path(load_config(self.site_yaml).site.state_dir)).run(self.cfg)

    def message(self, message_type: str, server_round: int, weights: dict[str, torch.Tensor], **config):
        record = ConfigRecord(
            {
                keys.SERVER_ROUND: server_round,
                keys.PROXIMAL_MU: 0.0,
                keys.SIGNATURE: self.signature,
                keys.WIRE_DTYPE: "float32",
                keys.PLAN: (self.run / PLAN_FILE).read_text(),
                **config,
            }
        )
        return incoming(
            RecordDict({keys.ARRAYS: to_wire(weights), keys.CONFIG: record}),
            message_type,
            node_id=7,
            server_round=server_round,
        )

    def weights(self, server_round: int) -> dict[str, torch.Tensor]:
        if server_round == 0:
            return self.initial
        return load_file(self.checkpoints.dir / ROUND_CHECKPOINT.format(server_round))

    def train(self, server_round: int) -> None:
        reply = client_app.train(
            self.message(MessageType.TRAIN, server_round, self.weights(server_round - 1)),
            context(self.cfg, self.site_yaml),
        )
        assert not reply.has_error(), reply.error.reason
        self.checkpoints.save_round(server_round, from_wire(unpack(reply.content).array_records[keys.ARRAYS]))

    def cross_eval(self, server_round: int, task: str = "evaluate") -> dict[str, int | float | list[int] | list[float]]:
        msg = self.message(
            CROSS_EVAL,
            server_round,
            self.weights(server_round),
            **{keys.CROSS_EVAL_TASK: task, keys.CROSS_EVAL_MODEL: f"round {server_round}"},
        )
        reply = client_app.cross_eval(msg, context(self.cfg, self.site_yaml))
        assert not reply.has_error(), reply.error.reason
        return dict(reply.content.metric_records[keys.METRICS])


def site_yaml(root: Path, data_dir: Path) -> Path:
    path = root / f"{SITE}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"site": {"name": SITE, "data_dir": str(data_dir), "state_dir": str(root / "state"), "min_cohort": 1}}
        )
    )
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_federation):
    """Run A (3 rounds, best 2, cross-evaluated), its files as they were, then run B of the same model."""
    root = tmp_path_factory.mktemp("site-state")
    yaml_path = site_yaml(root, tiny_federation[SITE])
    a = CentreOfOne(root, yaml_path, "alpha", "aaaaaaaaaaaa")
    for server_round in (1, 2, 3):
        a.train(server_round)
    a.checkpoints.offer_best(2, 0.9)
    a.checkpoints.offer_best(3, 0.1)  # not better: best stays round 2
    scored = {r: a.cross_eval(r) for r in (3, 2)}  # the order the server sends: last, then best
    a_files = files(a.state.folder)
    b = CentreOfOne(root, yaml_path, "beta", "bbbbbbbbbbbb", "train.seed=1")
    first_b = Site.resolve(context(b.cfg, yaml_path))
    first_b.load_global(b.message(MessageType.TRAIN, 1, b.weights(0)))
    b_start = select(first_b.model, first_b.split.local)
    for server_round in (1, 2):
        b.train(server_round)
    return {"root": root, "site": yaml_path, "a": a, "b": b, "scored": scored, "a_files": a_files, "b_start": b_start}


def test_a_later_run_starts_from_the_global_initialisation_and_leaves_the_earlier_run_alone(runs):
    a, b = runs["a"], runs["b"]
    assert a.state.folder.name == "alpha-aaaaaaaaaaaa" and b.state.folder.name == "beta-bbbbbbbbbbbb"
    assert a.state.rounds() == [1, 2, 3] and b.state.rounds() == [1, 2]
    assert files(a.state.folder) == runs["a_files"], "run B changed a file of run A"
    model, split, _ = run_model(b.cfg)
    initial = select(model, split.local)
    a_last = load_file(a.state.norm_path(3))
    assert all(torch.equal(runs["b_start"][k], initial[k]) for k in initial), "run B did not start from the init"
    assert any(not torch.equal(runs["b_start"][k], a_last[k]) for k in a_last)
    assert not (SiteState(runs["root"] / "state").root / "norm.safetensors").exists()


def test_a_site_may_start_a_new_run_from_another_runs_tensors_and_says_which(runs, tmp_path):
    a = runs["a"]
    settings = yaml.safe_load(runs["site"].read_text())
    settings["site"]["norm_from_run"] = "alpha-aaaaaaaaaaaa"
    continuing = tmp_path / "continuing.yaml"
    continuing.write_text(yaml.safe_dump(settings))
    cfg = load_config(None, tiny("federation.run_name=delta", "federation.run_id=eeeeeeeeeeee", *RUN_SETTINGS))
    site = Site.resolve(context(cfg, continuing))
    site.load_global(a.message(MessageType.TRAIN, 1, a.weights(0)))
    started, a_last = select(site.model, site.split.local), load_file(a.state.norm_path(3))
    assert all(torch.equal(started[k], a_last[k]) for k in a_last)
    assert site.run.info()["started_from"] == {"run": "alpha-aaaaaaaaaaaa", "round": 3} and not site.run.trained
    settings["site"]["norm_from_run"] = "../elsewhere"
    continuing.write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match="norm_from_run"):
        load_config(continuing)


def test_export_of_the_first_run_after_the_second_is_the_model_it_scored(runs, tmp_path):
    a = runs["a"]
    out = tmp_path / "alpha-best"
    assert main(["export", "--config", str(runs["site"]), "--run", str(a.run), "--out", str(out)]) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert (
        provenance["run"],
        provenance["run_id"],
        provenance["weights"],
        provenance["round"],
        provenance["norm_round"],
    ) == ("alpha", "aaaaaaaaaaaa", "best", 2, 2)
    assert provenance["site_dice"] == pytest.approx(runs["scored"][2]["dice"], abs=1e-9)
    assert "round 2" in (out / "README.md").read_text() and "cross-site evaluation" in (out / "README.md").read_text()
    exported, _, _ = load_site_model(out)
    model, split, _ = run_model(a.cfg)
    load_merged(model, split, a.weights(2), load_file(a.state.norm_path(2)))  # round 2's weights, round 2's tensors
    expected, got = model.state_dict(), exported.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "the exported model is not round 2's pairing"
    round_3 = load_file(a.state.norm_path(3))
    assert any(not torch.equal(got[k], round_3[k]) for k in round_3), "best must not carry the last round's tensors"
    site_cfg = a.cfg.replace(site=load_config(runs["site"]).site)
    data = SiteData.open(site_cfg, SiteState(Path(site_cfg.site.state_dir)))
    dice = evaluate(exported, data.volumes(data.val_ids), data.cfg.data, a.cfg.train, data.spec.num_classes).dice
    assert dice == pytest.approx(runs["scored"][2]["dice"], abs=1e-6), "the export does not reproduce the scored Dice"


def test_two_runs_at_the_same_time_keep_apart(runs, tiny_federation, tmp_path):
    """Twins of run A (same settings) train side by side with a run of other settings; each twin equals A."""
    yaml_path = site_yaml(tmp_path, tiny_federation[SITE])
    twin = CentreOfOne(tmp_path, yaml_path, "alpha", "cccccccccccc")
    other = CentreOfOne(tmp_path, yaml_path, "gamma", "dddddddddddd", "train.seed=7", "train.lr=0.05")
    with ThreadPoolExecutor(2) as pool:
        for server_round in (1, 2):
            list(pool.map(lambda centre, r=server_round: centre.train(r), (twin, other)))
    a = runs["a"]
    for server_round in (1, 2):
        mine, original = load_file(twin.state.norm_path(server_round)), load_file(a.state.norm_path(server_round))
        assert all(torch.equal(mine[k], original[k]) for k in original), f"round {server_round} mixed the two runs"
        theirs = load_file(other.state.norm_path(server_round))
        assert any(not torch.equal(theirs[k], original[k]) for k in original)


def test_cross_site_identify_and_evaluate_of_another_model_leave_the_runs_tensors_untouched(runs):
    a = runs["a"]
    before = files(a.state.folder)
    other_cfg = load_config(
        None,
        [
            *tiny(*RUN_SETTINGS),
            "model.channels=[4, 8, 16]",
            "federation.run_name=alpha",
            "federation.run_id=aaaaaaaaaaaa",
        ],
    )
    other_weights, other_signature = initial_weights(other_cfg)
    for task, arrays in (("identify", a.weights(3)), ("evaluate", other_weights)):
        msg = a.message(
            CROSS_EVAL,
            3,
            arrays,
            **{keys.CROSS_EVAL_TASK: task, keys.CROSS_EVAL_MODEL: "last", keys.SIGNATURE: other_signature},
        )
        reply = client_app.cross_eval(msg, context(other_cfg, runs["site"]))
        if task == "identify":  # trained in this run, whatever model the question is about
            assert reply.content.metric_records[keys.METRICS]["trained"] == 1.0
        else:  # the site's own model is another one: refused, nothing of the run is read or moved
            assert reply.has_error() and "signature" in reply.error.reason
    assert files(a.state.folder) == before


def test_the_personalized_copy_predict_and_export_use_is_the_one_that_was_scored(runs, tmp_path, capsys):
    a, scored = runs["a"], runs["scored"][2]
    assert scored["dice_personal"] >= scored["dice"]
    loaded = load_run_model(a.run, None, runs["root"] / "state", personalized=True)
    copy = load_file(a.state.folder / "personalized.safetensors")
    state = loaded.model.state_dict()
    assert loaded.checkpoint.round == 2 and all(torch.equal(state[k], copy[k]) for k in state)
    site_cfg = a.cfg.replace(site=load_config(runs["site"]).site)
    data = SiteData.open(site_cfg, SiteState(Path(site_cfg.site.state_dir)))
    assert loaded.personal["validation_cases"] == data.val_ids
    dice = evaluate(loaded.model, data.volumes(data.val_ids), data.cfg.data, a.cfg.train, data.spec.num_classes).dice
    assert dice == pytest.approx(scored["dice_personal"], abs=1e-6)
    scans = tmp_path / "scans"
    scans.mkdir()
    case = data.spec.case(data.val_ids[0])
    (scans / case.images[0].name).write_bytes(case.images[0].read_bytes())
    assert (
        main(
            [
                "predict",
                "--config",
                str(runs["site"]),
                "--run",
                str(a.run),
                "--personalized",
                "--input",
                str(scans),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert "round 2, with the personalized copy" in capsys.readouterr().out
    assert (
        main(
            [
                "export",
                "--config",
                str(runs["site"]),
                "--run",
                str(a.run),
                "--personalize",
                "--out",
                str(tmp_path / "personal"),
            ]
        )
        == 0
    )
    provenance = json.loads((tmp_path / "personal" / "provenance.json").read_text())
    assert provenance["round"] == 2 and provenance["site_dice"] == scored["dice_personal"]
    assert provenance["personalized"]["validation_cases"] == data.val_ids
    assert (
        main(
            [
                "export",
                "--config",
                str(runs["site"]),
                "--run",
                str(a.run),
                "--personalize",
                "--weights",
                "last",
                "--out",
                str(tmp_path / "mismatch"),
            ]
        )
        == 2
    )
    assert "fine-tuned from round 2" in capsys.readouterr().err


def test_one_default_round_for_export_predict_and_report_and_a_site_package(runs, tmp_path, capsys):
    a = runs["a"]
    (a.run / METRICS_FILE).write_text(
        "".join(
            json.dumps(e) + "\n"
            for e in [
                {"event": "evaluate", "round": 2, "site": SITE, "dice": 0.5},
                {"event": "evaluate", "round": 2, "site": "site-2", "dice": 0.7},
                {"event": "round", "round": 2, "dice_mean": 0.6, "sites_ok": 2, "sites_failed": ["site-3"]},
            ]
        )
    )
    package = tmp_path / "package"
    package_run(a.run, SITE, package)
    assert str(a.run.parent) not in (package / CONFIG_FILE).read_text()  # no centre path reaches the site
    assert [e.get("site") for e in map(json.loads, (package / METRICS_FILE).read_text().splitlines())] == [SITE, None]
    assert "site-3" not in (package / METRICS_FILE).read_text()
    assert {p.name for p in (package / CHECKPOINT_DIR).iterdir()} == {
        "round-0001.safetensors",
        "round-0002.safetensors",
        "round-0003.safetensors",
        "best.safetensors",
        "last.safetensors",
        "state.json",
    }
    assert (
        main(
            [
                "predict",
                "--config",
                str(runs["site"]),
                "--run",
                str(package),
                "--input",
                str(tmp_path / "none"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )  # no scans, but the model line comes first
    assert "best = round 2, with this site's norm tensors of round 2" in capsys.readouterr().out
    assert main(["report", "--config", str(runs["site"]), "--run", str(package), "--out", str(tmp_path / "r")]) == 0
    assert "best = round 2" in capsys.readouterr().out
    assert main(["export", "--config", str(runs["site"]), "--run", str(package), "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "provenance.json").read_text())["round"] == 2


def test_adding_a_case_moves_no_existing_case(tmp_path, caplog):
    for seed in range(5):
        ids = [f"case_{i:03d}" for i in range(40)]
        train, val = split_cases(ids, 0.25, seed)
        grown_train, grown_val = split_cases([*ids, "case_new"], 0.25, seed)
        assert set(train) <= set(grown_train) and set(val) <= set(grown_val)
    root = nnunet_dataset(tmp_path / "data", n_cases=12)
    cfg = load_config(
        None,
        [
            f"site.data_dir={root}",
            f"site.state_dir={tmp_path / 's'}",
            "site.min_cohort=1",
            "model.in_channels=1",
            "model.out_channels=2",
        ],
    )
    state = SiteState(tmp_path / "s")
    _, train, val = open_split(cfg, state)
    nnunet_dataset(tmp_path / "data", n_cases=13)  # the site adds a 13th case
    with caplog.at_level(logging.WARNING):
        _, grown_train, grown_val = open_split(cfg, state)
    assert set(train) <= set(grown_train) and set(val) <= set(grown_val) and "split" not in caplog.text
    assert "split_changes" not in state.info()
    reseeded = cfg.replace(data=cfg.data.replace(split_seed=5))
    with caplog.at_level(logging.WARNING):
        _, _, new_val = open_split(reseeded, state)
    assert new_val != grown_val and "split of this site's cases changes" in caplog.text
    assert state.info()["split_changes"][0]["moved"]


def test_the_old_single_norm_file_is_moved_once_and_used_by_no_run(tmp_path, caplog):
    state = SiteState(tmp_path / "s")
    save_file({"x": torch.ones(2)}, str(state.root / "norm.safetensors"))
    state.update_info(model_signature="sig", last_round=4)
    with caplog.at_level(logging.WARNING):
        run = state.run_named("any", "0123456789ab")
    assert "moved this site's norm tensors" in caplog.text and not (state.root / "norm.safetensors").exists()
    assert not run.trained
    legacy = state.run_named("legacy", "").folder.parent / "legacy-norm"
    assert torch.equal(load_file(legacy / "norm" / "round-0004.safetensors")["x"], torch.ones(2))
    caplog.clear()
    state.run_named("any", "0123456789ab")
    assert "moved" not in caplog.text

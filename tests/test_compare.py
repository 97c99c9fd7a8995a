"""fedseg-sim compare --quick: real baselines and a real federated run, table, plots, resume."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.files import read_jsonl
from simulations.cli import main as sim_main
from simulations.compare_methods import Method
from simulations.compare_report import PLOTS, scored_on, summarize

METHODS = ["local", "pooled", "fedseg"]
SMALLER = [
    "--set",
    "data.patch_size=[16, 16, 16]",
    "--set",
    "train.batch_size=1",
    "--set",
    "simulation.cpus_per_site=1",
]
"""On top of --quick: the tiny patch and batch of tests/helpers/tiny.py, and the simulated sites side by side."""


@pytest.mark.simulation
def test_quick_compare_writes_table_plots_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--quick",
        "--methods",
        *METHODS,
        "--out",
        str(out),
        "--set",
        f"simulation.data_dir={tmp_path / 'data'}",
        "--set",
        f"federation.runs_dir={tmp_path / 'runs'}",
        "--set",
        "train.personalize_steps=2",
        *SMALLER,
    ]
    assert sim_main(args) == 0
    rows = list(read_jsonl(out / "results.jsonl"))
    assert [r["method"] for r in rows] == METHODS
    for row in rows:
        assert row["status"] == "ok", row
        assert set(row["per_site"]) == {"site-1", "site-2"}
        assert all(0.0 <= d <= 1.0 for d in row["per_site"].values())
        assert row["mean"] == np.mean(list(row["per_site"].values()))
    fed = rows[2]
    assert set(fed["held_out"]) == {"site-3"} and fed["held_out"]["site-3"]["dice_adapted"] is not None
    assert len(fed["curve"]) == 2
    assert len(rows[0]["curve"]) == len(rows[1]["curve"]) == 2, "baselines record a round's-worth learning curve"
    assert set(fed["personal"]) == {"site-1", "site-2"}
    assert all(fed["personal"][s] >= fed["per_site"][s] - 1e-6 for s in fed["personal"]), (
        "early stopping keeps the federated model when fine-tuning does not help"
    )
    table = (out / "results.md").read_text()
    assert "fedseg-sim compare --quick" in table and "Seeds: [0]" in table
    scored = "test_per_site" if all(r.get("test_per_site") for r in rows) else "per_site"  # the table's rule
    assert f"{rows[0][scored]['site-1']:.3f}" in table
    assert "Simulated sites run a deployed site's defaults, except site-1: site.min_cohort: 1" in table
    assert "+ personalization at each site" in table and "Wall time (s)" in table
    for name in PLOTS:
        assert np.asarray(Image.open(out / name).convert("L")).std() > 5
    # a second call with the same --out reuses what finished and only rewrites the table
    before = (out / "results.jsonl").read_text()
    assert sim_main(args) == 0
    assert (out / "results.jsonl").read_text() == before


def test_unknown_method_is_refused(tmp_path, capsys):
    assert sim_main(["compare", "--quick", "--methods", "fedsgd", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_split_methods_keep_the_patches_and_published_methods_average_plainly():
    from common.config import apply_overrides, from_dict
    from simulations.compare import BENCHMARK, BUDGETS
    from simulations.compare_run import methods_for

    for budget in BUDGETS.values():
        base = from_dict(apply_overrides({}, [*BENCHMARK, *budget]), "benchmark")
        patches = base.federation.rounds * base.train.local_steps
        methods = {
            m.name: from_dict(apply_overrides({}, [*BENCHMARK, *budget, *m.overrides]), m.name)
            for m in methods_for(base, [])
        }
        assert methods["fedseg"].federation.server_optimizer == "momentum"
        for name in ("fewer-rounds", "fedavg-fewer-rounds"):
            cfg = methods[name]
            assert cfg.federation.rounds * cfg.train.local_steps == patches
            assert cfg.federation.rounds == base.federation.rounds // 2
        for name in ("fedavg", "fedavg-fewer-rounds", "fedbn", "fedin", "silobn", "no-momentum"):
            assert methods[name].federation.server_optimizer == "none", name
        assert methods["fedavg-fewer-rounds"].train.norm_mode == "shared"


def _result(test_sites: list[str]) -> dict:
    return {
        "status": "ok",
        "method": "local",
        "per_site": {"a": 0.5, "b": 0.6},
        "held_out": {},
        "curve": [0.5],
        "seconds": 1.0,
        "test_per_site": dict.fromkeys(test_sites, 0.7),
        "test_per_class": {s: [0.7] for s in test_sites},
    }


def test_a_table_never_mixes_test_and_validation_dice():
    """A site without test cases is not dropped from the table: every site is scored on validation cases."""
    methods = [Method("local", "local", "Local only")]
    mixed, full = [_result(["a"])], [_result(["a", "b"])]
    row = summarize(mixed, methods)["local"]
    assert set(row["sites"]) == {"a", "b"} and row["mean"][0] == pytest.approx(0.55)
    assert scored_on(mixed).startswith("validation cases (b without labelled test cases")
    assert summarize(full, methods)["local"]["mean"][0] == pytest.approx(0.7)
    assert scored_on(full) == "labelled test cases (imagesTs/labelsTs)"


def test_methods_are_a_table_filled_in_from_the_base_settings():
    """Each row of simulations.compare_methods becomes one method where its condition holds; the command line
    adds the mu sweep and the pretrained start."""
    from common.config import apply_overrides, from_dict
    from simulations.compare import BENCHMARK
    from simulations.compare_methods import METHODS
    from simulations.compare_run import PRETRAINED_METHOD, methods_for

    assert len({m["name"] for m in METHODS}) == len(METHODS), "names are unique"
    base = from_dict(
        apply_overrides(
            {}, [*BENCHMARK, "federation.server_optimizer=none", "train.local_steps=5", "federation.rounds=7"]
        ),
        "benchmark",
    )
    methods = {m.name: m for m in methods_for(base, [0.1], "/models/other-run")}
    assert "fedavgm" in methods and "no-momentum" not in methods
    assert not {"more-rounds", "fewer-rounds", "fedavg-fewer-rounds"} & set(methods), "odd steps and rounds"
    cyclic = methods["cyclic"]
    assert cyclic.overrides[-1] == "federation.rounds=21" and "21 rounds x 5 steps" in cyclic.label
    assert methods["pooled-other-norm"].overrides == ("model.norm=instance",)
    assert methods["fedseg-mu0.1"].overrides == ("train.proximal_mu=0.1",)
    assert methods[PRETRAINED_METHOD].overrides == ("model.init_weights=/models/other-run",)
    assert [m.kind for m in methods.values()].count("federated") == len(methods) - 3

"""The federation agrees on its labels by name (common/labels.py), through the real ClientApp and planning."""

from __future__ import annotations

import shutil

import pytest
from flwr.app import MessageType

from client import client_app
from common import keys
from common.config import load_config
from common.labels import LabelMismatch, coding_problem, label_codes, remap_table
from common.metrics_log import MetricsLog
from server.planning import plan_config, plan_federation
from server.server_app import with_planned_model
from tests.helpers.local_grid import LocalGrid, federation
from tests.helpers.nifti_cases import split_into_two_classes
from tests.helpers.site_harness import server_message
from tests.helpers.tiny import tiny

CORE_RIM = {"background": 0, "core": 1, "rim": 2}
RIM_CORE = {"background": 0, "rim": 1, "core": 2}


def test_same_names_other_values_is_a_remap_and_other_names_are_refused_naming_both_maps():
    agreed = label_codes(CORE_RIM)
    assert remap_table(CORE_RIM, agreed) is None
    assert list(remap_table(RIM_CORE, agreed)) == [0, 2, 1]  # this site's 1 (rim) is the federation's 2
    assert remap_table({"Background": 0, "CORE": 1, "rim": 2}, agreed) is None  # case and spacing do not matter
    with pytest.raises(
        LabelMismatch,
        match=r"this site's labels \{0: 'background', 1: 'edema', 2: 'rim'\} are not "
        r"the federation's \{0: 'background', 1: 'a name this site does not "
        r"use', 2: 'rim'\}",
    ):
        remap_table({"background": 0, "edema": 1, "rim": 2}, agreed)
    problem = coding_problem("site-3", label_codes(RIM_CORE), agreed, remap=False)
    assert "its 1 is the federation's 2, its 2 is the federation's 1" in problem and "data.remap_labels" in problem
    assert coding_problem("site-3", label_codes(RIM_CORE), agreed, remap=True) is None
    assert "label names differ" in coding_problem(
        "site-3", label_codes({"background": 0, "edema": 1, "rim": 2}), agreed, remap=True
    )


@pytest.fixture
def three_sites(tmp_path, tiny_federation):
    """The tiny federation's three sites with two foreground classes; site-3 codes them the other way."""
    datasets = {}
    for name, src in tiny_federation.items():
        datasets[name] = shutil.copytree(src, tmp_path / "data" / name)
        split_into_two_classes(datasets[name], ("rim", "core") if name == "site-3" else ("core", "rim"))
    return datasets


@pytest.mark.parametrize("remap", [False, True])
def test_planning_refuses_or_remaps_a_site_coded_otherwise(tmp_path, three_sites, remap):
    cfg = load_config(
        None,
        tiny(
            "model.in_channels=0",
            "model.out_channels=0",
            f"data.remap_labels={remap}",
            f"federation.runs_dir={tmp_path / 'runs'}",
            "federation.run_name=labels",
        ),
    )
    cfg = federation(cfg, three_sites)
    run = tmp_path / "runs" / "labels"
    metrics_log = MetricsLog(run)
    grid = LocalGrid(cfg, client_app.app)
    plan = plan_federation(grid, cfg, run, metrics_log)
    metrics_log.close()
    assert len(plan.label_codes) == 3 and plan.remap_labels is remap
    failures = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"failure"' in line]
    if remap:
        assert plan.provenance["sites"] == ["site-1", "site-2", "site-3"] and not failures
    else:
        assert plan.provenance["sites"] == ["site-1", "site-2"]
        assert len(failures) == 1 and "site-3" in failures[0] and "its 1 is the federation's 2" in failures[0]
    # site-3 itself, sent the federation's plan: it trains remapped, or refuses with a fixed reason
    planned = with_planned_model(cfg, plan)
    msg = server_message(planned, MessageType.TRAIN, 1)
    msg.content[keys.CONFIG][keys.PLAN] = str(plan_config(plan)[keys.PLAN])
    reply = client_app.train(msg, grid.context(3))
    site_log = (run / "sites" / "site-3" / "site.log").read_text()
    if remap:
        assert not reply.has_error(), reply.error.reason
        assert "labels remapped by name to the federation's values: 0: background, 1: core, 2: rim" in site_log
    else:
        assert (
            reply.error.reason == "site site-3: the site's label map differs from the federation's; run "
            "`fedseg-client check` at the site"
        )
        assert "the federation's map is {0: background, 1: core, 2: rim}" in site_log


def test_a_plan_that_would_size_a_huge_model_is_refused():
    """A hostile centre's plan cannot make a site build a network of thousands of classes."""
    from common.plan import ChannelNorm, Plan, PlanError

    plan = Plan((1.0, 1.0, 1.0), (16, 16, 16), (ChannelNorm("zscore"),), (16, 16, 16), label_codes=tuple(range(5000)))
    with pytest.raises(PlanError, match="at most 1024 labels"):
        Plan.from_json(plan.to_json(), "the plan sent by the server")

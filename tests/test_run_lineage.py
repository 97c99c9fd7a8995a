"""A site's model belongs to its run, in a real deployment (issue 20).

The session's deployed federation (tests/helpers/deployed.py) runs run A
(``deploy``, two rounds); then run B (one round) of the same model runs at the
same sites: SuperLink, Fleet gateway and SuperNodes as separate processes with
TLS, the sites' daemons kept running between the runs. After B, each site
receives run A from the centre (``fedseg-server site-package``), exports it,
and the exported model scores exactly the Dice that A's cross-site evaluation
measured at that site.
"""

from __future__ import annotations

import json

import pytest
import yaml

from client.cli import main as client_main
from client.site_model import load_site_model
from client.site_state import SiteState
from common.config import load_config
from common.dataset import read_dataset
from common.evaluation import evaluate
from common.preprocess import PreprocessedCases
from common.runs import CROSS_EVAL_FILE, PROVENANCE_FILE
from server.cli import main as server_main
from tests.helpers.deploy_harness import Launched, events, site_norm_files, wait_for, write_yaml
from tests.helpers.deployed import GOOD, ROUNDS, RUN, finished, stop

pytestmark = pytest.mark.processes


@pytest.fixture(scope="module")
def two_runs(deployed):
    root, daemons = deployed["root"], list(deployed["daemons"].values())
    assert finished(deployed).proc.returncode == 0, deployed["server"].output()[-3000:]
    a_files = {n: {p: p.read_bytes() for p in site_norm_files(root / "sites" / n, root / "runs" / RUN)} for n in GOOD}
    settings = yaml.safe_load(deployed["fed"].read_text())
    settings["federation"]["run_name"] = "run-b"
    settings["federation"]["rounds"] = 1
    settings["train"]["seed"] = 1  # another initialisation: run B's tensors differ from run A's
    fed_b = write_yaml(root / "federation-b.yaml", settings)
    server = Launched(root / "server-b.out", "fedseg-server", "start", "--config", str(fed_b))
    try:
        wait_for(lambda: server.proc.poll() is not None, 600, "run B to finish", server, *daemons)
    finally:
        server.terminate()
        stop(deployed)  # the federation's last use (tests/helpers/deployed.py)
    assert server.proc.returncode == 0, server.output()[-3000:]
    return {"root": root, "sites": {n: deployed["sites"][n] for n in GOOD}, "a_files": a_files}


def test_a_later_run_at_the_same_sites_leaves_the_first_run_as_it_was(two_runs):
    root = two_runs["root"]
    for name in GOOD:
        state = root / "sites" / name
        a_now = {p: p.read_bytes() for p in site_norm_files(state, root / "runs" / RUN)}
        assert a_now == two_runs["a_files"][name] and len(a_now) == ROUNDS
        assert len(site_norm_files(state, root / "runs" / "run-b")) == 1
        assert sorted(p.name.rsplit("-", 1)[0] for p in (state / "runs").iterdir()) == [RUN, "run-b"]
    assert events(root / "runs" / "run-b")[-1]["status"] == "completed"


def test_export_of_the_first_run_after_the_second_reproduces_its_cross_site_dice(two_runs):
    root = two_runs["root"]
    cells = json.loads((root / "runs" / RUN / CROSS_EVAL_FILE).read_text())["cells"]
    for name, site_yaml in two_runs["sites"].items():
        package = root / f"package-{name}"  # the commands as the centre and the site run them (in this process)
        assert (
            server_main(["site-package", "--run", str(root / "runs" / RUN), "--site", name, "--out", str(package)]) == 0
        )
        exported = root / f"model-{name}"
        assert client_main(["export", "--config", str(site_yaml), "--run", str(package), "--out", str(exported)]) == 0
        provenance = json.loads((exported / PROVENANCE_FILE).read_text())
        assert provenance["run"] == RUN and provenance["norm_round"] == provenance["round"]
        cell = next(c for c in cells if c["site"] == name and c["model"].endswith(f"(round {provenance['round']})"))
        assert round(provenance["site_dice"], 3) == round(cell["dice"], 3)
        model, plan, model_cfg = load_site_model(exported)  # the exported folder alone, as a hospital uses it
        state = SiteState(root / "sites" / name)
        spec = read_dataset(load_config(site_yaml).site.data_dir)
        cases = PreprocessedCases(state.cache_dir, plan, spec.num_classes)
        volumes = [cases.load(spec.case(i)) for i in state.info()["split"]["val"]]
        dice = evaluate(model, volumes, plan.data_config(model_cfg.data), model_cfg.train, spec.num_classes).dice
        assert round(dice, 3) == round(cell["dice"], 3), f"{name}: export of run A scores {dice}, A scored {cell}"

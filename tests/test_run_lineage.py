"""A site's model belongs to its run, in a real deployment (issue 20).

Run A (two rounds), then run B (one round) of the same model at the same two
sites: SuperLink, Fleet gateway and SuperNodes as separate processes with TLS,
the sites' daemons kept running between the runs. After B, each site receives
run A from the centre (``fedseg-server site-package``), exports it, and the
exported model scores exactly the Dice that A's cross-site evaluation measured
at that site.
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
from server.certs import init_pki
from server.cli import main as server_main
from simulations.synthetic import generate_federation
from tests.helpers.deploy_harness import (
    GATEWAY_HOST,
    Launched,
    allow,
    events,
    federation_yaml,
    make_site,
    site_norm_files,
    snapshot_app,
    wait_for,
    write_yaml,
)

pytestmark = pytest.mark.processes

SITES = ["site-1", "site-2"]
QUIET_SCORING = {"personalize_steps": 0, "adapt_norm_steps": 0}
"""The cross-site evaluation scores the federated model only: what this test compares, and fast."""


def _run(root, fed, name: str, daemons) -> None:
    server = Launched(root / f"server-{name}.out", "fedseg-server", "start", "--config", str(fed))
    try:
        wait_for(lambda: server.proc.poll() is not None, 600, f"run {name} to finish", server, *daemons)
    finally:
        server.terminate()
    assert server.proc.returncode == 0, server.output()[-3000:]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    data = generate_federation(root / "data", n_sites=2, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)
    app, digest = snapshot_app(root / "app")
    fed_a = federation_yaml(root, app, SITES, rounds=2, min_sites=2, run_name="run-a", train=QUIET_SCORING)
    settings = yaml.safe_load(fed_a.read_text())
    settings["federation"]["run_name"] = "run-b"
    settings["federation"]["rounds"] = 1
    settings["train"]["seed"] = 1  # another initialisation: run B's tensors differ from run A's
    fed_b = write_yaml(root / "federation-b.yaml", settings)
    init_pki(root / "certs", [], [GATEWAY_HOST])
    sites = {n: make_site(root, n, data[n], fed_a, [digest]) for n in SITES}
    for name, path in sites.items():
        allow(fed_a, name, path)
    daemons = [Launched(root / f"{n}.out", "fedseg-client", "start", "--config", str(p)) for n, p in sites.items()]
    try:
        _run(root, fed_a, "a", daemons)
        a_files = {
            n: {p: p.read_bytes() for p in site_norm_files(root / "sites" / n, root / "runs" / "run-a")} for n in SITES
        }
        _run(root, fed_b, "b", daemons)
    finally:
        for daemon in daemons:
            daemon.terminate()
    return {"root": root, "sites": sites, "a_files": a_files}


def test_a_later_run_at_the_same_sites_leaves_the_first_run_as_it_was(two_runs):
    root = two_runs["root"]
    for name in SITES:
        state = root / "sites" / name
        a_now = {p: p.read_bytes() for p in site_norm_files(state, root / "runs" / "run-a")}
        assert a_now == two_runs["a_files"][name] and len(a_now) == 2
        assert len(site_norm_files(state, root / "runs" / "run-b")) == 1
        assert sorted(p.name.rsplit("-", 1)[0] for p in (state / "runs").iterdir()) == ["run-a", "run-b"]
    assert events(root / "runs" / "run-b")[-1]["status"] == "completed"


def test_export_of_the_first_run_after_the_second_reproduces_its_cross_site_dice(two_runs):
    root = two_runs["root"]
    cells = json.loads((root / "runs" / "run-a" / CROSS_EVAL_FILE).read_text())["cells"]
    for name, site_yaml in two_runs["sites"].items():
        package = root / f"package-{name}"  # the commands as the centre and the site run them (in this process)
        assert (
            server_main(["site-package", "--run", str(root / "runs" / "run-a"), "--site", name, "--out", str(package)])
            == 0
        )
        exported = root / f"model-{name}"
        assert client_main(["export", "--config", str(site_yaml), "--run", str(package), "--out", str(exported)]) == 0
        provenance = json.loads((exported / PROVENANCE_FILE).read_text())
        assert provenance["run"] == "run-a" and provenance["norm_round"] == provenance["round"]
        cell = next(c for c in cells if c["site"] == name and c["model"].endswith(f"(round {provenance['round']})"))
        assert round(provenance["site_dice"], 3) == round(cell["dice"], 3)
        model, plan, model_cfg = load_site_model(exported)  # the exported folder alone, as a hospital uses it
        state = SiteState(root / "sites" / name)
        spec = read_dataset(load_config(site_yaml).site.data_dir)
        cases = PreprocessedCases(state.cache_dir, plan, spec.num_classes)
        volumes = [cases.load(spec.case(i)) for i in state.info()["split"]["val"]]
        dice = evaluate(model, volumes, plan.data_config(model_cfg.data), model_cfg.train, spec.num_classes).dice
        assert round(dice, 3) == round(cell["dice"], 3), f"{name}: export of run A scores {dice}, A scored {cell}"

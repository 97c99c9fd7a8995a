"""A hospital's first day: the deployment as a newcomer runs it, and the simulation of the same federation.

Real processes on 127.0.0.1 with TLS, node keys and bundle approval, all of them
the commands of fedseg installed as the containers install it (``pip install .``
of a copy of the release, not editable; the centre submits that installation's
own release); three sites of 10 cases each whose site.yaml keeps a deployed
site's defaults (only site-3 sets its own cohort floor, so that one site scores
every round), two foreground classes that site-3's dataset.json codes the other
way round, no ``model.in_channels``/``out_channels`` in the centre's file.
``fedseg-client approve`` and ``fedseg-client check`` are asked first (check in
this process: the daemons run the same check again as they start). The same
federation then runs as a simulation, which must reach the same learning rates
and Dice. (A server killed and resumed, a site restarted while the centre is
down and an edited configuration refused: test_fault_drills' crash drill.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from client.cli import main as client_main
from common.bundle import bundle_sha256
from common.config import load_config
from server.certs import init_pki
from simulations.runner import run_simulation
from simulations.synthetic import generate_federation
from tests.helpers.deploy_harness import (
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
from tests.helpers.installed import fresh_install
from tests.helpers.nifti_cases import split_into_two_classes

pytestmark = [pytest.mark.processes, pytest.mark.simulation]

SITES = ["site-1", "site-2", "site-3"]
ROUNDS = 3
RUN = "first-day"
TRAIN = {"lr": 0.001}


def _first_day_federation(root, release):
    data = generate_federation(root / "data", n_sites=3, n_cases=10, shape=(32, 32, 24), strength=1.0, seed=0)
    for name, path in data.items():
        split_into_two_classes(path, ("rim", "core") if name == "site-3" else ("core", "rim"))
    digest = bundle_sha256(release)
    fed = federation_yaml(root, release, SITES, rounds=ROUNDS, min_sites=3, run_name=RUN, train=TRAIN, cross_eval=False)
    body = yaml.safe_load(fed.read_text())
    for key in ("in_channels", "out_channels"):
        body["model"].pop(key)  # the newcomer's file: the labels decide
    body["data"] = {**body.get("data", {}), "remap_labels": True}
    body["server"]["app_dir"] = ""  # as in deploy/federation.yaml: the installation's own release
    write_yaml(fed, body)
    init_pki(root / "certs", [], [GATEWAY_HOST])
    sites = {}
    for name in SITES:  # a deployed site's default floor, except the one site that accepts a Dice over its 4 cases
        sites[name] = make_site(root, name, data[name], fed, [digest], min_cohort=4 if name == "site-3" else None)
        allow(fed, name, sites[name])
    return data, fed, sites


def _check(site_yaml, capsys: pytest.CaptureFixture[str]) -> str:
    code = client_main(["check", "--config", str(site_yaml)])
    said = capsys.readouterr()
    assert code == 0, said.out + said.err
    return said.out


def test_a_hospitals_first_day(tmp_path, capsys, monkeypatch):
    root = tmp_path
    bin_dir, release = fresh_install(root)
    data, fed, sites = _first_day_federation(root, release)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # from here on, the processes run only the installed copy
    approve = run_cli(str(bin_dir / "fedseg-client"), "approve", "--config", str(sites["site-1"]))
    assert approve.returncode == 0 and bundle_sha256(release) in approve.stdout, approve.stderr
    said = {name: _check(path, capsys) for name, path in sites.items()}
    for name in ("site-1", "site-2"):
        assert "trains but sends no validation score (fewer than site.min_cohort = 5)" in said[name], said[name]
    assert "-> sends its validation Dice" in said["site-3"] and "OK: this site can train" in said["site-3"]
    run = root / "runs" / RUN

    server = Launched(root / "server.out", str(bin_dir / "fedseg-server"), "start", "--config", str(fed))
    daemons = {
        n: Launched(root / f"{n}.out", str(bin_dir / "fedseg-client"), "start", "--config", str(p))
        for n, p in sites.items()
    }
    everything = [server, *daemons.values()]
    try:
        wait_for(lambda: server.proc.poll() is not None, 900, "the run to finish", *everything)
        assert server.proc.returncode == 0, server.output()[-3000:]
    finally:
        for proc in everything:
            proc.terminate()

    log = events(run)
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed", log[-1]
    assert log[-1]["rounds_completed"] == ROUNDS
    trained = Counter((e["round"], e["site"]) for e in log if e["event"] == "train")
    assert trained == {(r, s): 1 for r in range(1, ROUNDS + 1) for s in SITES}, trained  # every site, every round
    assert not [e for e in log if e["event"] == "failure"], [e for e in log if e["event"] == "failure"]
    assert {e["site"] for e in log if e["event"] == "no-score"} == {"site-1", "site-2"}
    assert "labels remapped by name" in (root / "sites" / "site-3" / "site.log").read_text()
    expected_lr = [TRAIN["lr"]] * ROUNDS
    live = _per_round(log)
    for site in SITES:
        assert [lr for (_, s), (lr, _) in sorted(live.items()) if s == site] == pytest.approx(expected_lr)

    # --- the same federation, simulated: the same learning rates, the same Dice every round ----------------
    own = {name: {"data_dir": str(data[name]), "site_yaml": str(path)} for name, path in sites.items()}
    sim_cfg = load_config(
        fed,
        [
            f"federation.runs_dir={root / 'sim-runs'}",
            "federation.run_name=sim",
            "simulation.cpus_per_site=1",
            "simulation.ray_num_cpus=2",
            f"simulation.sites={yaml.safe_dump(own, default_flow_style=True).strip()}",
        ],
    )
    sim_log = events(run_simulation(sim_cfg, show=lambda line: None))
    simulated = _per_round(sim_log)
    assert simulated.keys() == live.keys()
    for key in live:
        assert simulated[key][0] == pytest.approx(live[key][0]), key
        if live[key][1] is not None:
            assert simulated[key][1] == pytest.approx(live[key][1], abs=5e-4), key  # Dice to 3 decimals
    dice = {e["round"]: e["dice_weighted"] for e in log if e["event"] == "round"}
    sim_dice = {e["round"]: e["dice_weighted"] for e in sim_log if e["event"] == "round"}
    assert sim_dice == pytest.approx(dice, abs=5e-4)


def _per_round(log: list[dict]) -> dict[tuple[int, str], tuple[float, float | None]]:
    """(round, site) -> (learning rate of its training, Dice it reported for that round's model)."""
    dice = {(e["round"], e["site"]): e["dice"] for e in log if e["event"] == "evaluate"}
    return {(e["round"], e["site"]): (e["lr"], dice.get((e["round"], e["site"]))) for e in log if e["event"] == "train"}

"""Fault drills with real processes: a site killed mid-round, then the server killed mid-run and restarted.

One federation of two sites, quorum one, three rounds:
- round 1 runs normally;
- in round 2, site-2's daemon and everything under it is SIGKILLed while it
  trains: the round completes on site-1 alone once the SuperLink declares
  site-2 unavailable (two missed heartbeats), and the failure is logged;
  site-2 is restarted and its local norm tensors are still the ones on disk;
- when round 3 has started, the whole server is SIGKILLed; started again with
  the same run name it resumes at round 3 from the round-2 checkpoint, and the
  metrics log ends with every round exactly once, both sites in round 3.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import torch
from safetensors.torch import load_file

from server.certs import init_pki
from simulations.synthetic import generate_federation

from deploy_harness import GATEWAY_HOST, Launched, allow, events, federation_yaml, make_site, snapshot_app, wait_for

SITES = ["site-1", "site-2"]
ROUNDS = 3
RUN = "drill"


def _has(run, **match) -> bool:
    return any(all(e.get(k) == v for k, v in match.items()) for e in events(run))


def test_site_and_server_crashes_lose_nothing(tmp_path):
    data = generate_federation(tmp_path / "data", n_sites=2, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)
    app, digest = snapshot_app(tmp_path / "app")
    fed = federation_yaml(tmp_path, app, SITES, rounds=ROUNDS, min_sites=1, run_name=RUN)
    init_pki(tmp_path / "certs", [], [GATEWAY_HOST])
    site_yaml = {n: make_site(tmp_path, n, data[n], fed, [digest]) for n in SITES}
    for name, path in site_yaml.items():
        allow(fed, name, path)
    run = tmp_path / "runs" / RUN
    norm = tmp_path / "sites" / "site-2" / "norm.safetensors"
    server = Launched(tmp_path / "server-1.out", "fedseg-server", "start", "--config", str(fed))
    daemons = {n: Launched(tmp_path / f"{n}-1.out", "fedseg-client", "start", "--config", str(p))
               for n, p in site_yaml.items()}
    everything = [server, *daemons.values()]
    try:
        wait_for(lambda: _has(run, event="round", round=1), 600, "round 1", *everything)
        saved_after_round_1 = hashlib.sha256(norm.read_bytes()).hexdigest()

        # --- a site dies in the middle of training ------------------------------------------------
        supernode_log = tmp_path / "sites" / "site-2" / "supernode.log"
        wait_for(lambda: supernode_log.read_text().count("Receiving: train message") >= 2, 600,
                 "site-2 to receive its round-2 training message", *everything)
        daemons["site-2"].kill_tree()  # its ClientApp is still importing or training: it cannot have replied
        summary = wait_for(lambda: [e for e in events(run) if e["event"] == "round" and e["round"] == 2], 300,
                           "round 2 to complete on quorum", server)
        assert summary[0]["sites_failed"] == ["site-2"] and summary[0]["aggregated"]
        assert _has(run, event="failure", round=2, site="site-2")
        assert _has(run, event="train", round=2, site="site-1")
        tensors = load_file(norm)  # whole and loadable: written atomically, never torn by the kill
        at_restart = hashlib.sha256(norm.read_bytes()).hexdigest()
        weights = [v for k, v in tensors.items() if k.endswith("weight")]
        assert weights and not all(torch.equal(w, torch.ones_like(w)) for w in weights), \
            "site-2's norm tensors are back at the initialisation"
        daemons["site-2"] = Launched(tmp_path / "site-2-2.out", "fedseg-client", "start", "--config",
                                     str(site_yaml["site-2"]))
        wait_for(lambda: "SuperNode started" in daemons["site-2"].output(), 120, "site-2 to restart", daemons["site-2"])
        assert hashlib.sha256(norm.read_bytes()).hexdigest() == at_restart, "restarting rewrote the norm tensors"
        everything = [server, *daemons.values()]

        # --- the server dies after round 2, in round 3 ------------------------------------------------
        wait_for(lambda: _has(run, event="train", round=3), 600, "round 3 to start", *everything)
        server.kill_tree()
        assert not _has(run, event="round", round=3)
        server = Launched(tmp_path / "server-2.out", "fedseg-server", "start", "--config", str(fed))
        everything = [server, *daemons.values()]
        wait_for(lambda: server.proc.poll() is not None, 900, "the resumed run to finish", *everything)
        assert server.proc.returncode == 0, server.output()[-3000:]
        assert "resuming after round 2" in server.output()
    finally:
        for proc in everything:
            proc.terminate()

    log = events(run)
    assert Counter(e["round"] for e in log if e["event"] == "round") == {1: 1, 2: 1, 3: 1}
    trained = Counter((e["round"], e["site"]) for e in log if e["event"] == "train")
    assert trained == {(1, "site-1"): 1, (1, "site-2"): 1, (2, "site-1"): 1, (3, "site-1"): 1, (3, "site-2"): 1}
    starts = [e for e in log if e["event"] == "run-start"]
    assert [s["resumed_from_round"] for s in starts] == [0, 2]
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed"
    assert log[-1]["rounds_completed"] == ROUNDS
    state = tmp_path / "sites" / "site-2"
    assert not list(state.glob("norm.*.safetensors")), "site-2 set its norm tensors aside instead of reusing them"
    assert hashlib.sha256(norm.read_bytes()).hexdigest() not in (saved_after_round_1, at_restart), \
        "site-2 did not train again after rejoining"

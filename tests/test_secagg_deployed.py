"""A deployed federation with secure aggregation, and a site killed in the middle of round 2.

Real processes on 127.0.0.1 with TLS, node keys and bundle approval: the
centre (``fedseg-server start``) and three site daemons (``fedseg-client
start``), three rounds with ``federation.secure_aggregation: secagg+``. Site-3
is killed (the daemon and its ClientApp, like a power cut) as soon as the
centre has its encrypted shares of round 2: the other two sites already mask
with it, so the centre must rebuild its mask key from their shares and take
its pairwise masks off. The run must complete all three rounds; round 2 and 3
aggregate the two survivors, and nothing unmasked ever left a site.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from server.certs import init_pki
from simulations.synthetic import generate_federation
from tests.helpers.deploy_harness import (
    GATEWAY_HOST,
    Launched,
    allow,
    events,
    federation_yaml,
    make_site,
    run_cli,
    snapshot_app,
    wait_for,
)

pytestmark = pytest.mark.processes

SITES = ["site-1", "site-2", "site-3"]
ROUNDS = 3
RUN = "secagg-deployed"
PROTOCOL = ("query.secagg_keys", "query.secagg_shares", "query.secagg_unmask")


def _egress(root, site: str) -> list[dict]:
    path = root / "sites" / site / "egress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _shares_arrived(run, site: str, server_round: int) -> bool:
    """Whether the centre has received ``site``'s encrypted shares of ``server_round`` (its timeline event)."""
    return (
        any(
            e["event"] == "timeline"
            and e["stage"] == "query.secagg_shares"
            and e["round"] == server_round
            and e["site"] == site
            for e in events(run)
        )
        if (run / "metrics.jsonl").is_file()
        else False
    )


def test_a_deployed_secure_federation_survives_a_site_killed_in_round_2(tmp_path):
    root = tmp_path
    data = generate_federation(root / "data", n_sites=3, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)
    app, digest = snapshot_app(root / "app")
    fed = federation_yaml(
        root,
        app,
        SITES,
        rounds=ROUNDS,
        min_sites=2,
        run_name=RUN,
        cross_eval=False,
        secure_aggregation="secagg+",
        norm_bound=0.0,
        round_timeout_s=30.0,
    )
    init_pki(root / "certs", [], [GATEWAY_HOST])
    sites = {name: make_site(root, name, data[name], fed, [digest]) for name in SITES}
    for name, path in sites.items():
        allow(fed, name, path)
    run = root / "runs" / RUN

    server = Launched(root / "server.out", "fedseg-server", "start", "--config", str(fed))
    daemons = {n: Launched(root / f"{n}.out", "fedseg-client", "start", "--config", str(p)) for n, p in sites.items()}
    everything = [server, *daemons.values()]
    try:
        wait_for(lambda: _shares_arrived(run, "site-3", 2), 600, "site-3's shares of round 2", *everything, poll_s=0.1)
        daemons["site-3"].kill_tree()
        wait_for(lambda: server.proc.poll() is not None, 600, "the run to finish", *everything)
        assert server.proc.returncode == 0, server.output()[-3000:]
    finally:
        for proc in everything:
            proc.terminate()

    log = events(run)
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed", log[-1]
    assert log[-1]["rounds_completed"] == ROUNDS
    rounds = {e["round"]: e for e in log if e["event"] == "round"}
    assert [(r, rounds[r]["sites_ok"], rounds[r]["aggregated"]) for r in sorted(rounds)] == [
        (1, 3, True),
        (2, 2, True),
        (3, 2, True),
    ]
    trained = Counter(e["site"] for e in log if e["event"] == "train")
    assert trained == {"site-1": ROUNDS, "site-2": ROUNDS, "site-3": 1}, trained
    assert all(e["num_examples"] is None for e in log if e["event"] == "train"), "a case count was sent"
    dropped = [e for e in log if e["event"] == "failure" and e["round"] == 2]
    assert [e["site"] for e in dropped] == ["site-3"] and dropped[0]["stage"] == "train", dropped

    for name in SITES:  # what left each site: the protocol's messages and masked updates, never a model tensor
        sent = [e for e in _egress(root, name) if e["status"] == "sent"]
        assert {e["message_type"] for e in sent} >= {"train", *PROTOCOL[:2]}
        for e in sent:
            if e["message_type"] == "train" and e["kind"] == "content":
                assert e["keys"]["arrays"] == ["secagg-masked"], e
                assert "num-examples" not in e["keys"]["metrics"], e
    audit = run_cli("fedseg-client", "audit", "--config", str(sites["site-1"]))
    assert audit.returncode == 0, audit.stderr
    assert all(kind in audit.stdout for kind in PROTOCOL), audit.stdout

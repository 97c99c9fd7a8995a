"""One deployed federation for the session: the centre and three site daemons as real processes on 127.0.0.1.

Two approved sites train for two rounds while a third, registered site refuses
the app bundle. test_deploy attacks and inspects it while it runs; after it,
test_run_lineage runs a second run at the same, still running, site daemons
and then stops them all (its last use: a test later on the same worker checks
that nothing keeps running).
Sites reach the gateway on 127.0.0.2, standing in for the centre's public
interface; the SuperLink is bound to 127.0.0.1. tests/conftest.py starts it
once (``deployed``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from server.certs import init_pki
from simulations.synthetic import generate_federation
from tests.helpers.deploy_harness import (
    GATEWAY_HOST,
    Launched,
    allow,
    federation_yaml,
    make_site,
    snapshot_app,
    wait_for,
)

GOOD = ["site-1", "site-2"]
UNAPPROVED = "site-3"
ROUNDS = 2
RUN = "deploy"
QUIET_SCORING = {"personalize_steps": 0, "adapt_norm_steps": 0}
"""The cross-site evaluation scores the federated model only: what test_run_lineage compares, and fast."""


@contextmanager
def deployed_federation(root: Path) -> Iterator[dict]:
    """Start the federation under ``root``; yields what the tests need, stops every process it started at the end.

    ``extra`` collects processes a test starts beside it, so that they are stopped even if the test fails.
    """
    data = generate_federation(root / "data", n_sites=2, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)
    app, digest = snapshot_app(root / "app")
    fed = federation_yaml(root, app, [*GOOD, UNAPPROVED], rounds=ROUNDS, min_sites=2, run_name=RUN, train=QUIET_SCORING)
    init_pki(root / "certs", [], [GATEWAY_HOST])
    sites = {}
    for name in [*GOOD, UNAPPROVED]:
        approved = [digest] if name in GOOD else ["0" * 64]
        sites[name] = make_site(root, name, data["site-1" if name == UNAPPROVED else name], fed, approved)
        allow(fed, name, sites[name])
    server = Launched(root / "server.out", "fedseg-server", "start", "--config", str(fed))
    daemons = {n: Launched(root / f"{n}.out", "fedseg-client", "start", "--config", str(p)) for n, p in sites.items()}
    ctx = {
        "root": root,
        "fed": fed,
        "cfg": yaml.safe_load(fed.read_text()),
        "server": server,
        "daemons": daemons,
        "sites": sites,
        "data": data,
        "digest": digest,
        "run": root / "runs" / RUN,
        "extra": [],
    }
    try:
        wait_for(lambda: "sites connect to" in server.output(), 180, "the server to come up", server)
        yield ctx
    finally:
        stop(ctx)


def stop(ctx: dict) -> None:
    """Stop every process of the federation (again: a stopped one is left as it is)."""
    for proc in [*ctx["extra"], *ctx["daemons"].values()]:
        proc.terminate()
    ctx["server"].terminate()


def finished(ctx: dict) -> Launched:
    """The centre of ``ctx`` once its run has ended (it exits then)."""
    server = ctx["server"]
    wait_for(lambda: server.proc.poll() is not None, 600, "the run to finish", server, *ctx["daemons"].values())
    return server

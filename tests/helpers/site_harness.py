"""Drive the real ClientApp handlers for one site, in this process or a fresh one.

Used to check what survives a restart of a site: each call of ``run_fresh``
starts a new Python interpreter, exactly like a SuperNode spawning a new
ClientApp process for a message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from common import keys
from common.config import FedsegConfig, load_config
from common.wire import to_wire
from tests.helpers.envelopes import incoming
from tests.helpers.tiny import tiny

REPO = Path(__file__).resolve().parents[2]
HARNESS_RUN_ID = "0123456789ab"
"""The harness's run identity: a site keeps the run's model under ``runs/harness-<id>`` (client/site_state.py)."""


def site_setup(tmp_path: Path, data_dir: Path, name: str = "site-1", *overrides: str) -> tuple[FedsegConfig, Path]:
    """A resolved run config plus a site.yaml pointing at ``data_dir``."""
    cfg = load_config(
        None,
        tiny(
            "federation.run_name=harness",
            f"federation.run_id={HARNESS_RUN_ID}",
            f"federation.runs_dir={tmp_path / 'runs'}",
            *overrides,
        ),
    )
    site_yaml = tmp_path / f"{name}.yaml"
    site = {
        "name": name,
        "data_dir": str(data_dir),
        "state_dir": str(tmp_path / f"{name}-state"),
        "min_cohort": 1,
    }  # synthetic cases: no patient to protect
    site_yaml.write_text(yaml.safe_dump({"site": site}))
    return cfg, site_yaml


def context(cfg: FedsegConfig, site_yaml: Path) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={keys.NODE_SITE_CONFIG: str(site_yaml)},
        state=RecordDict(),
        run_config={keys.RUN_CONFIG_KEY: cfg.to_yaml()},
    )


def server_message(cfg: FedsegConfig, message_type: str, server_round: int) -> Message:
    """What the ServerApp would send: the seeded global weights plus the round's config."""
    from server.server_app import initial_weights

    weights, signature = initial_weights(cfg)
    config = ConfigRecord(
        {
            keys.SERVER_ROUND: server_round,
            keys.PROXIMAL_MU: cfg.train.proximal_mu,
            keys.SIGNATURE: signature,
            keys.WIRE_DTYPE: "float32",
        }
    )
    content = RecordDict({keys.ARRAYS: to_wire(weights), keys.CONFIG: config})
    return incoming(content, message_type, node_id=7, server_round=server_round)


def handle(cfg: FedsegConfig, site_yaml: Path, message_type: str, server_round: int = 1) -> Message:
    from client import client_app

    handler = client_app.train if message_type == MessageType.TRAIN else client_app.evaluate
    return handler(server_message(cfg, message_type, server_round), context(cfg, site_yaml))


_FRESH = """
import json, sys
from pathlib import Path
from safetensors.torch import save_file
from common.config import from_yaml_text
from common.params import select
from tests.helpers import site_harness as h
args = json.loads(sys.argv[1])
cfg = from_yaml_text(Path(args["cfg"]).read_text(), "test")
site_yaml = Path(args["site_yaml"])
if args["action"] == "train":
    reply = h.handle(cfg, site_yaml, "train", args["round"])
    print(json.dumps({"error": reply.error.reason if reply.has_error() else None}))
else:
    from client.client_app import Site
    site = Site.resolve(h.context(cfg, site_yaml))
    site.load_global(h.server_message(cfg, "evaluate", args["round"]))
    save_file(select(site.model, site.split.local), args["out"])
    print(json.dumps({"error": None}))
"""


def run_fresh(cfg: FedsegConfig, site_yaml: Path, action: str, server_round: int, out: Path | None = None) -> dict:
    """Run one handler step in a new interpreter; returns its JSON line."""
    cfg_file = site_yaml.with_suffix(".run.yaml")
    cfg_file.write_text(cfg.to_yaml())
    args = {
        "cfg": str(cfg_file),
        "site_yaml": str(site_yaml),
        "action": action,
        "round": server_round,
        "out": str(out) if out else None,
    }
    done = subprocess.run(
        [sys.executable, "-c", _FRESH, json.dumps(args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


ONE_SITE = tiny("train.local_steps=1", "federation.min_sites=1", "simulation.cpus_per_site=1")


def one_site(tmp_path, data_dir, *overrides: str, site_settings: dict | None = None):
    """A one-site federation of the real ClientApp; ``site_settings`` go into the site's own site.yaml."""
    import yaml

    from common.runs import SIM_SITES_DIR, run_dir, simulated_site_config
    from tests.helpers.local_grid import federation

    cfg = federation(
        load_config(None, [*ONE_SITE, f"federation.runs_dir={tmp_path}", "federation.run_name=e", *overrides]),
        {"site-1": data_dir},
    )
    path = simulated_site_config(run_dir(cfg) / SIM_SITES_DIR, 0)
    body = yaml.safe_load(path.read_text())
    body["site"].pop(
        "max_norm_travel", None
    )  # the simulation lets everything travel; a hospital's default applies here
    body["site"].update(site_settings or {})
    path.write_text(yaml.safe_dump(body))
    return cfg

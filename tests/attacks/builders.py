"""Builders shared by the attack tests (tests/attacks/): replies a hostile site sends, the real strategy
that receives them, and a one-site federation of the real ClientApp.

Replies are real Flower Messages that went through Flower's wire representation
(tests/local_grid.py ``over_the_wire``); the strategy is the real one.
"""

from __future__ import annotations

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common import keys
from common.config import load_config
from common.metrics_log import MetricsLog, read_events
from server.checkpoints import Checkpoints
from server.strategy import FedSegStrategy
from tests.flower_messages import reply as make_reply
from tests.local_grid import over_the_wire
from tests.tiny import tiny

SIGNATURE = "sig"
SHAPES = {"w": (4, 4), "b": (4,)}
GLOBAL = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
TRAIN_METRICS = {keys.NUM_EXAMPLES: 3, "loss": 1.0, "proximal_loss": 0.1, "duration_s": 2.0}
EVAL_METRICS = {"dice": 0.5, "loss": 0.4, keys.NUM_EXAMPLES: 2}


def content(site: str, metrics: dict, arrays: ArrayRecord | None = None) -> RecordDict:
    """A reply's records as site ``site`` would fill them."""
    body = RecordDict({keys.METRICS: MetricRecord(metrics),
                          keys.IDENTITY: ConfigRecord({keys.SITE: site, keys.SIGNATURE: SIGNATURE})})
    if arrays is not None:
        body[keys.ARRAYS] = arrays
    return body


def train_reply(node: int, site: str, step: float = 0.1, metrics: dict | None = None,
                arrays: ArrayRecord | None = None) -> Message:
    """Site ``site`` on node ``node`` moved every weight by ``step`` (or sends ``arrays``)."""
    arrays = arrays or ArrayRecord({k: Array(v + np.float32(step)) for k, v in GLOBAL.items()})
    return over_the_wire(make_reply(content(site, metrics or TRAIN_METRICS, arrays), node, MessageType.TRAIN))


def eval_reply(node: int, site: str, metrics: dict | None = None) -> Message:
    return over_the_wire(make_reply(content(site, metrics or EVAL_METRICS), node, MessageType.EVALUATE))


def strategy_for(tmp_path, *overrides: str, nodes: dict[int, str] | None = None) -> FedSegStrategy:
    """The real strategy, configured for round 1 (of one: it evaluates in its own step) from GLOBAL, with the
    registered node -> site names."""
    cfg = load_config(None, ["federation.run_name=attack", "federation.min_sites=1", "federation.rounds=1",
                             *overrides])
    strategy = FedSegStrategy(cfg, SIGNATURE, SHAPES, MetricsLog(tmp_path), Checkpoints(tmp_path / "ckpt"))
    strategy.node_sites.update(nodes or {})
    strategy.reference = {k: v.copy() for k, v in GLOBAL.items()}
    return strategy


def failures(tmp_path) -> dict[str, str]:
    return {e["site"]: e["reason"] for e in read_events(tmp_path / "metrics.jsonl") if e["event"] == "failure"}



ONE_SITE = tiny("train.local_steps=1", "federation.min_sites=1", "simulation.cpus_per_site=1")


def one_site(tmp_path, data_dir, *overrides: str, site_settings: dict | None = None):
    """A one-site federation of the real ClientApp; ``site_settings`` go into the site's own site.yaml."""
    import yaml

    from common.runs import SIM_SITES_DIR, run_dir, simulated_site_config
    from tests.local_grid import federation

    cfg = federation(load_config(None, [*ONE_SITE, f"federation.runs_dir={tmp_path}", "federation.run_name=e",
                                        *overrides]), {"site-1": data_dir})
    path = simulated_site_config(run_dir(cfg) / SIM_SITES_DIR, 0)
    body = yaml.safe_load(path.read_text())
    body["site"].pop("max_norm_travel", None)  # the simulation lets everything travel; a hospital's default applies here
    body["site"].update(site_settings or {})
    path.write_text(yaml.safe_dump(body))
    return cfg



def predict_run(tmp_path, in_channels: int = 1):
    """A run folder as the centre hands it out, and a site.yaml, for ``fedseg-client predict``."""
    import yaml
    from safetensors.torch import save_file

    from common.plan import ChannelNorm, Plan
    from server.server_app import initial_weights

    cfg = load_config(None, ["model.channels=[8, 16, 32]", "model.strides=[2, 2]",
                             f"model.in_channels={in_channels}"])
    run = tmp_path / f"run-{in_channels}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    Plan((1.0, 1.2, 2.0), (16, 16, 16), (ChannelNorm("zscore"),) * in_channels, (24, 20, 16)).save(run / "plan.json")
    save_file(initial_weights(cfg)[0], str(run / "checkpoints" / "best.safetensors"))
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"site": {"name": "h", "state_dir": str(tmp_path / "state")}}))
    return run, site


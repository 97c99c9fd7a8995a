"""Where fedseg's files live, in one place: the run directory (docs/architecture.md, "Run directory"), the
centre's and the sites' state folders, exported models and comparisons."""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from pathlib import Path

from .config import FedsegConfig, SiteView, read_yaml

# --- the run directory (<runs_dir>/<run_name>) ---------------------------------------------------
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PLAN_FILE = "plan.json"
"""The federation's plan; a site keeps the last one it received under the same name in its state folder."""
CROSS_EVAL_FILE = "cross-eval.json"
NODES_FILE = "nodes.json"
RUN_CONFIG_TOML = "run-config.toml"
"""The run config Flower hands to every site (``flwr run`` / the Control API)."""
SERVER_CONFIG_ENV = "FEDSEG_SERVER_CONFIG"
"""Deployment: path of the centre's full resolved config, for the ServerApp (sites get ``site_view`` only)."""
SERVER_CONFIG_FILE = "server-config.yaml"
SUPERLINK_LOG = "superlink.log"
FLWR_RUN_LOG = "flwr-run.log"
SIM_SITES_DIR = "sites"
SIM_APP_DIR = "app"
"""<run>/app/: the bundle's files a simulation submits (common/bundle.py ``write_app``)."""
REPORT_DIR = "report"
SUMMARY_FILE = "summary.json"
SUMMARY_PAGE = "summary.md"
"""<run>/report/summary.md: the one-page summary for people (summary.json holds its numbers)."""
TENSORBOARD_DIR = "tensorboard"
"""<run>/tensorboard/ (the live mirror, federation.tensorboard) and <run>/report/tensorboard/ (report --tensorboard)."""
DECLARED_CASES_FILE = "declared-cases.json"
"""The case count each site declared in its fingerprint reply (server/inbound.py bounds later counts by it)."""
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_STATE = "state.json"
"""Which round ``best`` and ``last`` hold (server/checkpoints.py writes it; exports read it)."""
BEST, LAST = "best", "last"
"""The two checkpoints named for what they hold rather than their round (checkpoints/state.json says which)."""
LAST_CHECKPOINT, BEST_CHECKPOINT = f"{LAST}.safetensors", f"{BEST}.safetensors"
ROUND_CHECKPOINT = "round-{:04d}.safetensors"
SERVER_OPTIMIZER_CHECKPOINT = "server-optimizer-{:04d}.safetensors"
"""The server optimizer's moments after a round's step (server/server_opt.py), read back on resume."""

# --- a Flower home of our own (the centre's state folder, a site's, the simulation's run) ------------
FLWR_HOME = "flwr-home"
FLOWER_CONFIG = "config.toml"
"""Flower's own settings file in a Flower home (the simulation's SuperLink connection)."""
SCRATCH_DIR = "cwd"
"""Flower's processes run from here: they would import code from the folder they were started in."""

# --- the centre's state folder (server.state_dir) ---------------------------------------------------
GATEWAY_LOG = "gateway.log"
SUPERLINK_DATABASE = "superlink.db"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
"""The federation's certificates in server.cert_dir (fedseg-server certs); ca.key is kept offline."""
NODE_KEYS_DIR = "sites"
PUBLIC_KEY_SUFFIX = ".pub"
"""<cert_dir>/sites/<site>.pub: each site's node public key, the SuperLink's allow-list."""
SERVER_LOCK = "server.lock"
"""Held by the running fedseg-server (its pid inside): a second one on the same state folder is refused."""

# --- a site's private state folder (site.state_dir) -------------------------------------------------
SITE_FILE = "site.json"
NORM_FILE = "norm.safetensors"
"""The one norm file a site kept before site state was scoped to runs; migrated once (client/site_state.py)."""
SITE_RUNS_DIR = "runs"
"""<state_dir>/runs/<run_name>-<run_id>/: everything this site keeps of one run (docs/architecture.md)."""
SITE_RUN_FILE = "run.json"
"""A site's facts about one run: model signature, rounds trained, scores it measured, where it started from."""
SITE_NORM_DIR = "norm"
NORM_ROUND_FILE = "round-{:04d}.safetensors"
"""<run state>/norm/round-NNNN.safetensors: the site's own tensors after training round NNNN."""
SECAGG_DIR = "secagg"
SECAGG_ROUND_FILE = "round-{:04d}.json"
"""<run state>/secagg/round-NNNN.json: this site's secure-aggregation secrets of a round (owner-only)."""
PERSONALIZED_FILE = "personalized.safetensors"
"""<run state>/personalized.safetensors: the copy cross-site evaluation fine-tuned and scored at this site."""
LEGACY_RUN = "legacy-norm"
"""<state_dir>/runs/legacy-norm/: where the pre-run-scoped norm.safetensors is moved, tied to no run."""
NO_RUN_ID = "no-id"
"""Stands for the run id in the folder of a run configured without one (a run started by hand or by a test)."""
CACHE_DIR = "cache"
CACHE_PLAN_DIR = "plan-{}"
"""<state_dir>/cache/plan-<version>/<case>/ holds one case in plan space (common/preprocess.py):"""
CACHE_IMAGE, CACHE_LABEL, CACHE_LOCATIONS = "image.npy", "label.npy", "locations.npz"
CACHE_META = "meta.json"
"""Written last: a case folder without it was never finished."""
SITE_LOG = "site.log"
EGRESS_FILE = "egress.jsonl"
HISTORY_FILE = "history.jsonl"
FINGERPRINT_FILE = "fingerprint.json"
EXPORT_LOG = "exports.jsonl"
PULLED_DIR = "pulled"
"""<state_dir>/pulled/<message id> holds the Unix time the SuperNode pulled that message (client/timeline.py)."""
RESOLVED_SITE = "site.resolved.yaml"
SUPERNODE_LOG = "supernode.log"
WARM_LOG = "warm-start.log"
BUNDLE_LOG = "bundles.jsonl"
DAEMON_FILE = "daemon.json"
GUARD_BIN = "guard-bin"

# --- an exported model folder (fedseg-client export) -------------------------------------------------
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "labels.json"
PROVENANCE_FILE = "provenance.json"
README_FILE = "README.md"

# --- a comparison folder (fedseg-sim compare --out) --------------------------------------------------
RESULTS_FILE = "results.jsonl"
RESULTS_PAGE = "results.md"
"""The comparison's table for people, made from results.jsonl."""
COMPARE_RUNS_DIR = "runs"
BASELINE_SITES_DIR = "baseline-sites"
"""<out>/baseline-sites/: the per-site baselines' site state (local training alone)."""
COMMAND_FILE = "command.txt"
SETTINGS_FILE = "settings.yaml"


# --- the one grammar of checkpoint names -------------------------------------------------------------
CHECKPOINT_NAME = re.compile(r"(best|last)|round-(\d+)")
CHECKPOINT_NAMES = "best, last or round-NNNN (e.g. round-0003, or round-3)"
"""What every command that takes a checkpoint name accepts, for its help and its errors."""


@dataclasses.dataclass(frozen=True)
class CheckpointName:
    """A global checkpoint of a run as people name it: ``best``, ``last`` or ``round-N`` (``round-3`` is
    ``round-0003``). ``round`` is None for best and last, whose round checkpoints/state.json records."""

    alias: str = ""
    """``best`` or ``last``; "" for a numbered round."""
    round: int | None = None

    @classmethod
    def of_round(cls, server_round: int) -> CheckpointName:
        return cls(round=server_round)

    @property
    def file(self) -> str:
        """Its file in the run's checkpoints/ folder."""
        return ROUND_CHECKPOINT.format(self.round) if self.round is not None else f"{self.alias}.safetensors"

    def __str__(self) -> str:
        return self.alias or f"round-{self.round}"


def parse_checkpoint_name(text: str) -> CheckpointName | None:
    """``best``, ``last``, ``round-N`` as a CheckpointName; None for anything else (a file path, a typo)."""
    match = CHECKPOINT_NAME.fullmatch(text.strip())
    if match is None:
        return None
    return CheckpointName(alias=match.group(1)) if match.group(1) else CheckpointName.of_round(int(match.group(2)))


def round_of_file(name: str, pattern: str) -> int | None:
    """The round of a file named by per-round ``pattern`` (``ROUND_CHECKPOINT``, ``NORM_ROUND_FILE``, ...):
    ``round-0003.safetensors`` -> 3; None for any other name (a temporary file, another kind of file)."""
    prefix, _, suffix = pattern.partition("{:04d}")
    digits = name[len(prefix) : len(name) - len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
    return int(digits) if re.fullmatch(r"[0-9]{4,}", digits) else None


def new_run_name(prefix: str = "run") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir(cfg: FedsegConfig) -> Path:
    """The run directory named by the config; run_name must already be set."""
    if not cfg.federation.run_name:
        raise ValueError("federation.run_name is empty: the launcher must name the run before it starts.")
    return Path(cfg.federation.runs_dir) / cfg.federation.run_name


def simulated_site_config(sites: Path, partition_id: int) -> Path:
    """site.yaml of the simulated site that Flower's simulation engine calls partition ``partition_id``, in the
    simulation's folder of site configurations (``<run>/sites``, named by the run config's SIM_SITES_KEY)."""
    return Path(sites) / f"site-{partition_id + 1}.yaml"


def new_run_id() -> str:
    """A run's identity: drawn once when the run is created, kept in its config.yaml when it resumes."""
    return secrets.token_hex(6)


def existing_run_id(run: Path) -> str:
    """The identity of the run in folder ``run``, or "" when no run was started there yet."""
    for name in (SERVER_CONFIG_FILE, CONFIG_FILE):  # the launcher's copy is written first
        if (Path(run) / name).is_file():
            return str((read_yaml(Path(run) / name).get("federation") or {}).get("run_id") or "")
    return ""


def site_view(cfg: FedsegConfig) -> SiteView:
    """The part of the centre's config that sites need: model, data and training settings, and the run's facts.

    Flower hands the run config to every site, so in a deployment it holds
    only this: no centre path (runs, certificates, state), no other site's
    name, no server or privacy setting. What a site learns of the run (the
    folder that keeps the run's model, how many rounds it has) comes from
    here: the round count, the run's name and identity.
    The view is its own schema (``common.config.SiteView``): what it drops is
    absent from it, not reset to a default.
    """
    return SiteView.of(cfg)

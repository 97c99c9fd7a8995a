"""A site's local DP ledger: every release of a run, recorded before its reply leaves, and the budget spent.

The releases themselves are made in client/local_dp.py (which says why one
release is 2/z-GDP and how they compose); this module holds only their record
in each run's ``run.json`` and its reading, so that ``fedseg-client status``
answers without loading torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.dp_accounting import ACCOUNTANT, composed_mu, gdp_epsilon
from common.runs import SITE_RUN_FILE, SITE_RUNS_DIR

if TYPE_CHECKING:
    from .site_state import RunState

RECORD_KEY = "local_dp"
"""run.json entry: ``{"delta": d, "releases": [{"round", "noise_multiplier", "clipping_norm", "time"}, ...]}``."""
SENSITIVITY_FACTOR = 2.0
"""Sensitivity of a clipped update in units of the clipping norm: any two of the site's datasets (replacement)."""


def record_release(
    run: RunState, server_round: int, noise_multiplier: float, clipping_norm: float, delta: float
) -> None:
    """Add one release to the run's record at the site (run.json), atomically, before the update leaves."""
    kept = run.info().get(RECORD_KEY, {})
    releases = [
        *kept.get("releases", []),
        {
            "round": server_round,
            "noise_multiplier": noise_multiplier,
            "clipping_norm": clipping_norm,
            "time": time.time(),
        },
    ]
    run.record(**{RECORD_KEY: {"delta": delta, "releases": releases, "accountant": ACCOUNTANT}})


def _effective(releases: list[dict[str, Any]]) -> list[float]:
    """Each release's noise multiplier relative to its sensitivity (2C): what the accountant composes."""
    return [float(r["noise_multiplier"]) / SENSITIVITY_FACTOR for r in releases]


def budget(record: dict[str, Any]) -> tuple[float, int]:
    """(epsilon at the recorded delta, releases) of one run's local DP record (run.json's ``local_dp``)."""
    releases = record.get("releases", [])
    return gdp_epsilon(composed_mu(_effective(releases)), float(record["delta"])), len(releases)


def status_lines(state: Path) -> list[str]:
    """``fedseg-client status``: the local DP budget spent per run, and over all runs (the same patients)."""
    kept = {}
    runs = Path(state) / SITE_RUNS_DIR
    for path in sorted(runs.glob(f"*/{SITE_RUN_FILE}")) if runs.is_dir() else []:
        record = json.loads(path.read_text()).get(RECORD_KEY)
        if record and record.get("releases"):
            kept[path.parent.name] = record
    lines = []
    for name, record in kept.items():
        epsilon, n = budget(record)
        lines.append(
            f"local DP: epsilon {epsilon:.4g} at delta {record['delta']:g} after {n} round(s) "
            f"(run {name}; noise multiplier {record['releases'][-1]['noise_multiplier']:g}, clipping "
            f"norm {record['releases'][-1]['clipping_norm']:g})"
        )
    if len(kept) > 1:
        every = [r for record in kept.values() for r in record["releases"]]
        delta = min(record["delta"] for record in kept.values())  # the strictest the site asked for
        epsilon = gdp_epsilon(composed_mu(_effective(every)), delta)
        lines.append(
            f"local DP, all {len(kept)} runs together (the same patients): epsilon {epsilon:.4g} at delta "
            f"{delta:g} after {len(every)} round(s)"
        )
    return lines

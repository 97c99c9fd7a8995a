"""Running one comparison: the methods, one run per method and seed, the results file."""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import DataConfig, FedsegConfig, apply_overrides, from_dict
from common.dataset import DatasetSpec
from common.metrics_log import Event, read_events
from common.runs import (
    BASELINE_SITES_DIR,
    COMMAND_FILE,
    COMPARE_RUNS_DIR,
    CROSS_EVAL_FILE,
    LAST,
    METRICS_FILE,
    RESULTS_FILE,
    SETTINGS_FILE,
)

from . import baselines
from .compare_methods import Method, table
from .runner import SimulationError, prepare_run, run_simulation
from .sites import read_site_specs, site_datasets, with_data_channels

log = logging.getLogger("fedseg.compare")

LAST_MODEL_PREFIX = LAST
"""Every method is scored on its final model: choosing a 'best' round on the
validation cases that are then reported would flatter the federated methods."""


PRETRAINED_METHOD = "fedseg-pretrained"
"""fedseg's default started from ``compare --pretrained`` (model.init_weights), e.g. another federation's model."""


def methods_for(base: FedsegConfig, mu_sweep: list[float], pretrained: str = "") -> list[Method]:
    """Every method the comparison knows (simulations.compare_methods), filled in from ``base``; then one per
    FedProx mu of ``mu_sweep`` and, with ``pretrained``, fedseg's default started from those weights."""
    methods = table(base)
    methods += [
        Method(f"fedseg-mu{m:g}", "federated", f"fedseg default, mu={m:g}", (f"train.proximal_mu={m}",))
        for m in mu_sweep
        if m != base.train.proximal_mu
    ]
    if pretrained:
        methods.append(
            Method(
                PRETRAINED_METHOD,
                "federated",
                f"fedseg default, starting from {pretrained}",
                (f"model.init_weights={pretrained}",),
            )
        )
    return methods


def with_overrides(cfg: FedsegConfig, overrides: list[str]) -> FedsegConfig:
    return from_dict(apply_overrides(cfg.to_dict(), overrides), "compare settings")


def read_results(path: Path) -> list[dict[str, Any]]:
    return list(read_events(path)) if path.is_file() else []


def federated_result(run: Path) -> dict[str, Any]:
    """Scores of the final model: per-site Dice (own norm), test Dice per site and class, held-out Dice
    as-is and adapted (on all the held-out site's labelled cases), and the curve."""
    cells = json.loads((run / CROSS_EVAL_FILE).read_text())["cells"]
    last = [c for c in cells if c["model"].startswith(LAST_MODEL_PREFIX)]
    per_site = {c["site"]: c["dice"] for c in last if c["trained"]}
    personal = {c["site"]: c["dice_personal"] for c in last if c["trained"] and c.get("dice_personal") is not None}
    tested = [c for c in last if c["trained"] and c.get("test_dice") is not None]
    held_out = {c["site"]: {"dice": c["dice"], "dice_adapted": c["dice_adapted"]} for c in last if not c["trained"]}
    curve = [e["dice_mean"] for e in read_events(run / METRICS_FILE, Event.ROUND)]
    return {
        "per_site": per_site,
        "held_out": held_out,
        "curve": curve,
        "personal": personal,
        "test_per_site": {c["site"]: c["test_dice"] for c in tested},
        "test_per_class": {c["site"]: c["test_dice_per_class"] for c in tested},
        "test_personal": {
            c["site"]: c["test_dice_personal"] for c in tested if c.get("test_dice_personal") is not None
        },
    }


class Comparison:
    """Every method x seed on one synthetic federation, results appended as they finish."""

    def __init__(self, base: FedsegConfig, methods: list[Method], seeds: list[int], out: Path, command: str) -> None:
        self.base, self.methods, self.seeds, self.out, self.command = base, methods, seeds, out, command
        self.results_path = out / RESULTS_FILE
        self._sites: tuple[DataConfig, dict, dict, dict] | None = None

    def _site_data(
        self,
    ) -> tuple[DataConfig, dict[str, DatasetSpec], dict[str, baselines.SiteSplit], dict[str, baselines.SiteSplit]]:
        """The plan's data settings, every site's dataset.json, and the training and held-out sites for the
        baselines, read as the ClientApp reads them."""
        if self._sites is None:
            cfg = prepare_run(self.base)
            datasets = site_datasets(cfg)
            specs = read_site_specs(datasets)
            cfg = with_data_channels(cfg, specs)
            held = set(cfg.federation.held_out_sites)
            planned, split = baselines.load_sites(
                cfg, datasets, [n for n in datasets if n not in held], self.out / BASELINE_SITES_DIR
            )
            self._sites = (
                planned.data,
                specs,
                {n: s for n, s in split.items() if n not in held},
                {n: s for n, s in split.items() if n in held},
            )
        return self._sites

    def _run_one(self, method: Method, cfg: FedsegConfig) -> dict[str, Any]:
        if method.kind in ("local", "pooled"):
            data, specs, sites, held_out = self._site_data()
            cfg = with_overrides(cfg, list(method.overrides)).replace(data=data)
            cfg = with_data_channels(cfg, specs)
        if method.kind == "local":
            per_site, curve, tests = baselines.local_only(cfg, sites)
            return {"per_site": per_site, "held_out": {}, "curve": curve, **tests}
        if method.kind == "pooled":
            per_site, unseen, curve, tests = baselines.pooled(cfg, sites, held_out)
            return {"per_site": per_site, "held_out": unseen, "curve": curve, **tests}
        run_name = f"{method.name}-s{cfg.train.seed}"
        runs_dir = self.out / COMPARE_RUNS_DIR
        shutil.rmtree(runs_dir / run_name, ignore_errors=True)  # never resume a half-finished attempt
        cfg = with_overrides(
            cfg, [*method.overrides, f"federation.run_name={run_name}", f"federation.runs_dir={runs_dir}"]
        )
        run = run_simulation(cfg, show=log.info)
        return federated_result(run)

    def run(self, show: Callable[[str], None] = print) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / COMMAND_FILE).write_text(self.command + "\n")
        (self.out / SETTINGS_FILE).write_text(self.base.to_yaml())
        done = {(r["method"], r["seed"]) for r in read_results(self.results_path)}
        for seed in self.seeds:
            cfg = with_overrides(self.base, [f"train.seed={seed}"])
            for method in self.methods:
                if (method.name, seed) in done:
                    continue
                started = time.perf_counter()
                show(f"compare: {method.name} seed {seed} ...")
                try:
                    result = {"status": "ok", **self._run_one(method, cfg)}
                except (SimulationError, FileNotFoundError, KeyError) as err:
                    log.exception("%s seed %d failed", method.name, seed)
                    result = {"status": f"failed: {err}", "per_site": {}, "held_out": {}, "curve": []}
                per_site = result["per_site"]
                result |= {
                    "method": method.name,
                    "label": method.label,
                    "seed": seed,
                    "mean": statistics.fmean(per_site.values()) if per_site else None,
                    "seconds": time.perf_counter() - started,
                }
                with self.results_path.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                mean = f"{result['mean']:.4f}" if result["mean"] is not None else "n/a"
                show(
                    f"compare: {method.name} seed {seed}: mean Dice {mean} ({result['seconds']:.0f} s, "
                    f"{result['status']})"
                )
        from .compare_report import write_report

        results = read_results(self.results_path)
        known = {m.name: m for m in methods_for(self.base, [])} | {m.name: m for m in self.methods}
        present = {r["method"] for r in results}
        shown = [m for m in known.values() if m.name in present]  # earlier calls' methods stay in the table
        write_report(self.out, results, shown, self.seeds, self.command, self.base)
        return results

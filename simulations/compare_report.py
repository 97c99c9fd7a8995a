"""The comparison's table, target check and plots (results.md + PNGs), from results.jsonl alone."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.config import FedsegConfig  # noqa: E402
from common.runs import RESULTS_PAGE  # noqa: E402

from .runner import relaxed_settings  # noqa: E402
from .sites import site_names  # noqa: E402

TARGET_VS_POOLED = -0.01
TARGET_VS_FEDAVG = 0.03
PLOT_DPI = 110
PLOTS = ("compare-dice.png", "compare-curves.png", "compare-held-out.png")


def _stats(values: Iterable[float | None]) -> tuple[float, float, int] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def _fmt(stat: tuple[float, float, int] | None) -> str:
    return "n/a" if stat is None else f"{stat[0]:.3f} ± {stat[1]:.3f}"


def summarize(results: list[dict[str, Any]], methods) -> dict[str, dict[str, Any]]:
    """Per method: per-site, mean and held-out Dice as (mean, std over seeds, n seeds), curve and wall time.

    Sites with labelled test cases are scored on them (never chosen on);
    otherwise on their validation cases. A federated method whose sites
    personalized (``train.personalize_steps``) gets a second row,
    ``<method>+personal``, with the personalized copies' Dice.
    """
    table = {}
    for method in methods:
        rows = [r for r in results if r["method"] == method.name and r["status"] == "ok"]
        failed = sum(1 for r in results if r["method"] == method.name and r["status"] != "ok")
        test = bool(rows) and all(_tested(r) for r in rows)
        table[method.name] = _row(method.label, rows, "test_per_site" if test else "per_site", failed)
        table[method.name]["per_class"] = _per_class(rows) if test else []
        key = "test_personal" if test else "personal"
        personal = [r for r in rows if r.get(key)]
        if personal:
            table[f"{method.name}+personal"] = _row(
                f"{method.label} + personalization at each site", personal, key, 0
            ) | {"held_out": {}, "curve": [], "per_class": []}
    return table


def _tested(result: dict[str, Any]) -> bool:
    """Whether every trained site of a run has test scores: a table never mixes test and validation Dice."""
    return bool(result.get("test_per_site")) and set(result["test_per_site"]) == set(result["per_site"])


def scored_on(results: list[dict[str, Any]]) -> str:
    """The cases the table scores on, in words; why not the test cases when only some sites have them."""
    ok = [r for r in results if r["status"] == "ok"]
    if ok and all(_tested(r) for r in ok):
        return "labelled test cases (imagesTs/labelsTs)"
    untested = sorted({s for r in ok if r.get("test_per_site") for s in set(r["per_site"]) - set(r["test_per_site"])})
    if untested:
        return (
            f"validation cases ({', '.join(untested)} without labelled test cases, so no site is scored on "
            "its test cases; give every site imagesTs/labelsTs to score on test cases)"
        )
    return "validation cases"


def _per_class(rows: list[dict[str, Any]]) -> list[tuple[float, float, int] | None]:
    """Per foreground class: the mean over sites of the test Dice, as (mean, sd, n) over seeds."""
    per_seed = [
        [statistics.fmean(v) for v in zip(*r["test_per_class"].values(), strict=True)]
        for r in rows
        if r.get("test_per_class")
    ]
    return [_stats(values) for values in zip(*per_seed, strict=True)]


def _row(label: str, rows: list[dict[str, Any]], key: str, failed: int) -> dict[str, Any]:
    sites = sorted({s for r in rows for s in r[key]})
    held = sorted({s for r in rows for s in r["held_out"]})
    return {
        "label": label,
        "runs": len(rows),
        "failed": failed,
        "sites": {s: _stats(r[key].get(s) for r in rows) for s in sites},
        "mean": _stats(statistics.fmean(r[key].values()) if r[key] else None for r in rows),
        "held_out": {
            s: {k: _stats(r["held_out"].get(s, {}).get(k) for r in rows) for k in ("dice", "dice_adapted")}
            for s in held
        },
        "curve": _mean_curve([r["curve"] for r in rows if r["curve"]]),
        "seconds": _stats(r.get("seconds") for r in rows),
    }


def _mean_curve(curves: list[list[float | None]]) -> list[float | None]:
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [(_stats(c[i] for c in curves) or (None,))[0] for i in range(length)]


def target_check(table: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets for fedseg's default (and its personalized copies), each with margin and PASS/FAIL."""
    lines = []
    for name in ("fedseg", "fedseg+personal"):
        if table.get(name) and table[name]["mean"]:
            lines += [f"**{table[name]['label']}**", "", *_targets(table, table[name]), ""]
    return lines or ["fedseg's default did not produce results."]


def _targets(table: dict[str, dict[str, Any]], fed: dict[str, Any]) -> list[str]:
    pooled = [r for n, r in table.items() if n.startswith("pooled") and r["mean"]]
    fedavg, local = table.get("fedavg"), table.get("local")
    m = fed["mean"][0]
    lines = []
    if pooled:
        best = max(pooled, key=lambda r: r["mean"][0])
        d = m - best["mean"][0]
        lines.append(
            f"- within 0.01 of the best pooled model ({best['label']}): {m:.3f} vs {best['mean'][0]:.3f} "
            f"(difference {d:+.3f}): **{'PASS' if d >= TARGET_VS_POOLED else 'FAIL'}**"
        )
    if fedavg and fedavg["mean"]:
        d = m - fedavg["mean"][0]
        lines.append(
            f"- at least 0.03 above FedAvg: {m:.3f} vs FedAvg {fedavg['mean'][0]:.3f} "
            f"(difference {d:+.3f}): **{'PASS' if d >= TARGET_VS_FEDAVG else 'FAIL'}**"
        )
    if local and local["sites"]:
        below = [
            f"{s} ({fed['sites'][s][0]:.3f} < {local['sites'][s][0]:.3f})"
            for s in local["sites"]
            if s in fed["sites"] and fed["sites"][s] and local["sites"][s] and fed["sites"][s][0] < local["sites"][s][0]
        ]
        lines.append(f"- no site below its local-only Dice: **{'FAIL: ' + ', '.join(below) if below else 'PASS'}**")
    worse = [
        f"{s} ({h['dice_adapted'][0]:.3f} < {h['dice'][0]:.3f})"
        for s, h in fed["held_out"].items()
        if h["dice"] and h["dice_adapted"] and h["dice_adapted"][0] < h["dice"][0]
    ]
    if fed["held_out"]:
        lines.append(f"- held-out site, adapted >= as-is: **{'FAIL: ' + ', '.join(worse) if worse else 'PASS'}**")
    return lines


def machine() -> str:
    import flwr
    import monai
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__} "
        f"(CPU), flwr {flwr.__version__}, MONAI {monai.__version__}; load average when the table was written: "
        f"{load} (the machine was shared)"
    )


def _class_table(table: dict[str, dict[str, Any]]) -> list[str]:
    rows = [(r["label"], r["per_class"]) for r in table.values() if r.get("per_class")]
    if not rows:
        return []
    n = max(len(pc) for _, pc in rows)
    lines = [
        "Test Dice per foreground class (mean over sites; mean ± sd over seeds):",
        "",
        "| Method | " + " | ".join(f"class {i + 1}" for i in range(n)) + " |",
        "|" + "---|" * (n + 1),
    ]
    lines += ["| " + " | ".join([label, *[_fmt(s) for s in pc]]) + " |" for label, pc in rows]
    return lines


def _relaxations(base: FedsegConfig, names: list[str]) -> str:
    """What the simulated sites relax from a deployed site's defaults (simulations/runner.py), in one line."""
    notes = [f"{name}: {', '.join(relaxed)}" for name in names if (relaxed := relaxed_settings(base, name)[1])]
    return (
        "Simulated sites run a deployed site's defaults"
        + (f", except {'; '.join(notes)}" if notes else "")
        + " (methods that let norm layers travel relax site.max_norm_travel to their norm mode)."
    )


def markdown(
    table: dict[str, dict[str, Any]],
    seeds: list[int],
    command: str,
    base: FedsegConfig,
    cases: str = "validation cases",
) -> str:
    sites = sorted({s for row in table.values() for s in row["sites"]})
    held = sorted({s for row in table.values() for s in row["held_out"]})
    head = [
        "Method",
        *[f"{s} Dice" for s in sites],
        "Mean Dice",
        *[f"{s} (held out) as-is / adapted" for s in held],
        "Wall time (s)",
        "Runs",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.values():
        cells = [row["label"], *[_fmt(row["sites"].get(s)) for s in sites], f"**{_fmt(row['mean'])}**"]
        for s in held:
            h = row["held_out"].get(s)
            cells.append(f"{_fmt(h['dice'])} / {_fmt(h['dice_adapted'])}" if h else "—")
        cells.append(
            "—"
            if row["seconds"] is None or row["label"].endswith("personalization at each site")
            else f"{row['seconds'][0]:.0f}"
        )
        cells.append(f"{row['runs']}" + (f" ({row['failed']} failed)" if row["failed"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    t, f, s = base.train, base.federation, base.simulation
    training, held_out = site_names(base)
    if s.sites:
        data, same_data = (
            (f"{len(training)} training sites, {len(held_out)} held out, your own datasets from simulation.sites"),
            "the sites' own datasets",
        )
    else:
        data, same_data = (
            (
                f"{len(training)} synthetic training sites, {len(held_out)} held out, "
                f"{s.cases_per_site} cases each, shift strength {s.shift_strength}"
            ),
            f"synthetic seed {s.seed}",
        )
    return "\n".join(
        [
            "# Strategy comparison under scanner shift",
            "",
            f"Command: `{command}`",
            "",
            f"Seeds: {seeds} (model initialisation and patch sampling; the data are the same for every seed: "
            f"{same_data}).",
            "",
            f"Budget per method and seed: {f.rounds} rounds x {t.local_steps} local steps of batch {t.batch_size} "
            f"per site ({data}); local-only trains {f.rounds * t.local_steps} steps per site, pooled "
            f"{f.rounds * t.local_steps * len(training)} steps, so every method sees the same number of patches. Every "
            f"model is scored on its final round. Personalization (rows '+ personalization') then fine-tunes each "
            f"site's norm layers{' and output layer' if t.personalize == 'norm+head' else ''} for at most "
            f"{t.personalize_steps} steps on its own training cases, keeping the copy with the best Dice on its own "
            f"validation cases"
            + (
                " (those rows are therefore chosen on the cases they are scored on)."
                if cases.startswith("validation")
                else ", never on the test cases it is scored on."
            ),
            "",
            f"Dice: mean ± standard deviation over seeds of the foreground Dice on each site's {cases} "
            "(federated methods: the final global model with the site's own norm tensors). Held-out sites never train "
            "and are scored on all their labelled cases: as-is = the final global model as it arrives, adapted = after "
            "AdaBN on their unlabeled scans (equal to as-is for a model without BatchNorm).",
            "",
            *lines,
            "",
            _relaxations(base, [*training, *held_out]),
            "",
            *_class_table(table),
            "",
            "## Targets for fedseg's default",
            "",
            *target_check(table),
            "",
            f"Machine: {machine()}.",
            "",
            *[f"![{p}]({p})" for p in PLOTS],
            "",
        ]
    )


def _finish(fig, ax, path: Path, title: str, loc: str = "best") -> None:
    """Common frame of every comparison plot: Dice axis 0-1, title, legend, PNG."""
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, loc=loc)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def _plot_dice(table: dict[str, dict[str, Any]], path: Path) -> None:
    names = [n for n, r in table.items() if r["mean"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4.2))
    means = [table[n]["mean"][0] for n in names]
    errs = [table[n]["mean"][1] for n in names]
    ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="#8fb4d9", label="mean over sites (± sd over seeds)")
    sites = sorted({s for n in names for s in table[n]["sites"]})
    for k, site in enumerate(sites):
        xs = [i + (k - (len(sites) - 1) / 2) * 0.12 for i in range(len(names))]
        ys = [(table[n]["sites"].get(site) or (math.nan,))[0] for n in names]  # NaN: no point for that method
        ax.scatter(xs, ys, s=18, zorder=3, label=site)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("Dice (foreground)")
    _finish(fig, ax, path, "Final Dice per method under strong scanner shift", loc="upper left")


def _plot_curves(table: dict[str, dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, row in table.items():
        if row["curve"]:
            ax.plot(range(1, len(row["curve"]) + 1), row["curve"], marker=".", label=name)
    ax.set_xlabel("Round (baselines: a round's worth of steps)")
    ax.set_ylabel("Mean validation Dice over sites (mean over seeds)")
    _finish(fig, ax, path, "Learning curves: validation Dice per round")


def _plot_held_out(table: dict[str, dict[str, Any]], path: Path) -> None:
    rows = [(n, s, h) for n, r in table.items() for s, h in r["held_out"].items() if h["dice"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.2))
    xs = range(len(rows))
    ax.bar(
        [x - 0.2 for x in xs],
        [h["dice"][0] for _, _, h in rows],
        width=0.4,
        yerr=[h["dice"][1] for _, _, h in rows],
        capsize=3,
        label="as-is",
        color="#c9c9c9",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [(h["dice_adapted"] or (0, 0))[0] for _, _, h in rows],
        width=0.4,
        yerr=[(h["dice_adapted"] or (0, 0))[1] for _, _, h in rows],
        capsize=3,
        label="norm adapted",
        color="#e39b5b",
    )
    ax.set_xticks(list(xs), [f"{n}\n{s}" for n, s, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Dice (held-out site, all labelled cases)")
    _finish(fig, ax, path, "Site that never trained: as-is vs norm adaptation")


def write_report(
    out: Path, results: list[dict[str, Any]], methods, seeds: list[int], command: str, base: FedsegConfig
) -> Path:
    table = summarize(results, methods)
    for plot, name in zip((_plot_dice, _plot_curves, _plot_held_out), PLOTS, strict=True):
        plot(table, out / name)
    path = out / RESULTS_PAGE
    path.write_text(markdown(table, seeds, command, base, scored_on(results)))
    return path

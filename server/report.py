"""The run report: plots and a one-page summary made from metrics.jsonl alone.

Works on a finished run and on one still going (common.metrics_log.read_events
skips the line being written), so a clinician can follow a federation while it
trains. Everything lands in ``<run>/report/``: PNG plots with titles, units,
site names and legends, ``summary.md`` to read and ``summary.json`` holding the
same numbers for tools.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.metrics_log import EVENT, Event, by_kind, read_events  # noqa: E402
from common.runs import METRICS_FILE, REPORT_DIR, SUMMARY_FILE, SUMMARY_PAGE  # noqa: E402

PLOT_DPI = 110
MB = 1e6
FAILURE_COLOR = "#d62728"
PLOTS = {
    "dice": "dice-per-round.png",
    "loss": "train-loss.png",
    "seconds": "seconds-per-round.png",
    "bytes": "bytes-per-round.png",
}


@dataclass
class RunSummary:
    """The numbers of the one-page summary, recomputable from metrics.jsonl."""

    run: str
    status: str
    """'in progress' until the run-end event, then its status."""
    sites: list[str]
    rounds_completed: int
    last_round: int | None
    dice_mean_last: float | None
    dice_weighted_last: float | None
    best_round: int | None
    best_dice_weighted: float | None
    site_dice_last: dict[str, float]
    failures: list[dict[str, Any]]
    bytes_total: int
    seconds_total: float
    cross_eval: list[dict[str, Any]] = field(default_factory=list)


def summarize(events: list[dict[str, Any]]) -> RunSummary:
    k = by_kind(events)
    rounds = k[Event.ROUND]
    aggregated = [r for r in rounds if r.get("dice_weighted") is not None]
    best = max(aggregated, key=lambda r: r["dice_weighted"], default=None)
    last = rounds[-1] if rounds else None
    last_round = last["round"] if last else None
    starts = k[Event.RUN_START]
    sites = sorted({e["site"] for e in k[Event.TRAIN] + k[Event.EVALUATE]} | set(starts[0]["sites"] if starts else []))
    end = k[Event.RUN_END][-1] if k[Event.RUN_END] and events[-1][EVENT] == Event.RUN_END else None
    return RunSummary(
        run=starts[0].get("run", "") if starts else "",
        status=end["status"] if end else "in progress",
        sites=sites,
        rounds_completed=len(rounds),
        last_round=last_round,
        dice_mean_last=last.get("dice_mean") if last else None,
        dice_weighted_last=last.get("dice_weighted") if last else None,
        best_round=best["round"] if best else None,
        best_dice_weighted=best["dice_weighted"] if best else None,
        site_dice_last={e["site"]: e["dice"] for e in k[Event.EVALUATE] if e["round"] == last_round},
        failures=[{key: f.get(key) for key in ("round", "site", "stage", "reason")} for f in k[Event.FAILURE]],
        bytes_total=sum(int(r.get("bytes_total") or 0) for r in rounds),
        seconds_total=sum(float(r.get("duration_s") or 0.0) for r in rounds),
        cross_eval=sorted(
            (
                {key: c.get(key) for key in ("model", "site", "trained", "dice", "dice_adapted")}
                for c in k[Event.CROSS_EVAL]
            ),
            key=lambda c: (c["model"], c["site"]),
        ),
    )


def _series(events: list[dict[str, Any]], field_name: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per site: rounds and values of one field, skipping missing values."""
    out: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
    for e in events:
        if e.get(field_name) is not None:
            out[e["site"]][0].append(e["round"])
            out[e["site"]][1].append(e[field_name])
    return dict(sorted(out.items()))


def _site_lines(ax, events: list[dict[str, Any]], field_name: str, label: str, **style: Any) -> None:
    """One line per site of one field; ``label`` names the line, with ``{site}`` for the site's name."""
    for site, (rounds, values) in _series(events, field_name).items():
        ax.plot(rounds, values, label=label.format(site=site), **style)


def _mark_failures(ax, failures: list[dict[str, Any]], y: float) -> None:
    rounds = [f["round"] for f in failures if f.get("round") is not None]
    if rounds:
        ax.scatter(
            rounds,
            [y] * len(rounds),
            marker="x",
            s=60,
            color=FAILURE_COLOR,
            zorder=4,
            label=f"site failure ({len(rounds)})",
        )


@contextmanager
def _round_plot(k: dict[Event, list[dict[str, Any]]], path: Path, title: str, ylabel: str) -> Iterator[Any]:
    """A figure of values per round: the axes for the body to draw on, then the rounds a site failed marked at 0,
    the title, labels, grid and legend, saved to ``path``."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        yield ax
        _mark_failures(ax, k[Event.FAILURE], 0.0)
        ax.set_title(title)
        ax.set_xlabel("Round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=PLOT_DPI)
    finally:  # a plot that fails (a damaged log line) must not leave its figure open in a long-lived report
        plt.close(fig)


def _round_line(ax, rounds: list[dict[str, Any]], key: str, style: str, label: str) -> None:
    """One black line of a federation-wide value from the round summaries, where they have it."""
    points = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    if points:
        ax.plot(*zip(*points, strict=True), style, color="black", label=label)


def plot_dice(k: dict[Event, list[dict[str, Any]]], path: Path) -> None:
    title = "Validation Dice per site and round (each site's own norm layers)"
    with _round_plot(k, path, title, "Dice (foreground, 0-1)") as ax:
        _site_lines(ax, k[Event.EVALUATE], "dice", "{site}", marker="o")
        _round_line(ax, k[Event.ROUND], "dice_mean", "--", "federation mean")
        _round_line(ax, k[Event.ROUND], "dice_weighted", ":", "federation weighted")
        ax.set_ylim(-0.03, 1.0)


def plot_loss(k: dict[Event, list[dict[str, Any]]], path: Path) -> None:
    title = "Local training loss and FedProx proximal term, mean over local steps"
    with _round_plot(k, path, title, "Loss (dimensionless)") as ax:
        _site_lines(ax, k[Event.TRAIN], "loss", "{site} loss (DiceCE)", marker="o")
        _site_lines(ax, k[Event.TRAIN], "proximal_loss", "{site} proximal term", linestyle="--")


def plot_seconds(k: dict[Event, list[dict[str, Any]]], path: Path) -> None:
    with _round_plot(k, path, "Time per round", "Seconds") as ax:
        _site_lines(ax, k[Event.TRAIN], "duration_s", "{site} local training", marker="o")
        _round_line(ax, k[Event.ROUND], "duration_s", "--", "whole round (server)")


def plot_bytes(k: dict[Event, list[dict[str, Any]]], path: Path) -> None:
    with _round_plot(k, path, "Model bytes sent per round", "Megabytes (10^6 bytes)") as ax:
        points = [(r["round"], (r.get("bytes_total") or 0) / MB) for r in k[Event.ROUND]]
        if points:
            ax.bar(*zip(*points, strict=True), color="#8fb4d9", label="all sites, both directions")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(s: RunSummary) -> str:
    lines = [
        f"# Run report: {s.run}",
        "",
        f"Status: **{s.status}**. Sites: {', '.join(s.sites) or 'none yet'}. Rounds completed: {s.rounds_completed}.",
        "",
        f"- Last round ({s.last_round}): federation Dice mean {_fmt(s.dice_mean_last)}, "
        f"weighted {_fmt(s.dice_weighted_last)}",
        f"- Best round: {s.best_round} (weighted Dice {_fmt(s.best_dice_weighted)})",
        f"- Model bytes sent: {s.bytes_total / MB:.1f} MB; time in rounds: {s.seconds_total:.1f} s",
        f"- Failures: {len(s.failures)}",
        "",
    ]
    if s.site_dice_last:
        lines += ["| Site | Dice, last round |", "|---|---|"]
        lines += [f"| {site} | {_fmt(d)} |" for site, d in sorted(s.site_dice_last.items())]
        lines.append("")
    if s.failures:
        lines += ["## Failures", "", "| Round | Site | Stage | Reason |", "|---|---|---|---|"]
        lines += [f"| {f['round']} | {f['site']} | {f['stage']} | {f['reason']} |" for f in s.failures]
        lines.append("")
    if s.cross_eval:
        lines += [
            "## Cross-site evaluation",
            "",
            "Each site scores the global model with its own norm layers on its own validation cases. "
            "A held-out site never trained: as-is, and after adapting its norm layers to its unlabeled scans.",
            "",
            "| Model | Site | Trained here | Dice | Dice after norm adaptation |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['model']} | {c['site']} | {'yes' if c['trained'] else 'no (held out)'} | {_fmt(c['dice'])} "
            f"| {_fmt(c['dice_adapted']) if c['dice_adapted'] is not None else '—'} |"
            for c in s.cross_eval
        ]
        lines.append("")
    lines += [f"![{name}]({name})" for name in PLOTS.values()]
    return "\n".join(lines) + "\n"


def write_report(run: Path) -> Path:
    """Render ``<run>/report/``; returns the summary's path."""
    metrics = Path(run) / METRICS_FILE
    events = list(read_events(metrics))
    out = Path(run) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    k = by_kind(events)
    for key, plot in (("dice", plot_dice), ("loss", plot_loss), ("seconds", plot_seconds), ("bytes", plot_bytes)):
        plot(k, out / PLOTS[key])
    summary = summarize(events)
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2))
    path = out / SUMMARY_PAGE
    path.write_text(markdown(summary))
    return path

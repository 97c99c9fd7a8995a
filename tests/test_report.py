"""fedseg-server report on a finished run and on one still being written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.metrics_log import Event, MetricsLog, read_events
from common.runs import METRICS_FILE
from server.cli import main as server_main
from server.report import PLOTS

SITES = ["site-1", "site-2"]


def _write_run(run, rounds: int = 3) -> None:
    """A metrics log as the ServerApp writes it, with a failure in round 2 and a cross-eval."""
    log = MetricsLog(run)
    log.write(Event.RUN_START, run=run.name, config_sha256="x", sites=SITES, signature="s", resumed_from_round=0)
    for r in range(1, rounds + 1):
        dice = []
        for i, site in enumerate(SITES):
            if r == 2 and site == "site-2":
                log.write(Event.FAILURE, round=r, site=site, stage="train", reason="site site-2: diverged")
                continue
            log.write(
                Event.TRAIN,
                round=r,
                site=site,
                num_examples=4 + i,
                loss=1.0 / r,
                proximal_loss=0.01 / r,
                duration_s=2.0 + i,
                bytes_up=1000,
                bytes_down=1000,
            )
            d = 0.2 * r + 0.05 * i
            dice.append((d, 2 + i))
            log.write(
                Event.EVALUATE, round=r, site=site, num_examples=2 + i, dice=d, dice_per_class=[d], hd95=9.0, loss=0.5
            )
        mean = float(np.mean([d for d, _ in dice]))
        weighted = float(np.average([d for d, _ in dice], weights=[w for _, w in dice]))
        log.write(
            Event.ROUND,
            round=r,
            sites_ok=len(dice),
            sites_failed=["site-2"] if r == 2 else [],
            aggregated=True,
            dice_mean=mean,
            dice_weighted=weighted,
            duration_s=5.0,
            bytes_total=4000 * r,
        )
        log.sync()
    log.write(
        Event.CROSS_EVAL,
        model="last (round 3)",
        site="site-3",
        trained=False,
        dice=0.3,
        dice_adapted=0.4,
        num_examples=2,
    )
    log.write(Event.RUN_END, status="completed", rounds_completed=rounds, best_round=rounds, best_dice=0.7)
    log.close()


def _check_report(run) -> dict:
    assert server_main(["report", str(run)]) == 0
    out = run / "report"
    for name in PLOTS.values():
        image = np.asarray(Image.open(out / name).convert("L"))
        assert image.shape[0] > 100 and image.std() > 5, f"{name} looks empty"
    summary = json.loads((out / "summary.json").read_text())
    events = list(read_events(run / METRICS_FILE))
    rounds = [e for e in events if e["event"] == "round"]
    assert summary["rounds_completed"] == len(rounds)
    assert summary["dice_weighted_last"] == pytest.approx(rounds[-1]["dice_weighted"])
    assert summary["dice_mean_last"] == pytest.approx(rounds[-1]["dice_mean"])
    best = max(rounds, key=lambda r: r["dice_weighted"])
    assert summary["best_round"] == best["round"]
    assert summary["bytes_total"] == sum(r["bytes_total"] for r in rounds)
    last = {e["site"]: e["dice"] for e in events if e["event"] == "evaluate" and e["round"] == rounds[-1]["round"]}
    assert summary["site_dice_last"] == pytest.approx(last)
    assert len(summary["failures"]) == sum(e["event"] == "failure" for e in events)
    assert f"{summary['dice_weighted_last']:.4f}" in (out / "summary.md").read_text()
    return summary


def test_report_of_finished_run(tmp_path):
    run = tmp_path / "finished"
    _write_run(run)
    summary = _check_report(run)
    assert summary["status"] == "completed"
    assert summary["failures"][0]["site"] == "site-2"
    assert summary["cross_eval"][0]["dice_adapted"] == pytest.approx(0.4)
    assert "no (held out)" in (run / "report" / "summary.md").read_text()


def test_report_of_run_in_progress(tmp_path):
    finished = tmp_path / "finished"
    _write_run(finished)
    run = tmp_path / "running"
    run.mkdir()
    lines = (finished / METRICS_FILE).read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if '"round": 2' in line and '"event": "evaluate"' in line)
    (run / METRICS_FILE).write_text("".join(lines[:cut]) + lines[cut][: len(lines[cut]) // 2])
    summary = _check_report(run)
    assert summary["status"] == "in progress"
    assert summary["rounds_completed"] == 1


def test_report_names_missing_log(tmp_path, capsys):
    assert server_main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def _labelled_slices() -> tuple[np.ndarray, np.ndarray]:
    """A scan and a label map with three foreground classes side by side in one axial slice."""
    image = np.random.default_rng(0).random((1, 36, 24, 6)).astype(np.float32)
    truth = np.zeros((36, 24, 6), dtype=np.int64)
    for c in (1, 2, 3):
        truth[c * 9 - 6 : c * 9, 6:18, 3] = c
    return image, truth


def test_site_picture_has_a_legend_with_each_class_name_and_colour(tmp_path):
    from matplotlib.colors import to_rgb

    from client.site_report import CLASS_COLOURS, draw_overlay, overlay_figure

    image, truth = _labelled_slices()
    names = ["background", "CSF", "grey matter", "white matter"]
    fig = overlay_figure(image, truth, truth, names, "site site-1, round 2, validation case c1")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == names[1:]  # background is not drawn
    assert all(name in fig._suptitle.get_text() for name in names[1:])
    path = draw_overlay(image, truth, truth, len(names), "site-1", tmp_path / "report" / "c1.png", names)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    for colour in CLASS_COLOURS[:3]:  # each legend swatch is drawn in its class's full colour (overlays are blended)
        rgb = np.array([round(255 * v) for v in to_rgb(colour)])
        assert (np.abs(pixels - rgb).max(-1) <= 2).sum() >= 30, f"no legend swatch of {colour} in {path}"


def test_class_names_follow_the_federation_coding_in_the_site_own_words():
    from client.site_report import class_names
    from common.labels import label_codes

    federation = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    remapped_site = {"background": 0, "WM": 1, "GM": 2, "CSF": 3}  # same names, other values (data.remap_labels)
    agreed = label_codes(federation)
    assert class_names(remapped_site, agreed, 4) == ["background", "CSF", "GM", "WM"]
    assert class_names(remapped_site, (), 4) == ["background", "WM", "GM", "CSF"]  # a plan without a coding
    assert class_names({"background": 0}, (), 2) == ["background", "class 1"]

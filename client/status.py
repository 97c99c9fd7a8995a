"""Show what this site has done: daemon state, rounds, last metrics, what it sent, bundles refused.

Reads only the site's own state folder (site.state_dir); nothing is asked of
the server.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import keys
from common.cli import UserError, config_from_args, site_state_dir
from common.files import read_jsonl
from common.runs import BUNDLE_LOG, DAEMON_FILE, EGRESS_FILE, SITE_FILE

RECENT = 5


def _daemon_line(state: Path) -> str:
    path = state / DAEMON_FILE
    if not path.is_file():
        return "daemon: never started here"
    info = json.loads(path.read_text())
    alive = info.get("state") != "stopped"
    if alive:
        try:
            os.kill(int(info["pid"]), 0)
        except (ProcessLookupError, PermissionError):
            alive = False
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(info["time"]))
    line = f"daemon: {info['state'] if alive else 'not running'} (pid {info['pid']}, since {since})"
    return line + "".join(f"\n{extra}" for extra in _connection_lines(info.get("watch"), alive))


def _connection_lines(watch: dict | None, alive: bool) -> list[str]:
    """Connected or not and since when, and the last refusal, as the daemon last saw them (client/watch.py)."""
    if not watch or not alive:
        return []
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(watch["since"]))
    lines = [
        f"connection: connected since {at}"
        if watch["connected"]
        else f"connection: NOT connected since {at}: {watch['problem'] or 'no answer from the centre yet'}"
    ]
    if watch.get("last_refusal"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(watch["last_refusal_time"]))
        lines.append(f"last refusal: {watch['last_refusal']} ({when})")
    return lines


def report(state: Path) -> list[str]:
    from . import dp_ledger
    from .site_history import read

    lines = [_daemon_line(state)]
    info = json.loads((state / SITE_FILE).read_text()) if (state / SITE_FILE).is_file() else {}
    if info:
        split = info.get("split", {})
        lines.append(
            f"last round trained: {info.get('last_round', '-')}, model signature "
            f"{info.get('model_signature', '-')}, cases {len(split.get('train', []))} train / "
            f"{len(split.get('val', []))} validation"
        )
    history = list(read(state))
    rounds = sorted({h["round"] for h in history if h["round"]})
    sent = sum(h["bytes_sent"] for h in history)
    lines.append(f"replies sent: {len(history)} over {len(rounds)} round(s), {sent / 1e6:.2f} MB of model arrays")
    for h in history[-RECENT:]:
        metrics = ", ".join(
            f"{k} {v:.4g}"
            for k, v in sorted(h["metrics"].items())
            if isinstance(v, (int, float)) and k not in keys.TIMELINE_METRICS
        )
        rnd = "-" if h["round"] is None else h["round"]
        lines.append(f"  round {rnd:>3} {h['stage']:<8} sent {h['bytes_sent']:>9} B  {metrics}")
    egress = list(read_jsonl(state / EGRESS_FILE))
    if egress:
        lines.append(f"egress log: {len(egress)} message(s) recorded in {state / EGRESS_FILE}")
    lines += dp_ledger.status_lines(state)
    refused = [d for d in read_jsonl(state / BUNDLE_LOG) if d["decision"] == "refused"]
    if refused:
        lines.append(
            f"app bundles refused: {len(refused)} (last sha256 {refused[-1]['sha256'][:16]}..., "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(refused[-1]['time']))})"
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    state = site_state_dir(cfg)
    if not state.is_dir():
        raise UserError(f"{state} does not exist: this site has not run yet (start it with `fedseg-client start`).")
    print(f"site {cfg.site.name or '?'} ({state})")
    for line in report(state):
        print(line)
    return 0

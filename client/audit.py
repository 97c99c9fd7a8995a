"""Summarize everything this site has sent to the federation server, from its egress log.

For a hospital's privacy officer: when messages left, what records and keys
they carried, how many bytes, their SHA-256 (which the server logs too, so
the two sides can be compared), and every reply the egress guard blocked
with the reason, and every model exported from the site (``fedseg-client export``).
Reads <state_dir>/egress.jsonl and exports.jsonl; changes nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from common.cli import UserError, config_from_args, site_state_dir

DEFAULT_LAST = 20
SHA_SHOWN = 16
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--last",
        type=int,
        default=DEFAULT_LAST,
        help=f"List the last N messages one per line (default {DEFAULT_LAST}; 0: none).",
    )
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON instead of text.")


def _when(seconds: float) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(seconds))


def summarize(entries: list[dict]) -> dict:
    """Counts, bytes, period and the distinct record keys that left, plus every blocked attempt."""
    sent = [e for e in entries if e["status"] == "sent"]
    left: dict[str, set[str]] = {}
    for e in sent:
        for record, names in e["keys"].items():
            left.setdefault(record, set()).update(names)
    return {
        "messages_sent": len(sent),
        "by_type": dict(Counter(f"{e['message_type']} {e['kind']}" for e in sent)),
        "bytes_sent": sum(e["bytes"] for e in sent),
        "first": _when(entries[0]["time"]) if entries else None,
        "last": _when(entries[-1]["time"]) if entries else None,
        "rounds": sorted({e["round"] for e in sent if e["round"] is not None}),
        "records_sent": {record: len(names) for record, names in sorted(left.items())},
        "metric_names_sent": sorted(left.get("metrics", set()) | left.get("fingerprint", set())),
        "identity_fields_sent": sorted(left.get("identity", set())),
        "error_reasons_sent": sorted({e["reason"] for e in sent if e["kind"] == "error"}),
        "blocked": [
            {
                "time": _when(e["time"]),
                "round": e["round"],
                "message_type": e["message_type"],
                "problems": e.get("blocked", []),
            }
            for e in entries
            if e["status"] == "blocked"
        ],
    }


def _print_text(site: str, path: Path, summary: dict, entries: list[dict], last: int) -> None:
    print(f"Egress audit of site '{site}' ({path})")
    if not entries:
        print("  nothing has left this site yet.")
        return
    print(f"  period:        {summary['first']} .. {summary['last']}")
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary["by_type"].items()))
    print(f"  messages sent: {summary['messages_sent']} ({kinds}); {summary['bytes_sent']:,} bytes")
    print(f"  rounds:        {summary['rounds']}")
    records = ", ".join(f"{r} ({n} keys)" for r, n in summary["records_sent"].items())
    print(f"  records sent:  {records or 'none'}")
    print(f"  metrics sent:  {', '.join(summary['metric_names_sent']) or 'none'}")
    print(f"  identity sent: {', '.join(summary['identity_fields_sent']) or 'none'}")
    for reason in summary["error_reasons_sent"]:
        print(f"  error sent:    {reason}")
    print(f"  BLOCKED:       {len(summary['blocked'])} reply(ies) stopped by the egress guard")
    for b in summary["blocked"]:
        print(f"    {b['time']} round {b['round']} {b['message_type']}: {'; '.join(b['problems'])}")
    if last > 0:
        print(f"  last {min(last, len(entries))} entries (time, round, type, status, bytes, sha256):")
        for e in entries[-last:]:
            print(
                f"    {_when(e['time'])}  {str(e['round']):>5}  {e['message_type']:<9} {e['status']:<8}"
                f"{e['bytes']:>12,}  {e['sha256'][:SHA_SHOWN]}"
            )


def run(args: argparse.Namespace) -> int:
    from common.runs import EGRESS_FILE

    from .egress import EgressLog
    from .site_model import exports

    cfg = config_from_args(args)
    state_dir = site_state_dir(cfg)
    if not state_dir.is_dir():
        raise UserError(
            f"the site's state directory {state_dir} does not exist; check site.state_dir in "
            f"{args.config or 'the config'}."
        )
    entries = EgressLog(state_dir).entries()
    summary = summarize(entries)
    exported = exports(state_dir)
    if args.json:
        print(
            json.dumps(
                {"site": cfg.site.name, "egress_log": str(state_dir / EGRESS_FILE), **summary, "exports": exported},
                indent=2,
            )
        )
    else:
        _print_text(cfg.site.name, state_dir / EGRESS_FILE, summary, entries, args.last)
        _print_exports(exported)
    return 0


def _print_exports(exported: list[dict]) -> None:
    """Models written out of the state folder by `fedseg-client export`, one line each."""
    print(f"  model exports: {len(exported)}")
    for e in exported:
        print(
            f"    {_when(e['time'])}  run {e['run']} {e['weights']} (round {e['round']})  -> {e['folder']}"
            f"  sha256 {e['sha256'][:SHA_SHOWN]}"
        )

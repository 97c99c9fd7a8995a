"""The site operator's view: one plain line per change, from the real files the SuperNode and ClientApp write."""

from __future__ import annotations

import json
import os

from client.status import report
from client.watch import SiteWatch
from common.runs import BUNDLE_LOG, DAEMON_FILE, EGRESS_FILE, SUPERNODE_LOG


def _append(path, *lines: str) -> None:
    with path.open("a") as f:
        f.write("".join(f"{line}\n" for line in lines))


def test_each_change_is_said_once_in_plain_words_and_status_shows_it(tmp_path):
    (tmp_path / SUPERNODE_LOG).write_text("INFO : old line before the daemon started\n")
    watch = SiteWatch(tmp_path, "centre.example:9092")
    assert watch.poll() == []  # what was there before is not news
    _append(
        tmp_path / SUPERNODE_LOG,
        "WARNING : Connection attempt failed, retrying in 1.2 seconds",
        "WARNING : Connection attempt failed, retrying in 2.5 seconds",
    )
    assert watch.poll() == [
        "not connected: the centre cannot be reached at site.server_address; the SuperNode keeps trying"
    ]  # said once, not once per retry
    _append(tmp_path / SUPERNODE_LOG, "INFO : SuperNode ID: 42", "INFO : Receiving: train message")
    assert watch.poll() == ["connected to the centre at centre.example:9092"]
    _append(
        tmp_path / EGRESS_FILE,
        json.dumps(
            {
                "time": 1.0,
                "message_type": "train",
                "kind": "error",
                "reason": "site a: fewer cases than the site's minimum cohort",
            }
        ),
    )
    _append(tmp_path / BUNDLE_LOG, json.dumps({"time": 2.0, "decision": "refused", "sha256": "ab" * 32}))
    _append(tmp_path / SUPERNODE_LOG, "INFO : Failed to activate SuperNode")
    said = watch.poll()
    assert said == [
        "not connected: the centre did not accept this site's key; ask it to allow-list the .pub file "
        "(fedseg-server certs add-site) and check that it is running",
        "refused a train message: fewer cases than the site's minimum cohort",
        f"refused the centre's app bundle {'ab' * 8}...: it is not in site.approved_bundles (review "
        "it, then fedseg-client approve)",
    ]
    (tmp_path / DAEMON_FILE).write_text(
        json.dumps({"pid": os.getpid(), "time": 0.0, "state": "running", "watch": watch.as_dict()})
    )
    shown = "\n".join(report(tmp_path))
    assert "connection: NOT connected since" in shown and "did not accept this site's key" in shown
    assert "last refusal: refused the centre's app bundle" in shown

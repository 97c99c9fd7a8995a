"""What the site's operator sees while the daemon runs: connected or not, and every refusal, in plain words.

The SuperNode writes Flower's log, the ClientApp writes the egress audit and
the bundle guard its decisions, each to its own file in the state folder.
The daemon follows the three and says one line whenever something changes
(connected, unreachable, key not registered, certificate, bundle not
approved, a message refused by the site and why), and keeps the latest state
in daemon.json for ``fedseg-client status``. Nothing here is sent anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.runs import BUNDLE_LOG, EGRESS_FILE, SUPERNODE_LOG

CONNECTED = ("SuperNode ID", "Receiving: ", "Sending: ")
"""Phrases in Flower's SuperNode log that only appear once the centre has accepted this node."""
PROBLEMS = {
    "Connection attempt failed": "the centre cannot be reached at site.server_address; the SuperNode keeps trying",
    "Connection refused": "nothing listens at site.server_address (the centre is down, or the address is wrong)",
    "CERTIFICATE_VERIFY_FAILED": "the server's TLS certificate was not issued by the CA in site.root_certificate",
    "Failed to activate SuperNode": "the centre did not accept this site's key; ask it to allow-list the .pub file "
    "(fedseg-server certs add-site) and check that it is running",
}
"""Phrases in Flower's log that mean this site is not connected, and what they mean for the site; when a log
holds several, the later entries are the more specific."""


@dataclass
class SiteView:
    """The operator's view, kept in daemon.json under ``watch``."""

    connected: bool = False
    since: float = field(default_factory=time.time)
    """When ``connected`` last changed."""
    problem: str = ""
    """Why the site is not connected, in plain words ('' when it is, or before the first attempt)."""
    last_refusal: str = ""
    last_refusal_time: float = 0.0


class SiteWatch:
    """Follows the state folder's logs from where they end now; ``poll`` returns the lines to say."""

    def __init__(self, state: Path, server: str) -> None:
        self.state = state
        self.server = server
        self.view = SiteView()
        self._offsets = {name: _size(state / name) for name in (SUPERNODE_LOG, EGRESS_FILE, BUNDLE_LOG)}

    def poll(self) -> list[str]:
        said = [line for text in self._new(SUPERNODE_LOG) if (line := self._connection(text))]
        said += [
            self._refused(f"refused a {e.get('message_type')} message: {_reason(e)}", e.get("time"))
            for e in _json_lines(self._new(EGRESS_FILE))
            if e.get("kind") == "error"
        ]
        said += [
            self._refused(
                f"refused the centre's app bundle {str(d.get('sha256'))[:16]}...: it is not in "
                "site.approved_bundles (review it, then fedseg-client approve)",
                d.get("time"),
            )
            for d in _json_lines(self._new(BUNDLE_LOG))
            if d.get("decision") == "refused"
        ]
        return said

    def as_dict(self) -> dict:
        return asdict(self.view)

    def _connection(self, text: str) -> str | None:
        if any(phrase in text for phrase in CONNECTED):
            if self.view.connected:
                return None
            self.view = SiteView(True, time.time(), "", self.view.last_refusal, self.view.last_refusal_time)
            return f"connected to the centre at {self.server}"
        problem = next((why for phrase, why in PROBLEMS.items() if phrase in text), None)
        if problem is None or (problem == self.view.problem and not self.view.connected):
            return None
        self.view = SiteView(False, time.time(), problem, self.view.last_refusal, self.view.last_refusal_time)
        return f"not connected: {problem}"

    def _refused(self, words: str, when: object) -> str:
        self.view.last_refusal = words
        self.view.last_refusal_time = float(when) if isinstance(when, (int, float)) else time.time()
        return words

    def _new(self, name: str) -> list[str]:
        """Whole lines appended to ``name`` since the last call (a file that shrank is read from its start)."""
        path = self.state / name
        size = _size(path)
        start = self._offsets.get(name, 0) if size >= self._offsets.get(name, 0) else 0
        if size <= start:
            return []
        with path.open("rb") as f:
            f.seek(start)
            chunk = f.read(size - start)
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self._offsets[name] = start + len(whole)
        return whole.decode(errors="replace").splitlines()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _json_lines(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def _reason(entry: dict) -> str:
    """The fixed reason of a refused message, without its 'site <name>: ' prefix."""
    reason = str(entry.get("reason", ""))
    return reason.split(": ", 1)[1] if reason.startswith("site ") and ": " in reason else reason

"""``flower-supernode`` with the site's poll interval instead of Flower's fixed three seconds.

Flower 1.42's SuperNode asks the SuperLink for work, and when there is none
sleeps 3 s; while a ClientApp works it looks for the reply every 0.5 s. Both
waits are plain ``time.sleep`` calls in ``flwr.supernode.start_client_internal``
with no setting, and together they cost a deployed round seconds of idle time
per message. This entry point caps every sleep of that module at
``site.poll_interval_s`` (handed over in ``POLL_ENV`` by the site daemon), then
runs Flower's own ``flower-supernode`` with the arguments it was given. When
Flower's main loop ends, for example after a link dropped in the middle of a TLS
read (Flower gives up on any error that mentions SSL), the process exits
at once: otherwise the Runtime API's non-daemon thread would keep a SuperNode
that no longer pulls or sends heartbeats alive, and the daemon would never
restart it. A Flower
without that module-level ``time`` keeps its own intervals, and says so. The
SuperNode also retries objects that are not there yet within half a second
(common/flower_env.py, ``quicken_object_pulls``), and notes when it pulled each
message for the round's timeline (client/timeline.py), in a file named after
the message id only when that id is a Flower message id (the id comes from the
centre, and must never become a path). It runs in the site's state folder.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from client.timeline import pull_note

POLL_ENV = "FEDSEG_SUPERNODE_POLL_S"
PATCHED_MODULE = "flwr.supernode.start_client_internal"


class CappedSleep:
    """The ``time`` module as seen by the SuperNode's loop: everything as usual, sleeps at most ``cap_s``."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def cap_sleeps(module: ModuleType, cap_s: float) -> bool:
    """Make ``module``'s ``time.sleep`` calls wait at most ``cap_s``; False if it does not use ``time``."""
    if getattr(module, "time", None) is not time:
        return False
    module.time = CappedSleep(cap_s)
    return True


def record_pull(state_dir: Path, message_id: object) -> None:
    """Note when the SuperNode pulled ``message_id``; the ClientApp reads and removes the note.

    An id that is not a Flower message id is noted nowhere (client/timeline.py ``pull_note``), and a note that
    cannot be written is skipped: it only times the round, and must never stop the SuperNode.
    """
    path = pull_note(state_dir, message_id)
    if path is None:
        return
    try:
        path.parent.mkdir(exist_ok=True)
        path.write_text(repr(time.time()))
    except OSError:
        return


def note_pulls(module: ModuleType, state_dir: Path) -> bool:
    """Note when each message is pulled (client/timeline.py): Flower does not pass that moment on to the ClientApp."""
    pull = getattr(module, "_pull_and_store_message", None)
    if pull is None:
        return False

    def noting(*args: object, receive: Callable[[], object], **kwargs: object) -> object:
        def receive_noted() -> object:
            got = receive()
            if got is not None:
                record_pull(state_dir, got[0].metadata.message_id)
            return got

        return pull(*args, receive=receive_noted, **kwargs)

    module._pull_and_store_message = noting
    return True


def main() -> None:
    import importlib

    from flwr.supernode.cli.flower_supernode import flower_supernode

    from common.flower_env import quicken_object_pulls

    quicken_object_pulls()
    loop = importlib.import_module(PATCHED_MODULE)
    cap = float(os.environ.get(POLL_ENV, "0") or 0)
    if cap > 0 and not cap_sleeps(loop, cap):
        print(f"fedseg: {PATCHED_MODULE} has no module-level time; keeping Flower's poll intervals "
              "(pin flwr 1.42 or update client/supernode.py).", file=sys.stderr)
    note_pulls(loop, Path.cwd())
    sys.argv[0] = "flower-supernode"
    try:
        flower_supernode()
    except BaseException as stop:  # noqa: B036 - whatever ends Flower's main loop must end this process
        code = stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) else 1
        if not isinstance(stop, SystemExit):
            traceback.print_exc()
            print("fedseg: the SuperNode's main loop stopped; exiting so that the site daemon restarts it.",
                  file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()

"""Flower's ``flower-supernode``, run with its sleeps capped and its pulls reported (patches of Flower 1.42).

Flower 1.42's SuperNode asks the SuperLink for work, and when there is none
sleeps 3 s; while a ClientApp works it looks for the reply every 0.5 s. Both
waits are plain ``time.sleep`` calls in ``flwr.supernode.start_client_internal``
with no setting, and together they cost a deployed round seconds of idle time
per message. :func:`run_supernode` caps every sleep of that module, reports
each pulled message's id to a callback (Flower does not pass that moment on to
the ClientApp), retries objects that are not there yet within half a second
(:mod:`.object_pulls`), then runs Flower's own ``flower-supernode`` with the
process's arguments. When Flower's main loop ends, for example after a link
dropped in the middle of a TLS read (Flower gives up on any error that
mentions SSL), the process exits at once: otherwise the Runtime API's
non-daemon thread would keep a SuperNode that no longer pulls or sends
heartbeats alive, and whoever supervises it would never restart it. A Flower
without that module-level ``time`` keeps its own intervals, and says so.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Message

from . import FLOWER_VERSION

LOOP_MODULE = "flwr.supernode.start_client_internal"
"""The module of the SuperNode's main loop: its ``time`` is capped and its ``PULL_STEP`` wrapped."""
PULL_STEP = "_pull_and_store_message"
"""The loop's step that pulls one message; its ``receive`` keyword argument returns ``(message, tree)`` or None."""
SUPERNODE_CLI = "flwr.supernode.cli.flower_supernode"


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
    vars(module)["time"] = CappedSleep(cap_s)
    return True


def note_pulls(module: ModuleType, on_pull: Callable[[object], None]) -> bool:
    """Call ``on_pull(message_id)`` for every message ``module``'s pull step receives; False if it has none.

    The id is the SuperLink's, so the centre's: ``on_pull`` must treat it as untrusted input.
    """
    pull = getattr(module, PULL_STEP, None)
    if pull is None:
        return False

    def noting(*args: object, receive: Callable[[], tuple[Message, object] | None], **kwargs: object) -> object:
        def receive_noted() -> tuple[Message, object] | None:
            got = receive()
            if got is not None:
                on_pull(got[0].metadata.message_id)
            return got

        return pull(*args, receive=receive_noted, **kwargs)

    setattr(module, PULL_STEP, noting)
    return True


def run_supernode(poll_cap_s: float, on_pull: Callable[[object], None]) -> None:
    """Run ``flower-supernode`` with ``sys.argv``'s arguments, its sleeps capped at ``poll_cap_s`` (0: Flower's own).

    Anything that ends Flower's main loop but a normal return ends the process with it (``os._exit``).
    """
    import importlib

    from .object_pulls import quicken_object_pulls

    flower_supernode = importlib.import_module(SUPERNODE_CLI).flower_supernode
    quicken_object_pulls()
    loop = importlib.import_module(LOOP_MODULE)
    if poll_cap_s > 0 and not cap_sleeps(loop, poll_cap_s):
        print(
            f"fedseg: {LOOP_MODULE} has no module-level time; keeping Flower's poll intervals "
            f"(pin flwr {FLOWER_VERSION} or update common/flower/supernode.py).",
            file=sys.stderr,
        )
    note_pulls(loop, on_pull)
    sys.argv[0] = "flower-supernode"
    try:
        flower_supernode()
    except BaseException as stop:  # noqa: B036 - whatever ends Flower's main loop must end this process
        code = stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) else 1
        if not isinstance(stop, SystemExit):
            traceback.print_exc()
            print(
                "fedseg: the SuperNode's main loop stopped; exiting so that the site daemon restarts it.",
                file=sys.stderr,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

"""``flower-supernode`` for a site: its poll interval, and a note of when each message was pulled.

The site daemon (client/daemon.py) starts this module in the site's state
folder, with ``site.poll_interval_s`` in ``POLL_ENV``. Flower's SuperNode runs
with every sleep capped at that interval and its pulls reported
(common/flower/supernode.py, where the patches of Flower live); this module
decides what a pull leaves behind: a note of the moment, for the round's
timeline (client/timeline.py), in a file named after the message id only when
that id is a Flower message id (the id comes from the centre, and must never
become a path).
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

from client.timeline import pull_note
from common.flower.supernode import run_supernode

POLL_ENV = "FEDSEG_SUPERNODE_POLL_S"


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


def main() -> None:
    run_supernode(float(os.environ.get(POLL_ENV, "0") or 0), partial(record_pull, Path.cwd()))


if __name__ == "__main__":
    main()

"""Flower's object pulls retried within half a second, not after 1 s doubling to 10 s (a patch of Flower 1.42).

A message's arrays arrive as separate objects after the message itself: the
SuperNode starts the ClientApp before it has pulled them all, and the
ServerApp sees a reply before the SuperNode has pushed them all. Flower 1.42
then waits 1, 2, 4, 8 s between tries (its defaults have no setting), which a
fast ClientApp hits on every message. :func:`quicken_object_pulls` changes the
keyword defaults (``__kwdefaults__``) of its two pull functions in the calling
process; every fedseg process that pulls (ServerApp, SuperNode, ClientApp
launcher) calls it before Flower pulls anything.
"""

from __future__ import annotations

PULL_MODULE = "flwr.supercore.inflatable.inflatable_utils"
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")
PULL_DEFAULTS = frozenset({"initial_backoff", "backoff_cap", "max_tries_per_object"})
"""The keyword defaults of each pull function this patch sets."""
PULL_INITIAL_BACKOFF_S = 0.05
PULL_BACKOFF_CAP_S = 0.5


def quicken_object_pulls() -> bool:
    """Retry objects that are not there yet after 0.05 s doubling to 0.5 s; False if this Flower has neither
    pull function with those defaults (its own back-off is then kept)."""
    import importlib

    inflatable_utils = importlib.import_module(PULL_MODULE)
    found = False
    for name in PULL_FUNCTIONS:
        defaults = getattr(getattr(inflatable_utils, name, None), "__kwdefaults__", None) or {}
        if PULL_DEFAULTS <= defaults.keys():
            # unlimited tries: Flower's 500 tries at up to 10 s each become max_time (2 h) alone
            defaults.update(
                initial_backoff=PULL_INITIAL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S, max_tries_per_object=None
            )
            found = True
    return found

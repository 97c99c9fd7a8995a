"""One terminal line per metrics-log event, for every command that follows a run.

Site names and failure reasons come from the other side of the wire (a site's
error text, a name it claims); every text field is put on one printable line
(control characters escaped) so that no site can split, forge or recolour a
line of the centre's console.
"""

from __future__ import annotations

import re
from typing import Any

from .metrics_log import EVENT, Event

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 control characters and Unicode line separators: a newline forges a line, an escape sequence
rewrites the terminal."""


def one_line(value: object) -> str:
    """``value`` as text on one printable line: every control character escaped (``\\n``, ``\\x1b``)."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def describe(event: dict[str, Any], expected: int | None = None) -> str | None:
    """The progress line for ``event``, or None for events not worth a line.

    ``expected`` is the number of sites the federation expects, when known; the
    round line then reads "2/3 site(s) replied".
    """
    kind = event[EVENT]
    where = f"  round {one_line(event.get('round') or '-'):>3}  {one_line(event.get('site') or ''):<10}"
    if kind == Event.TRAIN:
        return (
            f"{where} trained   loss {event['loss']:.4f}  prox {event['proximal_loss']:.5f}  "
            f"{event['duration_s']:.1f} s"
        )
    if kind == Event.EVALUATE:
        return f"{where} evaluated Dice {event['dice']:.4f}"
    if kind == Event.FAILURE:
        return f"{where} FAILED ({one_line(event.get('stage', '?'))}): {one_line(event.get('reason'))}"
    if kind == Event.NO_SCORE:
        return f"{where} trains, reports no validation score: {event.get('reason')}"
    if kind == Event.ROUND:
        dice = event["dice_weighted"]
        replied = f"{event['sites_ok']}/{expected}" if expected else f"{event['sites_ok']}"
        return (
            f"round {event['round']}: {replied} site(s) replied, failed {one_line(event['sites_failed'] or 'none')}, "
            f"Dice (weighted) {'n/a' if dice is None else f'{dice:.4f}'}, {event['duration_s']:.1f} s"
        )
    if kind == Event.RUN_START and event.get("resumed_from_round"):
        return f"resuming after round {event['resumed_from_round']} (from its checkpoint)"
    if kind == Event.RUN_END:
        best = event.get("best_dice")
        if not event.get("best_round"):
            return (
                f"run finished: {one_line(event['status'])}; no site reported a validation score, so the last "
                f"round ({event.get('rounds_completed', 0)}) is the run's model"
            )
        return (
            f"run finished: {one_line(event['status'])}; best round {event['best_round']}"
            f" (Dice {'n/a' if best is None else f'{best:.4f}'})"
        )
    return None

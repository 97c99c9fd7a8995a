"""One terminal line per metrics-log event, for every command that follows a run."""

from __future__ import annotations

from typing import Any


def describe(event: dict[str, Any], expected: int | None = None) -> str | None:
    """The progress line for ``event``, or None for events not worth a line.

    ``expected`` is the number of sites the federation expects, when known; the
    round line then reads "2/3 site(s) replied".
    """
    kind = event["event"]
    where = f"  round {event.get('round') or '-':>3}  {event.get('site') or '':<10}"
    if kind == "train":
        return (f"{where} trained   loss {event['loss']:.4f}  prox {event['proximal_loss']:.5f}  "
                f"{event['duration_s']:.1f} s")
    if kind == "evaluate":
        return f"{where} evaluated Dice {event['dice']:.4f}"
    if kind == "failure":
        return f"{where} FAILED ({event.get('stage', '?')}): {event.get('reason')}"
    if kind == "no-score":
        return f"{where} trains, reports no validation score: {event.get('reason')}"
    if kind == "round":
        dice = event["dice_weighted"]
        replied = f"{event['sites_ok']}/{expected}" if expected else f"{event['sites_ok']}"
        return (f"round {event['round']}: {replied} site(s) replied, failed {event['sites_failed'] or 'none'}, "
                f"Dice (weighted) {'n/a' if dice is None else f'{dice:.4f}'}, {event['duration_s']:.1f} s")
    if kind == "run-start" and event.get("resumed_from_round"):
        return f"resuming after round {event['resumed_from_round']} (from its checkpoint)"
    if kind == "run-end":
        best = event.get("best_dice")
        return (f"run finished: {event['status']}; best round {event['best_round']}"
                f" (Dice {'n/a' if best is None else f'{best:.4f}'})")
    return None

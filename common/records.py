"""Typed reads of Flower record entries, whose values are unions (a number or a list, text or bytes).

The receiving boundaries check each entry's type before a handler reads it: client/inbound.py at the
site, server/validation.py and server/inbound.py at the centre. A read here turns that checked fact into
a type for the reader, and names the entry in a TypeError should an unchecked value ever reach it.
"""

from __future__ import annotations

from collections.abc import Mapping


def number(record: Mapping[str, object], key: str) -> int | float:
    """``record[key]``, a number (a bool counts as one, as ``float()`` and ``int()`` take it)."""
    value = record[key]
    if not isinstance(value, (int, float)):
        raise TypeError(f"record entry '{key}' is a {type(value).__name__}, not a number")
    return value

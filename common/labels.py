"""What the federation's label values mean: agreed at planning by name, never by value alone.

Two hospitals can both declare four classes and still disagree on which is
which (one codes CSF as 1 and WM as 3, the other the reverse): counting
classes would federate them into a model that learns neither. Each site
therefore sends, in its fingerprint, a numeric code of the name behind every
label value (and every channel); the centre takes the most common coding as
the federation's, refuses a site whose coding differs by name, and, when the
centre allows it (``data.remap_labels``), lets a site whose names are the
same but whose values differ remap them at the site.

A code is a short hash of the normalized name: a number, so the site's egress
guard lets it out like any metric, and the same name gives the same code at
every site. Names are compared case-insensitively, with spaces, '-' and '_'
alike.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

CODE_BITS = 24
"""Codes stay below 2**24, exact in any float a metric may travel as; ten names collide with odds of 3 in 10**6."""
NO_NAME = 0
"""The code of a label value that dataset.json leaves unnamed."""


class LabelMismatch(ValueError):
    """A site's label names or coding differ from the federation's; the message names both maps."""


class ChannelMismatch(ValueError):
    """A site's image channels differ in number from the federation's."""


def name_code(name: str) -> int:
    """The code of one label or channel name (1 .. 2**24 - 1)."""
    normal = " ".join(name.replace("_", " ").replace("-", " ").split()).casefold()
    code = int.from_bytes(hashlib.sha256(normal.encode()).digest()[:4], "big") % ((1 << CODE_BITS) - 1)
    return code + 1


def label_codes(labels: Mapping[str, int]) -> list[int]:
    """The codes of a dataset.json label map (name -> value), in value order 0, 1, ..., max."""
    by_value = {value: name for name, value in labels.items()}
    return [name_code(by_value[v]) if v in by_value else NO_NAME for v in range(max(by_value) + 1)]


def channel_codes(channel_names: Mapping[str, str]) -> list[int]:
    """The codes of a dataset.json channel map (index -> name), in channel order."""
    return [name_code(channel_names[k]) for k in sorted(channel_names, key=int)]


def agreed_coding(codings: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """The federation's label coding: the most common one among the sites (a tie: the first site's by name)."""
    ordered = [tuple(codings[site]) for site in sorted(codings)]
    counts = Counter(ordered)
    best = max(counts.values())
    return next(c for c in ordered if counts[c] == best)


def coding_problem(site: str, coding: Sequence[int], agreed: Sequence[int], remap: bool) -> str | None:
    """Why a site with ``coding`` cannot train with the federation's ``agreed`` one, or None.

    The same codes in another order are the same names with other values: the
    site may remap them when ``remap`` allows it. The message gives both maps
    as value -> the federation's value, so the centre can say what differs
    without ever seeing a name.
    """
    coding, agreed = tuple(coding), tuple(agreed)
    if coding == agreed:
        return None
    if sorted(coding) == sorted(agreed) and len(set(agreed)) == len(agreed):
        if remap:
            return None
        moved = {v: agreed.index(c) for v, c in enumerate(coding) if agreed.index(c) != v}
        pairs = ", ".join(f"its {v} is the federation's {w}" for v, w in moved.items())
        return (
            f"site {site} names its labels like the federation but codes them with other values ({pairs}); "
            "recode its labelsTr, or set data.remap_labels: true in the centre's configuration to remap them "
            "by name at the site"
        )
    if len(coding) != len(agreed):
        return (
            f"site {site} declares {len(coding)} label values, the federation {len(agreed)}; every site's "
            "dataset.json must label the same classes"
        )
    differ = [v for v, (a, b) in enumerate(zip(coding, agreed, strict=True)) if a != b]
    return (
        f"site {site}'s label names differ from the federation's at values {differ}; every site's "
        "dataset.json must give each label value the same name ('fedseg-client check' at the site shows "
        "both maps)"
    )


def remap_table(labels: Mapping[str, int], agreed: Sequence[int]) -> np.ndarray | None:
    """A lookup table site value -> federation value, or None when the site's values are the federation's.

    Raises LabelMismatch, naming both maps by the site's own names, when the
    site's names are not the federation's.
    """
    own = label_codes(labels)
    if tuple(own) == tuple(agreed):
        return None
    names = {name_code(n): n for n in labels}
    if sorted(own) != sorted(agreed):
        theirs = {v: names.get(c, "a name this site does not use") for v, c in enumerate(agreed)}
        mine = {v: n for n, v in sorted(labels.items(), key=lambda item: item[1])}
        raise LabelMismatch(
            f"this site's labels {mine} are not the federation's {theirs}; give every label "
            "value the federation's name in dataset.json (and recode labelsTr to match)"
        )
    return np.asarray([agreed.index(c) for c in own], dtype=np.int64)


def describe_coding(labels: Mapping[str, int], agreed: Sequence[int]) -> str:
    """The federation's label map in this site's own names, for the site's operator (check, site.log)."""
    names = {name_code(n): n for n in labels}
    return ", ".join(f"{v}: {names.get(c, '?')}" for v, c in enumerate(agreed))

"""The egress guard: the one gate every reply of a site passes, and the audit log behind it.

"Patient data never leaves the hospital" is enforced here, not assumed. A
reply may carry only:

- the travelling model tensors (exactly the keys, shapes and wire dtypes of
  the model signature; never a site-local norm tensor),
- numeric metrics whose names are declared in ``common.keys`` (training and
  evaluation metrics, one Dice per foreground class, ``fp_*`` fingerprint
  aggregates; short numeric lists only for fingerprints),
- the identity ConfigRecord (this site's name and model signature),
- or an error whose reason is short, fixed wording without paths, file names
  or digits.

Anything else (an extra array, an image patch, a string, a file name, an
oversize payload) is blocked: the details are logged at the site, the server
gets a sanitized error instead, and both the blocked attempt and what was
sent in its place are recorded in ``<state_dir>/egress.jsonl``. Every
outgoing message is recorded there (round, keys, bytes, SHA-256 of the
content as in ``common.digest``), which is what ``fedseg-client audit`` reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from torch import nn

from common import keys
from common.config import FedsegConfig
from common.digest import content_bytes, content_sha256
from common.metrics_log import read_events
from common.params import ParameterSplit
from common.wire import error_reason

from .site_state import SiteState

log = logging.getLogger("fedseg.client")

EGRESS_FILE = "egress.jsonl"
EGRESS_BLOCKED_CODE = 1002
BLOCKED_REASON = "a reply was blocked by the site's egress guard; see the site's egress audit"
MAX_REASON_CHARS = 240
NUMPY_STYPE = "numpy.ndarray"
NPY_HEADER_MAX = 4096
"""Bytes an .npy header may add to an array's raw data (numpy pads it to 64 or 128)."""
METADATA_ALLOWANCE = 64 * 1024
"""Bytes allowed beyond the model arrays for metric and identity records."""
MAX_METRICS = 128
"""Most metric entries one reply may carry (fingerprints included)."""
SAFE_REASON = re.compile(r"[A-Za-z ,;:()'`\-]+")
"""Sanitized error wording: letters and punctuation only, so no path, file name, case id or number."""


class SiteLike(Protocol):
    """The parts of the ClientApp's per-message Site the guard needs (client_app.Site)."""

    cfg: FedsegConfig
    model: nn.Module
    split: ParameterSplit
    signature: str
    state: SiteState


@dataclass(frozen=True)
class EgressPolicy:
    """What one site may send in this run."""

    site: str
    signature: str
    arrays: dict[str, tuple[tuple[int, ...], frozenset[str]]]
    """Travelling key -> (shape, dtypes allowed on the wire)."""
    metric_names: frozenset[str]
    max_bytes: int

    @classmethod
    def for_site(cls, site: SiteLike, wire_dtype: str) -> EgressPolicy:
        state = site.model.state_dict()
        arrays, total = {}, 0
        for key in site.split.travelling:
            tensor = state[key]
            dtypes = {wire_dtype} if tensor.is_floating_point() else {str(tensor.dtype).removeprefix("torch.")}
            arrays[key] = (tuple(tensor.shape), frozenset(dtypes))
            total += tensor.numel() * tensor.element_size() + NPY_HEADER_MAX + len(key)
        per_class = {f"{prefix}{i}" for prefix in (keys.DICE_CLASS_PREFIX, keys.TEST_DICE_CLASS_PREFIX)
                     for i in range(1, site.cfg.model.out_channels)}
        return cls(
            site=site.cfg.site.name,
            signature=site.signature,
            arrays=arrays,
            metric_names=frozenset(keys.EGRESS_METRICS | per_class),
            max_bytes=total + METADATA_ALLOWANCE,
        )


# --- the checks ---------------------------------------------------------------------


def _array_problems(record: ArrayRecord, policy: EgressPolicy) -> Iterator[str]:
    extra = sorted(set(record) - set(policy.arrays))
    missing = sorted(set(policy.arrays) - set(record))
    if extra:
        yield f"arrays not in the model signature: {extra[:5]}"
    if missing:
        yield f"travelling arrays missing: {missing[:5]}"
    for key, array in record.items():
        if key not in policy.arrays:
            continue
        shape, dtypes = policy.arrays[key]
        if array.stype != NUMPY_STYPE:
            yield f"array '{key}' has serialization '{array.stype}', expected '{NUMPY_STYPE}'"
        if tuple(array.shape) != shape or array.dtype not in dtypes:
            yield f"array '{key}' is {array.dtype}{list(array.shape)}, the signature says {sorted(dtypes)}{list(shape)}"
        raw = int(np.prod(shape)) * np.dtype(array.dtype).itemsize if array.dtype in dtypes else 0
        if len(array.data) > raw + NPY_HEADER_MAX:
            yield f"array '{key}' carries {len(array.data)} bytes, more than its shape needs"


def _metric_problems(record: MetricRecord, policy: EgressPolicy) -> Iterator[str]:
    for name, value in record.items():
        fingerprint = name.startswith(keys.FINGERPRINT_PREFIX)
        if name not in policy.metric_names and not fingerprint:
            yield f"metric '{name}' is not declared in common.keys"
        if isinstance(value, list) and (not fingerprint or len(value) > keys.EGRESS_MAX_LIST):
            yield f"metric '{name}' is a list of {len(value)} values; only fingerprint lists up to " \
                  f"{keys.EGRESS_MAX_LIST} may leave"


def _identity_problems(record: ConfigRecord, policy: EgressPolicy) -> Iterator[str]:
    expected = {keys.SITE: policy.site, keys.SIGNATURE: policy.signature}
    if set(record) != set(expected):
        yield f"identity record holds {sorted(record)}, allowed are {sorted(expected)}"
    for key, value in expected.items():
        if key in record and record[key] != value:
            yield f"identity '{key}' is not this site's"


def reason_problems(reason: str, site: str) -> list[str]:
    """Problems with an error reason: it must be fixed wording, short, with no path or number."""
    text = reason.removeprefix(error_reason(site, ""))
    if len(reason) > MAX_REASON_CHARS:
        return [f"error reason of {len(reason)} characters (limit {MAX_REASON_CHARS})"]
    if not SAFE_REASON.fullmatch(text):
        return ["error reason holds characters outside sanitized wording (path, file name or number?)"]
    return []


def problems(reply: Message, policy: EgressPolicy | None) -> list[str]:
    """Everything in ``reply`` that may not leave the site; empty when the reply may be sent."""
    if reply.has_error():
        return reason_problems(reply.error.reason or "", policy.site if policy else "unknown")
    if policy is None:
        return ["a reply with content from a site whose configuration could not be resolved"]
    found: list[str] = []
    content = reply.content
    metric_count = 0
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and name == keys.ARRAYS:
            found += _array_problems(record, policy)
        elif isinstance(record, MetricRecord) and name in (keys.METRICS, keys.FINGERPRINT):
            found += _metric_problems(record, policy)
            metric_count += len(record)
        elif isinstance(record, ConfigRecord) and name == keys.IDENTITY:
            found += _identity_problems(record, policy)
        else:
            found.append(f"record '{name}' ({type(record).__name__}) is not allowed to leave the site")
    if metric_count > MAX_METRICS:
        found.append(f"{metric_count} metrics, more than the {MAX_METRICS} allowed")
    size = content_bytes(content)
    if size > policy.max_bytes:
        found.append(f"payload of {size} bytes exceeds the {policy.max_bytes} the model signature allows")
    return found


# --- the audit log --------------------------------------------------------------------


def _server_round(request: Message) -> int | None:
    """The round a reply belongs to: from the server's config, else the message group."""
    if request.has_content() and keys.CONFIG in request.content.config_records:
        value = request.content.config_records[keys.CONFIG].get(keys.SERVER_ROUND)
        if isinstance(value, int):
            return value
    group = request.metadata.group_id
    return int(group) if group.isdigit() else None


def describe(reply: Message) -> dict:
    """What a message carries, as recorded in egress.jsonl: record keys, bytes and digest."""
    if reply.has_error():
        reason = reply.error.reason or ""
        return {"kind": "error", "reason": reason, "keys": {}, "bytes": len(reason.encode()),
                keys.CONTENT_SHA256: hashlib.sha256(reason.encode()).hexdigest()}
    content = reply.content
    return {"kind": "content", "keys": {name: sorted(record) for name, record in content.items()},
            "bytes": content_bytes(content), keys.CONTENT_SHA256: content_sha256(content)}


class EgressLog:
    """Appends one line per outgoing (or blocked) message to ``<state_dir>/egress.jsonl``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / EGRESS_FILE

    def record(self, request: Message, reply: Message, status: str, blocked: list[str] | None = None) -> None:
        line = {"time": time.time(), "round": _server_round(request),
                "message_type": request.metadata.message_type, "status": status, **describe(reply)}
        if blocked:
            line["blocked"] = blocked
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        return list(read_events(self.path)) if self.path.is_file() else []


# --- the gate -----------------------------------------------------------------------


def _wire_dtype(request: Message, cfg: FedsegConfig) -> str:
    """The dtype the server asked for in this round, else the run's configured one."""
    if request.has_content() and keys.CONFIG in request.content.config_records:
        return str(request.content.config_records[keys.CONFIG].get(keys.WIRE_DTYPE, cfg.federation.wire_dtype))
    return cfg.federation.wire_dtype


def guard(reply: Message, request: Message, site: SiteLike | None) -> Message:
    """Let ``reply`` out if it holds only what may leave the site; otherwise a sanitized error.

    ``site`` is None when the site could not even be resolved (its config is
    broken): then only a sanitized error may leave, and there is no state
    directory to record it in.
    """
    name = site.cfg.site.name if site is not None else "unknown"
    try:
        policy = EgressPolicy.for_site(site, _wire_dtype(request, site.cfg)) if site is not None else None
        found = problems(reply, policy)
    except Exception as err:  # a guard that cannot decide must block
        log.exception("egress guard of site %s failed while checking a reply", name)
        found = [f"the egress guard could not check the reply ({type(err).__name__})"]
    audit = EgressLog(site.state.root) if site is not None else None
    if found:
        log.error("egress guard of site %s blocked a %s reply: %s", name, request.metadata.message_type,
                  "; ".join(found))
        if audit is not None:
            audit.record(request, reply, "blocked", found)
        reply = Message(Error(code=EGRESS_BLOCKED_CODE, reason=error_reason(name, BLOCKED_REASON)), reply_to=request)
    if audit is not None:
        audit.record(request, reply, "sent")
    return reply

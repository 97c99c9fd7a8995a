"""The egress guard: the one gate every reply of a site passes, and the audit log behind it.

"Patient data never leaves the hospital" is enforced here, not assumed. Each
kind of reply may carry exactly its own records and keys, as common/reply_protocol.py
defines them for both sides (the centre's validator enforces the same rules):

- a training reply: the travelling model tensors (exactly the keys, shapes
  and wire dtypes of the model signature, minus whatever the site's
  ``site.max_norm_travel`` keeps home, whatever the centre asked for), the
  training metrics, the identity record, and optionally the evaluation of
  the received model (an evaluation reply's metrics, see below);
- an evaluation or cross-evaluation reply: its declared scalar metrics and
  the identity record, no arrays;
- a fingerprint reply: the case count, exactly the fingerprint's ``fp_*``
  aggregates (short numeric lists only there), and the identity record;
- a secure-aggregation reply (common/secagg.py): the ``secagg`` record of its
  stage (two public keys; encrypted shares and a seed digest; shares for
  unmasking), the identity record and timeline metrics; and, when the training
  message asks for a masked update, that reply holds one uint32 vector of the
  travelling tensors' length in their place and no case count;
- or an error whose reason is one of the fixed wordings of client/reasons.py.

Anything else (an extra array, an image patch, a string, a file name, an
oversize payload) is blocked: the details are logged at the site, the server
gets a sanitized error instead, and both the blocked attempt and what was
sent in its place are recorded in ``<state_dir>/egress.jsonl``. Every
outgoing message is recorded there (round, keys, bytes, SHA-256 of the
content as in ``common.digest``), which is what ``fedseg-client audit`` reads.
The check and the audit write run under one ``try``: if either fails (a full
disk, an unreadable state directory), the server gets the fixed blocked
reason, never an exception text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
)

from common import keys, secagg
from common.config import FedsegConfig
from common.digest import content_bytes, content_sha256
from common.files import read_jsonl
from common.fingerprint import record_names
from common.params import kept_at_site
from common.reply_protocol import ReplyRule, masked_arrays, masked_rule, reply_rules
from common.runs import EGRESS_FILE
from common.wire import error_reason, message_round

from .reasons import BLOCKED_REASON, DISK_FULL_ERRNOS, DISK_FULL_REASON, is_fixed
from .secagg import requested as secagg_requested
from .site import Site

log = logging.getLogger("fedseg.client")

EGRESS_BLOCKED_CODE = 1002
MAX_REASON_CHARS = 240
NUMPY_STYPE = "numpy.ndarray"
NPY_HEADER_MAX = 4096
"""Bytes an .npy header may add to an array's raw data (numpy pads it to 64 or 128)."""
METADATA_ALLOWANCE = 64 * 1024
"""Bytes allowed beyond the model arrays for metric and identity records."""
MAX_METRICS = 128
"""Most metric entries one reply may carry (fingerprints included)."""


@dataclass(frozen=True)
class EgressPolicy:
    """What one site may send in this run."""

    site: str
    signature: str
    arrays: dict[str, tuple[tuple[int, ...], frozenset[str]]]
    """Travelling key -> (shape, dtypes allowed on the wire), minus what ``site.max_norm_travel`` keeps home."""
    rules: dict[str, ReplyRule]
    fingerprint: frozenset[str]
    """The exact keys of a fingerprint record."""
    max_bytes: int

    @classmethod
    def for_site(cls, site: Site, wire_dtype: str) -> EgressPolicy:
        state = site.model.state_dict()
        home = kept_at_site(site.model, site.cfg.site.max_norm_travel)
        arrays, total = {}, 0
        for key in site.split.travelling:
            if key in home:
                continue
            tensor = state[key]
            dtypes = {wire_dtype} if tensor.is_floating_point() else {str(tensor.dtype).removeprefix("torch.")}
            arrays[key] = (tuple(tensor.shape), frozenset(dtypes))
            total += tensor.numel() * tensor.element_size() + NPY_HEADER_MAX + len(key)
        classes = range(1, site.cfg.model.out_channels)
        dice_classes = frozenset(f"{keys.DICE_CLASS_PREFIX}{i}" for i in classes)
        test_classes = frozenset(f"{keys.TEST_DICE_CLASS_PREFIX}{i}" for i in classes)
        return cls(
            site=site.cfg.site.name,
            signature=site.signature,
            arrays=arrays,
            rules=reply_rules(dice_classes, test_classes),
            fingerprint=record_names(site.cfg.model.in_channels, site.cfg.model.out_channels),
            max_bytes=total + METADATA_ALLOWANCE,
        )

    def masked(self) -> EgressPolicy:
        """The policy of a training reply under secure aggregation: one uint32 vector as long as the travelling
        tensors together, in their place, and no case count; nothing unmasked may leave."""
        length = sum(int(np.prod(shape, dtype=np.int64)) for shape, _ in self.arrays.values())
        return dataclasses.replace(
            self,
            arrays=masked_arrays(length),
            rules={**self.rules, MessageType.TRAIN: masked_rule(self.rules[MessageType.TRAIN])},
            max_bytes=4 * length + NPY_HEADER_MAX + METADATA_ALLOWANCE,
        )


# --- the checks ---------------------------------------------------------------------


def _array_problems(record: ArrayRecord, policy: EgressPolicy) -> Iterator[str]:
    extra = sorted(set(record) - set(policy.arrays))
    missing = sorted(set(policy.arrays) - set(record))
    if extra:
        yield f"arrays not in the model signature, or kept home by site.max_norm_travel: {extra[:5]}"
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


def _metric_problems(
    record: MetricRecord, allowed: frozenset[str], required: Iterable[str], lists: bool
) -> Iterator[str]:
    """Names outside ``allowed``, missing ``required`` ones, and lists (only fingerprints may hold short ones)."""
    missing = sorted(set(required) - set(record))
    if missing:
        yield f"metrics {missing} missing"
    for name, value in record.items():
        if name not in allowed:
            yield f"metric '{name}' is not declared for this kind of reply in common.keys"
        if isinstance(value, list) and (not lists or len(value) > keys.EGRESS_MAX_LIST):
            yield (
                f"metric '{name}' is a list of {len(value)} values; only fingerprint lists up to "
                f"{keys.EGRESS_MAX_LIST} may leave"
            )


def _identity_problems(record: ConfigRecord, policy: EgressPolicy) -> Iterator[str]:
    expected = {keys.SITE: policy.site, keys.SIGNATURE: policy.signature}
    if set(record) != set(expected):
        yield f"identity record holds {sorted(record)}, allowed are {sorted(expected)}"
    for key, value in expected.items():
        if key in record and record[key] != value:
            yield f"identity '{key}' is not this site's"


def reason_problems(reason: str, site: str) -> list[str]:
    """Problems with an error reason: it must be one of the fixed wordings (client/reasons.py), short."""
    prefix = error_reason(site, "")
    if len(reason) > MAX_REASON_CHARS:
        return [f"error reason of {len(reason)} characters (limit {MAX_REASON_CHARS})"]
    if not reason.startswith(prefix) or not is_fixed(reason.removeprefix(prefix)):
        return ["error reason is not one of the site's fixed wordings (it could carry a path, name or number)"]
    return []


def problems(reply: Message, policy: EgressPolicy | None, message_type: str = MessageType.TRAIN) -> list[str]:
    """Everything in ``reply`` to a ``message_type`` request that may not leave the site; empty when it may."""
    if reply.has_error():
        return reason_problems(reply.error.reason or "", policy.site if policy else "unknown")
    if policy is None:
        return ["a reply with content from a site whose configuration could not be resolved"]
    rule = policy.rules.get(message_type)
    if rule is None:
        return [f"no content may answer a '{message_type}' message"]
    content = reply.content
    allowed = rule.records | rule.optional
    found: list[str] = [
        f"record '{name}' ({type(record).__name__}) is not allowed in a '{message_type}' reply"
        for name, record in content.items()
        if name not in allowed
    ]
    found += [f"record '{name}' missing" for name in sorted(rule.records - set(content))]
    metric_count = 0
    for name, record in content.items():
        if name not in allowed:
            continue
        if name == keys.ARRAYS and isinstance(record, ArrayRecord):
            found += _array_problems(record, policy)
        elif name == keys.METRICS and isinstance(record, MetricRecord):
            found += _metric_problems(record, rule.metrics, rule.required, lists=False)
            metric_count += len(record)
        elif name == keys.EVALUATION and isinstance(record, MetricRecord):  # as an evaluation reply's metrics
            evaluation = policy.rules[MessageType.EVALUATE]
            found += _metric_problems(record, evaluation.metrics, evaluation.required, lists=False)
            metric_count += len(record)
        elif name == keys.FINGERPRINT and isinstance(record, MetricRecord):
            found += _metric_problems(record, policy.fingerprint, policy.fingerprint, lists=True)
            metric_count += len(record)
        elif name == keys.IDENTITY and isinstance(record, ConfigRecord):
            found += _identity_problems(record, policy)
        elif name == secagg.RECORD and isinstance(record, ConfigRecord):
            found += secagg.reply_problems(message_type, record)
        else:
            found.append(f"record '{name}' is a {type(record).__name__}, not the expected kind")
    if metric_count > MAX_METRICS:
        found.append(f"{metric_count} metrics, more than the {MAX_METRICS} allowed")
    size = content_bytes(content)
    if size > policy.max_bytes:
        found.append(f"payload of {size} bytes exceeds the {policy.max_bytes} the model signature allows")
    return found


# --- the audit log --------------------------------------------------------------------


def describe(reply: Message) -> dict:
    """What a message carries, as recorded in egress.jsonl: record keys, bytes and digest."""
    if reply.has_error():
        reason = reply.error.reason or ""
        return {
            "kind": "error",
            "reason": reason,
            "keys": {},
            "bytes": len(reason.encode()),
            keys.CONTENT_SHA256: hashlib.sha256(reason.encode()).hexdigest(),
        }
    content = reply.content
    return {
        "kind": "content",
        "keys": {name: sorted(record) for name, record in content.items()},
        "bytes": content_bytes(content),
        keys.CONTENT_SHA256: content_sha256(content),
    }


class EgressLog:
    """Appends one line per outgoing (or blocked) message to ``<state_dir>/egress.jsonl``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / EGRESS_FILE

    def record(self, request: Message, reply: Message, status: str, blocked: list[str] | None = None) -> None:
        line = {
            "time": time.time(),
            "round": message_round(request),
            "message_type": request.metadata.message_type,
            "status": status,
            **describe(reply),
        }
        if blocked:
            line["blocked"] = blocked
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        return list(read_jsonl(self.path))


# --- the gate -----------------------------------------------------------------------


def _wire_dtype(request: Message, cfg: FedsegConfig) -> str:
    """The dtype the server asked for in this round, else the run's configured one."""
    if request.has_content() and keys.CONFIG in request.content.config_records:
        return str(request.content.config_records[keys.CONFIG].get(keys.WIRE_DTYPE, cfg.federation.wire_dtype))
    return cfg.federation.wire_dtype


def guard(reply: Message, request: Message, site: Site | None) -> Message:
    """Let ``reply`` out if it holds only what may leave the site; otherwise the fixed blocked reason.

    ``site`` is None when the site could not even be resolved (its config is
    broken): then only a sanitized error may leave, and there is no state
    directory to record it in. Whatever fails in here (the check, the audit
    write) ends in the fixed blocked reason: Flower would otherwise send the
    exception's text, with the site's paths, to the server.
    """
    name = site.cfg.site.name if site is not None else "unknown"
    blocked = Message(Error(code=EGRESS_BLOCKED_CODE, reason=error_reason(name, BLOCKED_REASON)), reply_to=request)
    try:
        policy = EgressPolicy.for_site(site, _wire_dtype(request, site.cfg)) if site is not None else None
        if policy is not None and request.metadata.message_type == MessageType.TRAIN and secagg_requested(request):
            policy = policy.masked()
        found = problems(reply, policy, request.metadata.message_type)
        audit = EgressLog(site.state.root) if site is not None else None
        if found:
            log.error(
                "egress guard of site %s blocked a %s reply: %s", name, request.metadata.message_type, "; ".join(found)
            )
            if audit is not None:
                audit.record(request, reply, "blocked", found)
            reply = blocked
        if audit is not None:
            audit.record(request, reply, "sent")
        return reply
    except Exception as err:  # a guard that cannot decide, or cannot record, must block
        log.exception("egress guard of site %s failed while checking or recording a reply", name)
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:  # say why, in the fixed wording
            return Message(
                Error(code=EGRESS_BLOCKED_CODE, reason=error_reason(name, DISK_FULL_REASON)), reply_to=request
            )
        return blocked

"""The centre's receiving boundary: every reply is parsed and checked here before anything else reads it.

A registered site may run modified code and send anything: records of the
wrong kind, a list where a number belongs, NaN, control characters, another
hospital's name, an array whose bytes are not what its header says, a case
count of 10^12. The run's grid (server/receiving_grid.py ``ReceivingGrid``, above
server/packed_grid.py, which unpacks) hands every reply to :meth:`Inbox.receive`
before planning, the strategy, cross-site evaluation or the timeline see it.
A reply that fails is replaced by an error reply with one fixed reason, named
by the site registered for its node, so every later stage leaves it out the
way it leaves out any failed site; the run goes on with the others.
``receive`` never raises.

What passes is guaranteed to hold:

- only the records a site sends (``metrics``, ``evaluation``,
  ``fingerprint``, ``identity``, ``arrays``), each of its kind;
- metrics that are finite numbers (lists only in the fingerprint), names and
  identity text on one printable line of bounded length;
- arrays whose data decode to the dtype and shape they declare;
- an identity naming the site registered for the node (server/site_registry.py);
- case counts within what the site declared at planning (its fingerprint's
  ``fp_cases`` training and ``fp_val_cases`` validation cases: a training
  count within the first, a score's count within both together), or within
  ``MAX_CASES`` for a site that declared none.
  The declarations are kept in ``<run>/declared-cases.json``, so a resumed run
  that reuses its plan still holds every site to them.

An error reply's text is the site's own; it is kept, put on one printable
line, cut to ``MAX_REASON`` characters and prefixed with the registered name.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
from collections.abc import Iterator
from pathlib import Path
from typing import TypeGuard

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord

from common import keys, secagg
from common.files import atomic_write_text
from common.fingerprint import MAX_CASES
from common.flower.messages import make_message
from common.progress import CONTROL, one_line
from common.runs import DECLARED_CASES_FILE
from common.wire import MAX_TENSORS, error_reason, site_of_error

from .site_registry import claim_problem, site_name

log = logging.getLogger("fedseg.server")

BOUNDARY_ERROR_CODE = 1100
"""Code of the error reply that stands for a reply the boundary left out."""
MAX_TEXT = 200
MAX_REASON = 300
MAX_FINGERPRINT_LIST = 64
METRIC_RECORDS = frozenset({keys.METRICS, keys.EVALUATION, keys.FINGERPRINT})
RECORDS = METRIC_RECORDS | {keys.IDENTITY, keys.ARRAYS, secagg.RECORD}

MALFORMED = (
    "the reply is malformed: unexpected records, values that are not finite numbers, or text that is "
    "not one printable line"
)
UNREADABLE_ARRAY = "an array of the reply does not decode to the dtype and shape it declares"
TOO_MANY_CASES = "the reply counts more cases than the site declared at planning"
UNCHECKABLE = "the reply could not be checked"
UNPACKABLE = "the reply's packed arrays do not unpack as their layout says"
FIXED_REASONS = frozenset({MALFORMED, UNREADABLE_ARRAY, TOO_MANY_CASES, UNCHECKABLE, UNPACKABLE})
"""What the boundary says of a reply it leaves out (besides a claim of another site's name)."""


class Refused(ValueError):
    """A reply the boundary leaves out, with its fixed reason."""


def short_line(text: str, limit: int = MAX_REASON) -> str:
    """``text`` on one printable line (common/progress.py ``one_line``), cut to ``limit`` characters."""
    escaped = one_line(text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def error_reply(reply: Message, reason: str, code: int = BOUNDARY_ERROR_CODE) -> Message:
    """An error reply in place of ``reply``: same sender and request, only the reason."""
    return make_message(copy.copy(reply.metadata), error=Error(code=code, reason=reason))


def _printable(text: object, limit: int = MAX_TEXT) -> bool:
    return isinstance(text, str) and len(text) <= limit and CONTROL.search(text) is None


def finite_number(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is one finite real number (not a bool, not a list, not an int beyond a float's range)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


class Inbox:
    """What the centre has learnt of each node: its site's name and the cases it declared at planning."""

    def __init__(self, node_sites: dict[int, str], run: Path | None = None) -> None:
        """``node_sites``: the registered node -> site names, shared with the strategy (server/site_registry.py);
        ``run``: where the declarations are kept."""
        self.node_sites = node_sites
        self._path = Path(run) / DECLARED_CASES_FILE if run is not None else None
        self.declared: dict[str, tuple[int, int]] = self._load()
        """Site -> (training, validation) cases its fingerprint declared."""

    def _load(self) -> dict[str, tuple[int, int]]:
        try:
            loaded = json.loads(self._path.read_text()) if self._path is not None and self._path.is_file() else {}
        except (OSError, ValueError):
            log.warning(
                "%s cannot be read; case counts are bounded by %d until the sites declare again", self._path, MAX_CASES
            )
            return {}
        return {
            str(k): (int(v[0]), int(v[1]))
            for k, v in loaded.items()
            if isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) and 0 <= n <= MAX_CASES for n in v)
        }

    def site(self, node: int, claimed: str | None = None) -> str:
        """The site registered for ``node`` (a node nobody registered is bound to its first sound claim)."""
        return site_name(self.node_sites, node, claimed if _printable(claimed) else None)

    def receive(self, reply: Message, node: int | None = None) -> Message:
        """``reply`` if it is sound, else an error reply with a fixed reason; never raises.

        ``node`` is the node the request went to (a reply the SuperLink wrote for a vanished node comes from
        the SuperLink's id); by default the reply's sender.
        """
        node = reply.metadata.src_node_id if node is None else node
        try:
            if reply.has_error():
                return self._error(reply, node)
            self._check(reply, node)
            return reply
        except Refused as refused:
            reason = str(refused)
        except Exception as err:  # noqa: BLE001 - the boundary must never end the run
            log.warning("checking a reply of node %d failed (%s)", node, type(err).__name__)
            reason = UNCHECKABLE
        name = self.site(node)
        log.warning(
            "a %s reply of site %s is left out: %s", short_line(str(reply.metadata.message_type), 40), name, reason
        )
        return error_reply(reply, error_reason(name, reason) if node in self.node_sites else reason)

    def _error(self, reply: Message, node: int) -> Message:
        """The site's error text on one line, prefixed with the registered name instead of the claimed one."""
        reason = reply.error.reason if isinstance(reply.error.reason, str) else ""
        claimed = site_of_error(reason)
        text = reason.split(": ", 1)[1] if claimed is not None else reason
        name = self.site(node, claimed)
        text = short_line(text or f"error code {reply.error.code}")
        code = reply.error.code if isinstance(reply.error.code, int) else BOUNDARY_ERROR_CODE
        return error_reply(reply, error_reason(name, text) if node in self.node_sites else text, code)

    def _check(self, reply: Message, node: int) -> None:
        content = reply.content
        if not set(content.keys()) <= RECORDS:
            raise Refused(MALFORMED)
        records = {name: content[name] for name in content.keys()}
        for name in METRIC_RECORDS & set(records):
            record = records[name]
            if not isinstance(record, MetricRecord):
                raise Refused(MALFORMED)
            self._check_metrics(record, lists=name == keys.FINGERPRINT)
        identity = records.get(keys.IDENTITY)
        claimed = None
        if identity is not None:
            if not isinstance(identity, ConfigRecord) or not all(
                _printable(k) and _printable(v) for k, v in identity.items()
            ):
                raise Refused(MALFORMED)
            named = identity.get(keys.SITE)
            claimed = named if isinstance(named, str) else None  # _printable made it text when present
        if keys.ARRAYS in records:
            self._check_arrays(records[keys.ARRAYS])
        if secagg.RECORD in records and (
            reply.metadata.message_type not in secagg.QUERIES
            or not isinstance(records[secagg.RECORD], ConfigRecord)
            or any(secagg.value_problems(records[secagg.RECORD]))
        ):
            raise Refused(MALFORMED)  # keys, ciphertexts, shares of the protocol's replies: bytes and node ids only
        if problem := claim_problem(self.node_sites, node, claimed):
            raise Refused(problem)
        self._check_counts(reply, self.site(node, claimed))

    @staticmethod
    def _check_metrics(record: MetricRecord, lists: bool) -> None:
        for name, value in record.items():
            if not _printable(name, 100):
                raise Refused(MALFORMED)
            values = value if isinstance(value, list) and lists and len(value) <= MAX_FINGERPRINT_LIST else [value]
            if not all(finite_number(v) for v in values):
                raise Refused(MALFORMED)

    @staticmethod
    def _check_arrays(arrays: object) -> None:
        if not isinstance(arrays, ArrayRecord) or len(arrays) > MAX_TENSORS:
            raise Refused(MALFORMED)
        for name, array in arrays.items():
            if not _printable(name):
                raise Refused(MALFORMED)
            try:
                data = array.numpy()
            except Exception as err:  # noqa: BLE001 - bytes that are not an .npy file, an unknown stype
                raise Refused(UNREADABLE_ARRAY) from err
            if tuple(data.shape) != tuple(array.shape) or str(data.dtype) != array.dtype:
                raise Refused(UNREADABLE_ARRAY)

    def _check_counts(self, reply: Message, site: str) -> None:
        """Case counts against the site's declaration; a fingerprint's count becomes its declaration."""
        content, is_train = reply.content, reply.metadata.message_type == MessageType.TRAIN
        declared = self.declared.get(site)
        fingerprint = content.metric_records.get(keys.FINGERPRINT)
        for count, kind in self._counts(content, is_train):
            if not float(count).is_integer() or count < 0 or count > MAX_CASES:
                raise Refused(TOO_MANY_CASES if count > MAX_CASES else MALFORMED)
            # training counts its training cases; a score counts its validation cases, or every labelled case
            # at a site that ended up not training (cross-site evaluation): both within what it declared
            bound = (
                None
                if declared is None or fingerprint is not None or kind == "test"
                else (declared[0] if kind == "train" else sum(declared))
            )
            if bound is not None and count > bound:
                raise Refused(TOO_MANY_CASES)
        if fingerprint is not None:
            cases = fingerprint.get(f"{keys.FINGERPRINT_PREFIX}cases")
            val = fingerprint.get(f"{keys.FINGERPRINT_PREFIX}val_cases")
            if (
                finite_number(cases)
                and finite_number(val)
                and all(float(n).is_integer() and 0 <= n <= MAX_CASES for n in (cases, val))
                and cases > 0
            ):
                self._declare(site, (int(cases), int(val)))

    @staticmethod
    def _counts(content, is_train: bool) -> Iterator[tuple[float, str]]:
        """(count, 'train' | 'evaluate' | 'test') for every case count in the reply."""
        metrics = content.metric_records.get(keys.METRICS)
        if metrics is not None:
            if keys.NUM_EXAMPLES in metrics:
                yield metrics[keys.NUM_EXAMPLES], "train" if is_train else "evaluate"
            if keys.TEST_NUM_EXAMPLES in metrics:
                yield metrics[keys.TEST_NUM_EXAMPLES], "test"
        evaluation = content.metric_records.get(keys.EVALUATION)
        if evaluation is not None and keys.NUM_EXAMPLES in evaluation:
            yield evaluation[keys.NUM_EXAMPLES], "evaluate"

    def _declare(self, site: str, cases: tuple[int, int]) -> None:
        if self.declared.get(site) == cases:
            return
        self.declared[site] = cases
        if self._path is not None:
            try:
                atomic_write_text(
                    self._path, json.dumps({k: list(v) for k, v in self.declared.items()}, indent=1, sort_keys=True)
                )
            except OSError:
                log.exception("the sites' declared case counts cannot be written to %s", self._path)

"""The site's receiving boundary: a message from the centre is parsed and checked here, before anything reads it.

The centre is trusted to coordinate, not to be honest: a compromised or
impersonated centre chooses every byte of a message (its id, round, type,
configuration and arrays). The ClientApp handler (client/client_app.py
``_handle``) passes each message through :func:`received` first, so that no
handler, log line or file name ever sees a value this module has not checked:

- the message's round (``group_id``) is a short run of ASCII digits or empty;
  its id names a file only through client/timeline.py ``pull_note``, which
  takes Flower's 64 hex digits and nothing else;
- the content holds only the records a centre sends (``config``, ``arrays``,
  a packed ``layout`` that common/wire.py unpacks and checks, and secure
  aggregation's ``secagg``: node ids, numbers and bounded byte strings only,
  each read further by common/secagg.py);
- every configuration value is a finite number, a bool, or printable text of
  bounded length (no control characters, no newline except in the plan, which
  is JSON), or a short list of these; no bytes; and each entry a handler reads
  (round, mu, dtype, signature, plan, ...) has its one type and range;
- every array parses: its data decodes to the dtype and shape it declares.

A message that fails is refused whole with one fixed reason (client/reasons.py,
``MalformedMessage``); the details stay in the site's log, written with
``%r`` so that no control character reaches it.
"""

from __future__ import annotations

import math
import re

from flwr.app import ArrayRecord, ConfigRecord, Message

from common import keys, secagg
from common.progress import CONTROL
from common.wire import MAX_TENSORS, WireError, unpack

MAX_TEXT = 200
"""Longest text value, except the plan: names, signatures, dtypes are far shorter."""
MAX_PLAN_TEXT = 1 << 20
"""The plan as JSON: a few kilobytes for any model."""
MAX_LIST = 4096
"""Longest list in a configuration record."""
MAX_GROUP_ID = 12
PLAN_WHITESPACE = re.compile(r"[\t\n]")
"""The plan is indented JSON: tabs and newlines are its only control characters."""
RECORDS = frozenset({keys.CONFIG, keys.ARRAYS, secagg.RECORD})
"""What a centre's message holds once unpacked (``secagg.RECORD``: secure aggregation's keys and shares)."""
MAX_ROUND = 1_000_000
EXPECTED: dict[str, tuple[type, ...]] = {
    keys.SERVER_ROUND: (int,),
    keys.PROXIMAL_MU: (int, float),
    keys.EVALUATE_RECEIVED: (bool,),
    keys.WIRE_DTYPE: (str,),
    keys.SIGNATURE: (str,),
    keys.CROSS_EVAL_TASK: (str,),
    keys.CROSS_EVAL_MODEL: (str,),
    keys.PLAN: (str,),
}
"""The type of each configuration entry the handlers read: a value of another type never reaches them."""


class MalformedMessage(ValueError):
    """A message from the centre that no honest centre sends; the site refuses it whole."""


def received(msg: Message) -> Message:
    """``msg`` with its content unpacked and checked; raises WireError or MalformedMessage, nothing else."""
    try:
        _check_metadata(msg)
        if msg.has_content():
            msg.content = unpack(msg.content)
            _check_records(msg)
    except (MalformedMessage, WireError):
        raise
    except Exception as err:  # any other failure to parse is a malformed message, never a crash
        raise MalformedMessage(f"the message does not parse ({type(err).__name__})") from err
    return msg


def _check_metadata(msg: Message) -> None:
    group = msg.metadata.group_id
    if (
        not isinstance(group, str)
        or len(group) > MAX_GROUP_ID
        or not (group == "" or group.isascii() and group.isdigit())
    ):
        raise MalformedMessage(f"group id {group!r:.40} is not a round number")


def _check_records(msg: Message) -> None:
    content = msg.content
    names = set(content.keys())
    if not names <= RECORDS:
        raise MalformedMessage(f"unexpected records {sorted(names - RECORDS)!r:.200}")
    config = content.get(keys.CONFIG)
    if config is not None:
        if not isinstance(config, ConfigRecord):
            raise MalformedMessage(f"'{keys.CONFIG}' is a {type(config).__name__}, not a ConfigRecord")
        for name, value in config.items():
            _check_value(name, value)
            _check_expected(name, value)
    protocol = content.get(secagg.RECORD)
    if protocol is not None:  # the only record that may hold bytes; common/secagg.py reads it further
        if not isinstance(protocol, ConfigRecord):
            raise MalformedMessage(f"'{secagg.RECORD}' is a {type(protocol).__name__}, not a ConfigRecord")
        for problem in secagg.value_problems(protocol):
            raise MalformedMessage(problem)
    arrays = content.get(keys.ARRAYS)
    if arrays is not None:
        if not isinstance(arrays, ArrayRecord):
            raise MalformedMessage(f"'{keys.ARRAYS}' is a {type(arrays).__name__}, not an ArrayRecord")
        _check_arrays(arrays)


def _check_value(name: str, value: object) -> None:
    if not isinstance(name, str) or len(name) > MAX_TEXT or CONTROL.search(name):
        raise MalformedMessage(f"configuration name {name!r:.80} is not one printable line")
    values = value if isinstance(value, list) else [value]
    if len(values) > MAX_LIST:
        raise MalformedMessage(f"configuration '{name}' holds a list of {len(values)} values")
    for item in values:
        if isinstance(item, bool | int):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise MalformedMessage(f"configuration '{name}' is not finite")
            continue
        if isinstance(item, str):
            plan = name == keys.PLAN
            text = PLAN_WHITESPACE.sub(" ", item) if plan else item
            if len(item) > (MAX_PLAN_TEXT if plan else MAX_TEXT) or CONTROL.search(text):
                raise MalformedMessage(f"configuration '{name}' is too long or holds control characters")
            continue
        raise MalformedMessage(f"configuration '{name}' is a {type(item).__name__}")


def _check_expected(name: str, value: object) -> None:
    """The entries the handlers read have their one type (a bool is not a round), a round and mu their range."""
    kinds = EXPECTED.get(name)
    if kinds is None:
        return
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        raise MalformedMessage(f"configuration '{name}' is a {type(value).__name__}")
    # EXPECTED made the round an int and mu a number; the isinstance tests say so to the type checker.
    if name == keys.SERVER_ROUND and isinstance(value, int) and not 0 <= value <= MAX_ROUND:
        raise MalformedMessage(f"configuration '{name}' is out of range")
    if name == keys.PROXIMAL_MU and isinstance(value, (int, float)) and value < 0:
        raise MalformedMessage(f"configuration '{name}' is negative")


def _check_arrays(arrays: ArrayRecord) -> None:
    if len(arrays) > MAX_TENSORS:
        raise MalformedMessage(f"{len(arrays)} arrays, more than any model has")
    for name, array in arrays.items():
        if len(name) > MAX_TEXT or CONTROL.search(name):
            raise MalformedMessage(f"array name {name!r:.80} is not one printable line")
        data = array.numpy()
        if tuple(data.shape) != tuple(array.shape) or str(data.dtype) != array.dtype:
            raise MalformedMessage(
                f"array {name!r:.80} declares {array.dtype}{list(array.shape)!r:.40} but holds "
                f"{data.dtype}{list(data.shape)!r:.40}"
            )

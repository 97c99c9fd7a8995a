"""The wire format: one ArrayRecord of travelling tensors, optionally in half precision, packed for travel.

Arrays may travel as float16 to halve the bytes; they are always returned as
float32, so aggregation and training never run in half precision. (bfloat16 is
not offered: Flower's ArrayRecord stores numpy arrays, and numpy has no
bfloat16.)

In a deployment every Flower object of a message is one HTTPS request through
the gateway and a row in the SuperLink's database, and an ArrayRecord of n
tensors is 2n + 1 objects (each Array plus its chunk). A message therefore
travels *packed* (:func:`pack`): one flat Array per dtype, plus a ``layout``
ConfigRecord with each tensor's name, dtype and shape. The receiver unpacks
it (:func:`unpack`) before anything else reads the message, so the rest of
fedseg (validation, aggregation, the egress guard, training) only ever sees
the named tensors. Unpacking trusts nothing: a layout whose sizes do not add
up to the flat arrays is refused whole.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from . import keys

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_wire(tensors: dict[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """Pack tensors into an ArrayRecord, casting floating tensors to ``wire_dtype``."""
    dtype = WIRE_DTYPES[wire_dtype]
    cast = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    return ArrayRecord(cast)


def from_wire(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ArrayRecord into float32 (floating) tensors."""
    state = record.to_torch_state_dict()
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


PACKED_PREFIX = "packed-"
"""Key of a packed flat Array: the prefix plus its dtype."""
PACKABLE_DTYPES = frozenset({"float16", "float32", "float64", "int64"})
MAX_TENSORS = 4096
"""More tensors than any 3D U-Net has: a layout longer than this is refused before it is read."""
MAX_NDIM = 8
MAX_DIM = 1 << 31
"""Longest axis a layout may declare: an empty tensor declared (0, 2**70) has no values to check against."""


class WireError(ValueError):
    """A packed message whose layout does not describe its arrays."""


def pack(content: RecordDict) -> RecordDict:
    """The content with its ``ARRAYS`` record as one flat Array per dtype plus a ``LAYOUT`` record.

    Content without arrays (or with a single one) is returned as it is.
    """
    record = content.array_records.get(keys.ARRAYS)
    if record is None or len(record) < 2 or keys.LAYOUT in content:
        return content
    names = list(record.keys())
    values = [record[name].numpy() for name in names]
    dtypes = [str(v.dtype) for v in values]
    flat = {
        dt: np.concatenate([v.ravel() for v, d in zip(values, dtypes, strict=True) if d == dt])
        for dt in dict.fromkeys(dtypes)
    }
    layout = ConfigRecord(
        {
            "names": names,
            "dtypes": dtypes,
            "ndims": [v.ndim for v in values],
            "shapes": [int(n) for v in values for n in v.shape],
        }
    )
    packed = RecordDict(dict(content.items()))
    packed[keys.ARRAYS] = ArrayRecord({PACKED_PREFIX + dt: Array(a) for dt, a in flat.items()})
    packed[keys.LAYOUT] = layout
    return packed


def unpack(content: RecordDict) -> RecordDict:
    """The content with its packed arrays back as named tensors; unpacked content is returned as it is.

    Raises WireError, and nothing else, when the layout is malformed, its sizes disagree with the flat arrays,
    or a flat array does not decode (an unknown stype, bytes that are not an .npy file).
    """
    if keys.LAYOUT not in content.config_records:
        return content
    try:
        return _unpacked(content)
    except WireError:
        raise
    except Exception as err:  # whatever the other side sent, the receiver sees one kind of error
        raise WireError(f"the packed arrays do not decode ({type(err).__name__})") from err


def _unpacked(content: RecordDict) -> RecordDict:
    names, dtypes, shapes = _layout(content.config_records[keys.LAYOUT])
    record = content.array_records.get(keys.ARRAYS)
    wanted = {PACKED_PREFIX + dt for dt in dtypes}
    if record is None or set(record.keys()) != wanted:
        raise WireError(
            f"packed arrays {sorted(record.keys()) if record else []} do not match the layout's dtypes {sorted(wanted)}"
        )
    flat = {key: record[key] for key in wanted}
    offsets = dict.fromkeys(wanted, 0)
    spans: dict[str, tuple[int, int, tuple[int, ...], str]] = {}
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        key, size = PACKED_PREFIX + dtype, math.prod(shape)
        if flat[key].dtype != dtype or len(flat[key].shape) != 1:
            raise WireError(f"packed array '{key}' is {flat[key].dtype}{list(flat[key].shape)}, not flat {dtype}")
        start, offsets[key] = offsets[key], offsets[key] + size
        if offsets[key] > flat[key].shape[0]:
            raise WireError(f"the layout needs more {dtype} values than were sent")
        spans[name] = (start, size, shape, key)
    if any(offsets[k] != flat[k].shape[0] for k in wanted):
        raise WireError("the packed arrays hold more values than the layout describes")
    data = {k: flat[k].numpy() for k in wanted}
    if any(data[k].shape != (offsets[k],) or str(data[k].dtype) != flat[k].dtype for k in wanted):
        raise WireError("a packed array's data differs from its declared dtype or length")
    unpacked = RecordDict({k: v for k, v in content.items() if k != keys.LAYOUT})
    unpacked[keys.ARRAYS] = ArrayRecord(
        {
            name: Array(data[key][start : start + size].reshape(shape))
            for name, (start, size, shape, key) in spans.items()
        }
    )
    return unpacked


def _all_str(values: list[Any]) -> TypeGuard[list[str]]:
    return all(isinstance(v, str) for v in values)


def _all_int(values: list[Any]) -> TypeGuard[list[int]]:
    """Whether every value is an int (a bool counts as one, as isinstance says)."""
    return all(isinstance(v, int) for v in values)


def _layout(layout: ConfigRecord) -> tuple[list[str], list[str], list[tuple[int, ...]]]:
    """Names, dtypes and shapes from a layout record, every field checked before it is used."""
    names, dtypes, ndims, flat_shape = (layout.get(k) for k in ("names", "dtypes", "ndims", "shapes"))
    if not (
        isinstance(names, list)
        and isinstance(dtypes, list)
        and isinstance(ndims, list)
        and isinstance(flat_shape, list)
    ):
        raise WireError("the layout lacks names, dtypes, ndims or shapes lists")
    if not len(names) == len(dtypes) == len(ndims) or len(names) > MAX_TENSORS or len(set(names)) != len(names):
        raise WireError("the layout's lists disagree in length, repeat a name or are too long")
    if not _all_str(names) or not _all_str(dtypes) or not set(dtypes) <= PACKABLE_DTYPES:
        raise WireError(f"the layout's names must be text and its dtypes among {sorted(PACKABLE_DTYPES)}")
    if (
        not _all_int(ndims)
        or not all(0 <= d <= MAX_NDIM for d in ndims)
        or sum(ndims) != len(flat_shape)
        or not _all_int(flat_shape)
        or not all(0 <= n <= MAX_DIM for n in flat_shape)
    ):
        raise WireError("the layout's shapes are malformed")
    ends = np.cumsum([0, *ndims]).tolist()
    return names, dtypes, [tuple(flat_shape[a:b]) for a, b in zip(ends, ends[1:], strict=False)]


ERROR_PREFIX = "site "
ERROR_SEPARATOR = ": "


def error_reason(site: str, reason: str) -> str:
    """A site's error text: Flower error replies carry no records, so the name leads the reason."""
    return f"{ERROR_PREFIX}{site}{ERROR_SEPARATOR}{reason}"


def site_of_error(reason: str | None) -> str | None:
    """The site name that ``error_reason`` put in front, if any."""
    if not reason or not reason.startswith(ERROR_PREFIX) or ERROR_SEPARATOR not in reason:
        return None
    name = reason[len(ERROR_PREFIX) :].split(ERROR_SEPARATOR, 1)[0]
    return name if name and " " not in name else None


def named_site(msg: Message) -> str | None:
    """The site a reply names: in its identity record, or at the front of its error text."""
    if msg.has_content() and keys.IDENTITY in msg.content.config_records:
        return str(msg.content.config_records[keys.IDENTITY].get(keys.SITE))
    return site_of_error(msg.error.reason) if msg.has_error() else None


def reply_site(msg: Message) -> str:
    """The site that sent a reply, or its node id when the reply names none."""
    return named_site(msg) or f"node-{msg.metadata.src_node_id}"


def message_round(msg: Message) -> int | None:
    """The round a message belongs to: the server's ``server-round`` config entry, else its group id (Flower's
    round); None when neither says. The one reading of a message's round, at the site and at the centre."""
    config = msg.content.config_records.get(keys.CONFIG) if msg.has_content() else None
    value = config.get(keys.SERVER_ROUND) if config is not None else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    group = msg.metadata.group_id
    return int(group) if group.isascii() and group.isdigit() else None  # '²'.isdigit(), but int('²') fails

"""SecAgg+ as fedseg runs it: what the centre and the sites agree on, and what each checks of the other.

The protocol (docs/secure-aggregation.md) has four exchanges per round, each a
Flower message: the centre asks the round's sites for two public keys
(``query.secagg_keys``), relays every key to every site, which answers with
Shamir shares of its secrets encrypted for each peer (``query.secagg_shares``),
sends the training message with the shares addressed to each site (the site
replies its masked update), and asks the sites whose update arrived for the
shares that remove the masks (``query.secagg_unmask``).

The cryptography is Flower's (``flwr.common.secure_aggregation``: Shamir
sharing, ECDH key agreement with HKDF, Fernet encryption, stochastic
quantization). Masks are drawn from AES-256 in counter mode keyed by the
SHA-256 of a seed: Flower's own ``pseudo_rand_gen`` folds its seed into 32
bits, which a centre could search.

Every update lives in the field of integers modulo ``MODULUS`` (2^32, so
uint32 arithmetic wraps exactly). A site quantizes its clipped update to
``[0, QUANT_RANGE]``; the sum of up to ``MAX_SITES`` of them never wraps.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import MessageType

from .flower.secure_aggregation import dequantize, quantize

# --- message types and record keys ------------------------------------------------------------
KEYS_ACTION = "secagg_keys"
SHARES_ACTION = "secagg_shares"
UNMASK_ACTION = "secagg_unmask"
KEYS_QUERY = f"{MessageType.QUERY}.{KEYS_ACTION}"
SHARES_QUERY = f"{MessageType.QUERY}.{SHARES_ACTION}"
UNMASK_QUERY = f"{MessageType.QUERY}.{UNMASK_ACTION}"
QUERIES = frozenset({KEYS_QUERY, SHARES_QUERY, UNMASK_QUERY})
"""The message types whose replies carry a ``RECORD``; no other reply may."""

RECORD = "secagg"
"""The ConfigRecord that carries the protocol's values, in both directions (bytes are allowed only here)."""
MASKED = "secagg-masked"
"""The one array of a training reply in this mode: the masked, quantized update as uint32."""

THRESHOLD = "threshold"
CLIP = "clip"
NODES = "nodes"
MASK_KEYS = "mask-keys"
SHARE_KEYS = "share-keys"
MASK_KEY = "mask-key"
"""A site's public key of the pairwise masks."""
SHARE_KEY = "share-key"
"""A site's public key under which its peers encrypt the shares they send it."""
DESTINATIONS = "destinations"
SOURCES = "sources"
CIPHERTEXTS = "ciphertexts"
SEED_DIGEST = "seed-sha256"
"""SHA-256 of a site's self-mask seed: the centre checks what it rebuilds from shares against it."""
SURVIVORS = "survivors"
DROPPED = "dropped"
SHARES = "shares"

# --- field and quantization -------------------------------------------------------------------
MODULUS = 1 << 32
QUANT_RANGE = 1 << 22
MAX_SITES = (MODULUS // QUANT_RANGE) - 1
"""Most sites of one round: the sum of their quantized updates stays below the modulus."""
MASKED_DTYPE = "uint32"

# --- sizes a sender may not exceed --------------------------------------------------------------
MAX_PUBLIC_KEY = 400
"""Bytes of a PEM public key (SECP384R1: 215)."""
MAX_CIPHERTEXT = 2048
"""Bytes of one encrypted pair of shares (about 900 for SECP384R1 keys)."""
MAX_SHARE = 600
"""Bytes of one Shamir share (a seed's: 52; a PEM private key's: about 340)."""
SEED_BYTES = 32


class ProtocolError(ValueError):
    """A protocol value that no honest peer or centre sends; the message says what was wrong."""


def threshold(sites: int, fraction: float) -> int:
    """Shares that rebuild a secret among ``sites``: ceil(fraction x sites), and always a strict majority.

    A majority is what stops a centre from collecting both kinds of share of one
    site: every site answers one unmask request, with one kind per peer.
    """
    return min(sites, max(math.ceil(fraction * sites), sites // 2 + 1))


def mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint32 values from ``seed``: AES-256-CTR keyed by SHA-256(seed), zero nonce."""
    encryptor = Cipher(algorithms.AES(hashlib.sha256(seed).digest()), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)) + encryptor.finalize(), dtype="<u4").astype(np.uint32)


def flat(arrays: Mapping[str, np.ndarray], order: list[str]) -> np.ndarray:
    """The tensors named in ``order`` as one float64 vector."""
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in order]) if order else np.zeros(0)


def unflat(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]], order: list[str]) -> dict[str, np.ndarray]:
    """The inverse of ``flat``, as float32 tensors of ``shapes``."""
    out, start = {}, 0
    for k in order:
        size = int(np.prod(shapes[k], dtype=np.int64))
        out[k] = vector[start : start + size].reshape(shapes[k]).astype(np.float32)
        start += size
    return out


def clipped(update: np.ndarray, bound: float) -> np.ndarray:
    """``update`` scaled down to L2 norm ``bound`` if longer: then every coordinate lies in [-bound, bound]."""
    norm = float(np.linalg.norm(update))
    return update * (bound / norm) if norm > bound else update


def quantized(update: np.ndarray, bound: float) -> np.ndarray:
    """Flower's stochastic quantization of a clipped update into [0, QUANT_RANGE], as uint32."""
    (values,) = quantize([update], bound, QUANT_RANGE)
    return values.astype(np.uint32)


def dequantized_sum(total: np.ndarray, count: int, bound: float) -> np.ndarray:
    """The float sum of ``count`` updates from the exact sum of their quantized values."""
    (shifted,) = dequantize([total.astype(np.int64)], bound, QUANT_RANGE)
    return shifted - (count - 1) * bound  # dequantize removes one clipping offset; the sum holds ``count``


def pair_sign(own: int, peer: int) -> int:
    """+1 or -1: the pairwise mask of two sites is added by the one with the larger node id, taken off by the other."""
    return 1 if own > peer else -1


# --- what a receiver checks -------------------------------------------------------------------


def node_ids(value: object, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ProtocolError(f"'{name}' is not a list of node ids")
    if len(value) > MAX_SITES:
        raise ProtocolError(f"'{name}' lists {len(value)} nodes, more than {MAX_SITES}")
    if len(set(value)) != len(value):
        raise ProtocolError(f"'{name}' lists a node twice")
    return list(value)


def byte_strings(value: object, name: str, limit: int) -> list[bytes]:
    if not isinstance(value, list) or not all(isinstance(v, bytes) and 0 < len(v) <= limit for v in value):
        raise ProtocolError(f"'{name}' is not a list of byte strings of at most {limit} bytes")
    if len(value) > MAX_SITES:
        raise ProtocolError(f"'{name}' holds {len(value)} entries, more than {MAX_SITES}")
    return list(value)


def _blob(value: object, name: str, limit: int) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= limit:
        raise ProtocolError(f"'{name}' is not a byte string of at most {limit} bytes")
    return value


def _exact(record: Mapping[str, object], names: set[str], what: str) -> None:
    if set(record) != names:
        raise ProtocolError(f"{what} holds {sorted(record)!r:.200}, expected {sorted(names)}")


def public_keys(record: Mapping[str, object]) -> tuple[bytes, bytes]:
    """(mask key, share key) of a site's keys reply."""
    _exact(record, {MASK_KEY, SHARE_KEY}, "a keys reply")
    mask_key, share_key = (
        _blob(record[MASK_KEY], MASK_KEY, MAX_PUBLIC_KEY),
        _blob(record[SHARE_KEY], SHARE_KEY, MAX_PUBLIC_KEY),
    )
    if mask_key == share_key:
        raise ProtocolError("the two public keys are the same")
    return mask_key, share_key


def encrypted_shares(record: Mapping[str, object]) -> tuple[dict[int, bytes], bytes]:
    """(destination node -> ciphertext, seed digest) of a site's shares reply."""
    _exact(record, {DESTINATIONS, CIPHERTEXTS, SEED_DIGEST}, "a shares reply")
    destinations = node_ids(record[DESTINATIONS], DESTINATIONS)
    ciphertexts = byte_strings(record[CIPHERTEXTS], CIPHERTEXTS, MAX_CIPHERTEXT)
    digest = record[SEED_DIGEST]
    if not isinstance(digest, bytes) or len(digest) != hashlib.sha256().digest_size:
        raise ProtocolError(f"'{SEED_DIGEST}' is not a SHA-256 digest")
    if len(destinations) != len(ciphertexts):
        raise ProtocolError(f"{len(destinations)} destinations for {len(ciphertexts)} ciphertexts")
    return dict(zip(destinations, ciphertexts, strict=True)), digest


def unmask_shares(record: Mapping[str, object]) -> dict[int, bytes]:
    """Node -> the share a site sends of that node's secret, from its unmask reply."""
    _exact(record, {NODES, SHARES}, "an unmask reply")
    nodes, shares = node_ids(record[NODES], NODES), byte_strings(record[SHARES], SHARES, MAX_SHARE)
    if len(nodes) != len(shares):
        raise ProtocolError(f"{len(nodes)} nodes for {len(shares)} shares")
    return dict(zip(nodes, shares, strict=True))


def reply_problems(message_type: str, record: Mapping[str, object]) -> list[str]:
    """What is wrong with the ``RECORD`` of a site's reply to ``message_type`` (the egress guard's and the
    centre's first check); empty when its form is sound."""
    readers = {KEYS_QUERY: public_keys, SHARES_QUERY: encrypted_shares, UNMASK_QUERY: unmask_shares}
    reader = readers.get(message_type)
    if reader is None:
        return [f"a '{message_type}' reply carries no '{RECORD}' record"]
    try:
        reader(record)
    except ProtocolError as err:
        return [str(err)]
    return []


def peer_list(
    record: Mapping[str, object], own: int, own_keys: tuple[bytes, bytes]
) -> tuple[list[int], dict[int, tuple[bytes, bytes]], int]:
    """(nodes, node -> (mask key, share key), threshold) of the centre's relayed keys, as a site must check them.

    A hostile centre could list this site twice, give it a key that is not its
    own (to read the shares meant for it), repeat one key under two nodes, or
    set a threshold that one share meets.
    """
    _exact(record, {NODES, MASK_KEYS, SHARE_KEYS, THRESHOLD}, "the relayed keys")
    nodes = node_ids(record[NODES], NODES)
    mask_keys = byte_strings(record[MASK_KEYS], MASK_KEYS, MAX_PUBLIC_KEY)
    share_keys = byte_strings(record[SHARE_KEYS], SHARE_KEYS, MAX_PUBLIC_KEY)
    t = record[THRESHOLD]
    if not len(nodes) == len(mask_keys) == len(share_keys):
        raise ProtocolError("the relayed lists of nodes and keys differ in length")
    if nodes.count(own) != 1:
        raise ProtocolError("this site is not listed exactly once among the round's sites")
    keys_by_node = {n: (m, s) for n, m, s in zip(nodes, mask_keys, share_keys, strict=True)}
    if keys_by_node[own] != own_keys:
        raise ProtocolError("the keys relayed for this site are not the ones it sent")
    every_key = mask_keys + share_keys
    if len(set(every_key)) != len(every_key):
        raise ProtocolError("one public key appears twice among the round's sites")
    if not isinstance(t, int) or isinstance(t, bool) or not len(nodes) // 2 + 1 <= t <= len(nodes) or t < 2:
        raise ProtocolError(f"threshold {t!r:.20} is not a majority of the {len(nodes)} sites (at least 2)")
    return nodes, keys_by_node, t


def node_lists(record: Mapping[str, object], peers: list[int], own: int, t: int) -> tuple[list[int], list[int]]:
    """(survivors, dropped) of an unmask request, as a site must check them: both among its peers, disjoint,
    the site itself a survivor, and at least ``t`` survivors."""
    _exact(record, {SURVIVORS, DROPPED}, "an unmask request")
    survivors, dropped = node_ids(record[SURVIVORS], SURVIVORS), node_ids(record[DROPPED], DROPPED)
    if set(survivors) & set(dropped):
        raise ProtocolError("a node is listed both as survivor and as dropped: that would reveal both its secrets")
    if not set(survivors) | set(dropped) <= set(peers):
        raise ProtocolError("the unmask request names nodes that were not among this round's sites")
    if own not in survivors:
        raise ProtocolError("this site is asked to unmask but is not listed among the survivors")
    if len(survivors) < t:
        raise ProtocolError(f"{len(survivors)} survivors, fewer than the threshold {t}")
    return survivors, dropped


def value_problems(record: Mapping[str, object]) -> Iterator[str]:
    """What a receiver refuses in a ``RECORD`` before reading it: only ints, floats, bytes and bounded lists."""
    for name, value in record.items():
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_SITES:
            yield f"'{name}' holds {len(values)} values"
        for item in values:
            if isinstance(item, bytes) and len(item) <= MAX_CIPHERTEXT:
                continue
            if isinstance(item, int) and not isinstance(item, bool):
                continue
            if isinstance(item, float) and math.isfinite(item):
                continue
            yield f"'{name}' holds a {type(item).__name__} the protocol does not send"
            break

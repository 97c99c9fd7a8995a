"""The site's side of SecAgg+ (common/secagg.py): its keys, its shares, its masked update, its unmask answer.

A round's secrets (two private keys and the self-mask seed) are written to
``<state_dir>/runs/<run>/secagg/round-NNNN.json``, owner-only, because each
message of a round may run in a fresh ClientApp process; none of them is ever
put in a reply. The file is deleted as soon as the site has answered the round's unmask
request, so a centre that asks twice cannot collect both kinds of share of one
peer (which would unmask that peer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryptography.fernet import InvalidToken
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from common import keys, secagg
from common.files import atomic_write_text
from common.flower.secure_aggregation import (
    bytes_to_private_key,
    bytes_to_public_key,
    create_shares,
    decrypt,
    encrypt,
    generate_key_pairs,
    generate_shared_key,
    private_key_to_bytes,
    public_key_to_bytes,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from common.private import private_dir
from common.records import number
from common.runs import SECAGG_DIR, SECAGG_ROUND_FILE, round_of_file

from .site import Site

log = logging.getLogger("fedseg.client")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


@dataclass
class RoundSecrets:
    """What one site holds of one round; bytes as base64, node ids as text (JSON keys)."""

    mask_sk: str
    mask_pk: str
    share_sk: str
    share_pk: str
    seed: str
    peers: dict[str, list[str]] = field(default_factory=dict)
    """Node -> [mask key, share key] of every site of the round, as relayed and checked."""
    threshold: int = 0
    held: dict[str, list[str]] = field(default_factory=dict)
    """Node -> [seed share, mask-key share] this site holds of that node's secrets."""
    masked_with: list[int] = field(default_factory=list)


def _path(site: Site, server_round: int) -> Path:
    return site.run.folder / SECAGG_DIR / SECAGG_ROUND_FILE.format(server_round)


def _save(site: Site, server_round: int, secrets: RoundSecrets) -> None:
    folder = private_dir(site.run.folder / SECAGG_DIR)
    path = folder / SECAGG_ROUND_FILE.format(server_round)
    atomic_write_text(path, json.dumps(asdict(secrets)), private=True)


def _load(site: Site, server_round: int) -> RoundSecrets:
    path = _path(site, server_round)
    if not path.is_file():
        raise secagg.ProtocolError(
            f"no secure-aggregation keys of round {server_round} at this site (the keys "
            "query of the round never reached it)"
        )
    return RoundSecrets(**json.loads(path.read_text()))


def _round(msg: Message) -> int:
    return int(number(msg.content[keys.CONFIG], keys.SERVER_ROUND))


def _record(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get(secagg.RECORD)
    if record is None:
        raise secagg.ProtocolError(f"the message carries no '{secagg.RECORD}' record")
    return record


def _own(msg: Message) -> int:
    return int(msg.metadata.dst_node_id)


def _reply(site: Site, msg: Message, values: dict) -> Message:
    reply = site.reply(msg, {})
    reply.content[secagg.RECORD] = ConfigRecord(values)
    return reply


def public_keys(site: Site, msg: Message) -> Message:
    """Stage 1: two fresh key pairs and a self-mask seed for this round; only the public keys leave."""
    server_round = _round(msg)
    mask_sk, mask_pk = generate_key_pairs()
    share_sk, share_pk = generate_key_pairs()
    secrets = RoundSecrets(
        mask_sk=_b64(private_key_to_bytes(mask_sk)),
        mask_pk=_b64(public_key_to_bytes(mask_pk)),
        share_sk=_b64(private_key_to_bytes(share_sk)),
        share_pk=_b64(public_key_to_bytes(share_pk)),
        seed=_b64(os.urandom(secagg.SEED_BYTES)),
    )
    _forget_earlier(site, server_round)
    _save(site, server_round, secrets)
    return _reply(site, msg, {secagg.MASK_KEY: _unb64(secrets.mask_pk), secagg.SHARE_KEY: _unb64(secrets.share_pk)})


def _forget_earlier(site: Site, server_round: int) -> None:
    """Delete the secrets of rounds this site never finished (it dropped, or the round failed)."""
    folder = site.run.folder / SECAGG_DIR
    for path in folder.iterdir() if folder.is_dir() else []:
        if round_of_file(path.name, SECAGG_ROUND_FILE) not in (None, server_round):
            path.unlink(missing_ok=True)


def _checked_public_key(data: bytes):
    """The EC public key in ``data``; a key of another curve or no key is refused."""
    try:
        key = bytes_to_public_key(data)
    except Exception as err:
        raise secagg.ProtocolError("a relayed public key does not parse") from err
    if key.curve.name != "secp384r1":
        raise secagg.ProtocolError(f"a relayed public key is on curve {key.curve.name}, not secp384r1")
    return key


def encrypted_shares(site: Site, msg: Message) -> Message:
    """Stage 2: check the relayed keys, share the seed and the mask key among the round's sites, each share
    encrypted for its holder."""
    server_round, own = _round(msg), _own(msg)
    secrets = _load(site, server_round)
    if secrets.peers:
        raise secagg.ProtocolError("the round's keys were already relayed to this site once")
    nodes, by_node, t = secagg.peer_list(_record(msg), own, (_unb64(secrets.mask_pk), _unb64(secrets.share_pk)))
    for node in nodes:
        for key in by_node[node]:
            _checked_public_key(key)
    seed_shares = create_shares(_unb64(secrets.seed), t, len(nodes))
    key_shares = create_shares(_unb64(secrets.mask_sk), t, len(nodes))
    share_sk = bytes_to_private_key(_unb64(secrets.share_sk))
    destinations, ciphertexts = [], []
    for index, node in enumerate(nodes):
        if node == own:
            secrets.held[str(own)] = [_b64(seed_shares[index]), _b64(key_shares[index])]
            continue
        shared = generate_shared_key(share_sk, bytes_to_public_key(by_node[node][1]))
        destinations.append(node)
        ciphertexts.append(
            encrypt(shared, share_keys_plaintext_concat(own, node, seed_shares[index], key_shares[index]))
        )
    secrets.peers = {str(n): [_b64(m), _b64(s)] for n, (m, s) in by_node.items()}
    secrets.threshold = t
    _save(site, server_round, secrets)
    return _reply(
        site,
        msg,
        {
            secagg.DESTINATIONS: destinations,
            secagg.CIPHERTEXTS: ciphertexts,
            secagg.SEED_DIGEST: hashlib.sha256(_unb64(secrets.seed)).digest(),
        },
    )


def requested(msg: Message) -> bool:
    """Whether a training message asks for a masked update."""
    return msg.has_content() and secagg.RECORD in msg.content.config_records


def masked_update(
    site: Site, msg: Message, trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
) -> ArrayRecord:
    """Stage 3: keep the shares addressed to this site, then clip, quantize and mask the update: the trained
    shared tensors minus the received ones, flat in the order of their names (the centre's order)."""
    order = sorted(received)
    update = secagg.flat(
        {k: trained[k].detach().cpu().double().numpy() - received[k].detach().cpu().double().numpy() for k in order},
        order,
    )
    server_round, own = _round(msg), _own(msg)
    secrets = _load(site, server_round)
    record = _record(msg)
    if set(record) != {secagg.SOURCES, secagg.CIPHERTEXTS, secagg.CLIP} or not secrets.peers or secrets.masked_with:
        raise secagg.ProtocolError("the training message's shares do not follow this round's key exchange")
    sources = secagg.node_ids(record[secagg.SOURCES], secagg.SOURCES)
    ciphertexts = secagg.byte_strings(record[secagg.CIPHERTEXTS], secagg.CIPHERTEXTS, secagg.MAX_CIPHERTEXT)
    bound = record[secagg.CLIP]
    if len(sources) != len(ciphertexts) or own in sources or not set(sources) <= {int(n) for n in secrets.peers}:
        raise secagg.ProtocolError("the shares come from nodes that are not this round's other sites")
    if len(sources) + 1 < secrets.threshold:
        raise secagg.ProtocolError(
            f"{len(sources) + 1} sites left in the round, fewer than the threshold {secrets.threshold}"
        )
    if not isinstance(bound, float) or not 0 < bound < 1e6:
        raise secagg.ProtocolError(f"clipping bound {bound!r:.20} is not a positive number")
    _keep_shares(secrets, own, sources, ciphertexts)
    vector = secagg.quantized(secagg.clipped(update, bound), bound)
    vector += secagg.mask(_unb64(secrets.seed), vector.size)
    mask_sk = bytes_to_private_key(_unb64(secrets.mask_sk))
    for peer in sources:
        shared = generate_shared_key(mask_sk, bytes_to_public_key(_unb64(secrets.peers[str(peer)][0])))
        pairwise = secagg.mask(shared, vector.size)
        vector = vector + pairwise if secagg.pair_sign(own, peer) > 0 else vector - pairwise
    secrets.masked_with = sources
    _save(site, server_round, secrets)
    return ArrayRecord({secagg.MASKED: Array(vector.astype(np.uint32))})


def _keep_shares(secrets: RoundSecrets, own: int, sources: list[int], ciphertexts: list[bytes]) -> None:
    """Decrypt and keep each peer's shares; one that does not decrypt or is not addressed to this site is left
    out (the site still masks with that peer: the pairwise mask needs only its public key)."""
    share_sk = bytes_to_private_key(_unb64(secrets.share_sk))
    for src, ciphertext in zip(sources, ciphertexts, strict=True):
        shared = generate_shared_key(share_sk, bytes_to_public_key(_unb64(secrets.peers[str(src)][1])))
        try:
            sender, dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(shared, ciphertext))
        except (InvalidToken, ValueError):
            log.warning(
                "the secure-aggregation shares from node %d do not decrypt; this site cannot help unmask it", src
            )
            continue
        if sender != src or dst != own or len(seed_share) > secagg.MAX_SHARE or len(key_share) > secagg.MAX_SHARE:
            log.warning("the secure-aggregation shares from node %d are not addressed to this site; left out", src)
            continue
        secrets.held[str(src)] = [_b64(seed_share), _b64(key_share)]


def unmask_shares(site: Site, msg: Message) -> Message:
    """Stage 4: the seed shares of the survivors and the mask-key shares of the dropped, once per round."""
    server_round, own = _round(msg), _own(msg)
    secrets = _load(site, server_round)
    if not secrets.masked_with:
        raise secagg.ProtocolError("this site sent no masked update in the round")
    peers = [int(n) for n in secrets.peers]
    survivors, dropped = secagg.node_lists(_record(msg), peers, own, secrets.threshold)
    nodes, shares = [], []
    for node, kind in [(n, 0) for n in survivors] + [(n, 1) for n in dropped]:
        if str(node) in secrets.held:
            nodes.append(node)
            shares.append(_unb64(secrets.held[str(node)][kind]))
    # Answered once: the round's secrets go, so a second request (say, with a survivor now listed as dropped,
    # which would give the centre both of that peer's secrets) finds nothing to answer with.
    _path(site, server_round).unlink()
    return _reply(site, msg, {secagg.NODES: nodes, secagg.SHARES: shares})

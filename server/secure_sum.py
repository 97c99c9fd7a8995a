r"""The centre's side of SecAgg+ (common/secagg.py): it learns the sum of the round's updates, not one of them.

The strategy's mean step (server/round_mean.py) hands this step the round's training
messages in ``configure`` and the training replies in ``aggregate``; the
extra exchanges go through the grid captured in ``configure``:

1. ``query.secagg_keys`` to the round's sites: each answers two public keys.
2. ``query.secagg_shares`` with every key to every site that answered: each
   answers its seed and mask key Shamir-shared among them, each share
   encrypted for its holder, and the SHA-256 of its seed.
3. The training message to each site whose shares arrived, carrying the
   shares addressed to it: it answers :math:`y_k = q(\Delta_k) + \mathrm{PRG}(b_k)
   \pm \sum_j \mathrm{PRG}(s_{kj}) \bmod 2^{32}` with :math:`q` the quantization of
   its update clipped to norm :math:`C`.
4. ``query.secagg_unmask`` to the survivors :math:`U` (the sites whose masked
   update is sound): each answers its shares of the survivors' seeds and of the
   dropped sites' mask keys. With :math:`t` shares of each, the centre rebuilds
   them (each checked: a seed against its digest, a mask key against its public
   key, other subsets of shares tried when one fails), takes the survivors' self
   masks and the pairwise masks left by the dropped off :math:`\sum_U y_k`, and
   has :math:`\sum_{k \in U} q(\Delta_k)` exactly.

The mean update is :math:`\frac{1}{|U|}\sum_U \Delta_k` (every site weighs
the same: a weight the centre chose per site would let it scale every other
site's update down to nothing and read one). The sum is checked before use:
every coordinate of the quantized sum within :math:`[0, |U| \cdot R]`, and its
norm at most :math:`|U| C` (the updates were clipped to :math:`C`). A site
whose reply at any step is malformed is left out as if it had dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import keys, secagg
from common.config import FedsegConfig
from common.flower.constants import SUPERLINK_NODE_ID
from common.flower.secure_aggregation import (
    bytes_to_private_key,
    bytes_to_public_key,
    combine_shares,
    generate_shared_key,
    public_key_to_bytes,
)
from common.records import number
from common.wire import named_site

from .recorder import RunRecorder
from .screening import ReplyScreen
from .site_registry import site_name

log = logging.getLogger("fedseg.server")
NORM_SLACK = 1.01
"""The unmasked sum may exceed |U| C by quantization error only."""


MAX_SUBSETS = 2000
"""Most share subsets tried per secret: with many sites, garbage shares from hostile ones could otherwise make
the centre try combinations without end; past this the secret counts as lost and the round fails, not the run."""


class UnmaskFailed(RuntimeError):
    """The round's sum cannot be recovered: fewer than the threshold of sound shares, or a sum out of range."""


@dataclass
class SecureRound:
    """What the centre knows of one round's exchange (public values only)."""

    rnd: int
    threshold: int = 0
    public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    """Node -> (mask key, share key) of every site that answered the keys query."""
    digests: dict[int, bytes] = field(default_factory=dict)
    """Node -> SHA-256 of its seed, of every site whose shares were relayed (they mask with each other)."""


def clip_bound(cfg: FedsegConfig) -> float:
    """C: the norm each site clips its update to (privacy.clipping_norm when central DP is on)."""
    return cfg.privacy.clipping_norm if cfg.privacy.noise_multiplier > 0 else cfg.federation.secagg_clip_norm


class SecureSum:
    """The secure-aggregation step of a round: ``configure`` before training, ``aggregate`` after."""

    def __init__(
        self, cfg: FedsegConfig, shapes: dict[str, tuple[int, ...]], recorder: RunRecorder, screen: ReplyScreen
    ) -> None:
        self.cfg = cfg
        self.shapes = shapes
        self.order = sorted(shapes)
        self.length = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())
        self.bound = clip_bound(cfg)
        self.recorder = recorder
        self.screen = screen
        self.grid: Grid | None = None
        self.round: SecureRound | None = None
        self._sent: dict[str, int] = {}
        """Message id -> node, for every protocol message: names the site behind an error the SuperLink wrote."""

    # --- the exchanges ---------------------------------------------------------------------------

    def _exchange(self, rnd: int, message_type: str, records: dict[int, dict]) -> list[Message]:
        messages = [
            Message(
                RecordDict({keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: rnd}), secagg.RECORD: ConfigRecord(values)}),
                node,
                message_type,
                group_id=str(rnd),
            )
            for node, values in records.items()
        ]
        if self.grid is None:
            raise RuntimeError("no round was configured: configure() gives the exchange its grid first")
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout_s))
        self._sent.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages})  # set when pushed
        return replies

    def _node(self, msg: Message) -> int:
        """The node a reply answers for: its sender, or the node of the message the SuperLink answered for."""
        node, answered = msg.metadata.src_node_id, msg.metadata.reply_to_message_id
        if node != SUPERLINK_NODE_ID or not msg.has_error():  # the SuperLink writes errors only
            return node
        if answered in self._sent:
            return self._sent[answered]
        return next((m.metadata.dst_node_id for m in self.screen.outgoing if m.metadata.message_id == answered), node)

    def _sound(self, rnd: int, replies: list[Message], problem, stage: str) -> dict[int, Message]:
        """Node -> reply of each sound reply; every other one is logged as its site's failure at ``stage``."""
        sound = {}
        for msg in replies:
            node = self._node(msg)
            site = site_name(self.screen.node_sites, node, None if msg.has_error() else named_site(msg))
            reason = self.screen.claim_checked(msg, problem)
            if reason is None and node in sound:
                reason = "a second reply from the same node"
            if reason is None:
                sound[node] = msg
            else:
                self.recorder.rejected(rnd, site, stage, reason)
        return sound

    def configure(self, rnd: int, messages: list[Message], grid: Grid) -> list[Message]:
        """Stages 1 and 2, then the training messages of the sites whose shares were relayed, each with the
        shares addressed to it. Too few sites for the threshold: no message (the round is below quorum)."""
        self.grid, self.round = grid, SecureRound(rnd)
        fraction = self.cfg.federation.secagg_threshold
        by_node = {m.metadata.dst_node_id: m for m in messages}
        replies = self._exchange(rnd, secagg.KEYS_QUERY, {node: {} for node in by_node})
        validator = self.screen.validator
        for node, msg in self._sound(rnd, replies, validator.secagg_problem, "secagg-keys").items():
            self.round.public[node] = secagg.public_keys(msg.content[secagg.RECORD])
        if not self._enough(rnd, len(self.round.public), 2):
            return []
        nodes = sorted(self.round.public)
        t = self.round.threshold = secagg.threshold(len(nodes), fraction)
        relayed = {
            secagg.NODES: nodes,
            secagg.MASK_KEYS: [self.round.public[n][0] for n in nodes],
            secagg.SHARE_KEYS: [self.round.public[n][1] for n in nodes],
            secagg.THRESHOLD: t,
        }
        replies = self._exchange(rnd, secagg.SHARES_QUERY, {node: relayed for node in nodes})
        shares: dict[int, dict[int, bytes]] = {}
        for node, msg in self._sound(rnd, replies, lambda m: self._shares_problem(m, nodes), "secagg-shares").items():
            shares[node], self.round.digests[node] = secagg.encrypted_shares(msg.content[secagg.RECORD])
        if not self._enough(rnd, len(shares), t):
            return []
        out = []
        for node in sorted(shares):  # the strategy's messages share one content: each gets its own
            sources = [s for s in sorted(shares) if s != node]
            original = by_node[node]
            content = RecordDict(
                {
                    **dict(original.content.items()),
                    secagg.RECORD: ConfigRecord(
                        {
                            secagg.SOURCES: sources,
                            secagg.CIPHERTEXTS: [shares[s][node] for s in sources],
                            secagg.CLIP: float(self.bound),
                        }
                    ),
                }
            )
            out.append(Message(content, node, original.metadata.message_type, group_id=original.metadata.group_id))
        return out

    def _shares_problem(self, msg: Message, nodes: list[int]) -> str | None:
        if problem := self.screen.validator.secagg_problem(msg):
            return problem
        destinations, _ = secagg.encrypted_shares(msg.content[secagg.RECORD])
        if sorted(destinations) != [n for n in nodes if n != msg.metadata.src_node_id]:
            return "the shares are not addressed to exactly the round's other sites"
        return None

    @staticmethod
    def _enough(rnd: int, found: int, needed: int) -> bool:
        if found >= max(needed, 2):
            return True
        log.warning(
            "round %d: %d site(s) left in the secure-aggregation exchange, %d needed; no training this round",
            rnd,
            found,
            max(needed, 2),
        )
        return False

    # --- after training -------------------------------------------------------------------------

    def aggregate(self, rnd: int, replies: list[Message]) -> tuple[np.ndarray | None, list[tuple[Message, str]]]:
        """(the float sum of the survivors' updates, the survivors' replies with their sites, each logged as
        trained); the sum is None when it cannot be recovered (logged)."""
        state = self.round
        if state is None or state.rnd != rnd:
            return None, []
        sound = self._sound(rnd, replies, lambda m: self.screen.validator.masked_problem(m, self.length), "train")
        survivors = sorted(n for n in sound if n in state.digests)
        dropped = sorted(set(state.digests) - set(survivors))
        named = [(sound[n], site_name(self.screen.node_sites, n, named_site(sound[n]))) for n in survivors]
        try:
            total = self._unmasked(state, sound, survivors, dropped)
        except UnmaskFailed as err:
            log.warning("round %d: %s; the round is not aggregated", rnd, err)
            for _, site in named:
                self.recorder.rejected(rnd, site, "secagg-unmask", str(err))
            return None, []
        for msg, site in named:
            self.recorder.trained(rnd, site, msg)
        return total, named

    def _unmasked(
        self, state: SecureRound, sound: dict[int, Message], survivors: list[int], dropped: list[int]
    ) -> np.ndarray:
        rnd = state.rnd
        if len(survivors) < max(state.threshold, 2):
            raise UnmaskFailed(f"{len(survivors)} masked update(s) arrived, the threshold is {state.threshold}")
        request = {secagg.SURVIVORS: survivors, secagg.DROPPED: dropped}
        replies = self._exchange(rnd, secagg.UNMASK_QUERY, {node: request for node in survivors})
        held: dict[int, list[bytes]] = {n: [] for n in [*survivors, *dropped]}
        for msg in self._sound(rnd, replies, self.screen.validator.secagg_problem, "secagg-unmask").values():
            for owner, share in secagg.unmask_shares(msg.content[secagg.RECORD]).items():
                if owner in held:
                    held[owner].append(share)
        total = np.zeros(self.length, dtype=np.uint32)
        for node in survivors:
            total += sound[node].content.array_records[keys.ARRAYS][secagg.MASKED].numpy()
            seed = self._rebuilt(
                held[node],
                state.threshold,
                lambda s, n=node: hashlib.sha256(s).digest() == state.digests[n],
                f"the self-mask seed of node {node}",
            )
            total -= secagg.mask(seed, self.length)
        for node in dropped:
            mask_key = self._rebuilt(
                held[node],
                state.threshold,
                lambda s, n=node: self._is_mask_key(s, state.public[n][0]),
                f"the mask key of dropped node {node}",
            )
            private = bytes_to_private_key(mask_key)
            for survivor in survivors:
                pairwise = secagg.mask(
                    generate_shared_key(private, bytes_to_public_key(state.public[survivor][0])), self.length
                )
                # the survivor added the mask with the sign of its side of the pair: take that off
                total = total - pairwise if secagg.pair_sign(survivor, node) > 0 else total + pairwise
        return self._checked_sum(total, len(survivors))

    @staticmethod
    def _is_mask_key(secret: bytes, public_key: bytes) -> bool:
        try:
            public = bytes_to_private_key(secret).public_key()
        except Exception:  # noqa: BLE001 - wrong shares rebuild bytes that are no key
            return False
        return public_key_to_bytes(public) == public_key

    @staticmethod
    def _rebuilt(shares: list[bytes], t: int, sound, what: str) -> bytes:
        """The secret behind ``shares``: the first ``t``-subset whose result ``sound`` accepts (a malformed
        share from one site makes a subset fail, not the round)."""
        if len(shares) < t:
            raise UnmaskFailed(f"{len(shares)} share(s) of {what} arrived, the threshold is {t}")
        for subset in itertools.islice(itertools.combinations(shares, t), MAX_SUBSETS):
            try:
                secret = combine_shares(list(subset))
            except Exception:  # noqa: BLE001 - shares of different lengths or indices
                continue
            if sound(secret):
                return secret
        raise UnmaskFailed(
            f"no {t} of the {len(shares)} shares of {what} rebuild it (first {MAX_SUBSETS} subsets tried)"
        )

    def _checked_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The float sum, after checking that the quantized sum is one of ``count`` honest updates."""
        if int(total.max(initial=0)) > count * secagg.QUANT_RANGE:
            raise UnmaskFailed(
                "the unmasked sum is out of the quantization range: a masked vector was not a masked update"
            )
        values = secagg.dequantized_sum(total, count, self.bound)
        norm = float(np.linalg.norm(values))
        if not np.isfinite(values).all() or norm > NORM_SLACK * count * self.bound + 1e-6:
            raise UnmaskFailed(
                f"the unmasked sum has norm {norm:.4g}, more than {count} sites clipped to {self.bound:g} can make"
            )
        return values

    def mean(
        self,
        total: np.ndarray,
        survivors: list[tuple[Message, str]],
        reference: dict[str, np.ndarray],
        denominator: int,
    ) -> tuple[ArrayRecord, MetricRecord]:
        """w^t plus ``total / denominator``, and the survivors' metrics averaged unweighted (the mean of the
        updates weighs every site 1); timings stay out, as in FedAvg's metrics."""
        update = secagg.unflat(total / denominator, self.shapes, self.order)
        mean = ArrayRecord({k: Array(np.ascontiguousarray(reference[k] + update[k])) for k in reference})
        records = [msg.content.metric_records[keys.METRICS] for msg, _ in survivors]
        names = set.intersection(*(set(r) for r in records)) - set(keys.TIMELINE_METRICS)
        return mean, MetricRecord({k: float(np.mean([float(number(r, k)) for r in records])) for k in sorted(names)})

"""Secure aggregation (SecAgg+, federation.secure_aggregation: secagg+): the centre learns the sum, not an update.

Every federation here is the real strategy and the real ClientApp over Flower's
wire in one process (tests/helpers/local_grid.py): three tiny sites, the keys, shares,
masked updates and unmask shares all made by the sites' own code. Observers
(they call through, changing nothing) note each site's update, what it
quantized and what the centre unmasked, so that the tests can compare the centre's sum
with the plain sum of the quantized updates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from safetensors.torch import load_file

from client import client_app
from client.egress import EgressPolicy, problems
from client.site import Site
from common import keys, secagg
from common.config import ConfigError, load_config
from common.metrics_log import read_events
from common.runs import METRICS_FILE
from server import secure_sum
from server.server_app import initial_weights
from server.strategy import FedSegStrategy
from simulations.synthetic import generate_federation
from tests.helpers.envelopes import incoming
from tests.helpers.local_grid import LocalGrid, federation, model_strategy
from tests.helpers.tiny import tiny

SITES = 3
SPLIT_SEED = 6
"""Each 4-case site then trains on 3 cases and scores 1: equal counts, so the plain run's case-weighted mean
and secure aggregation's equal weights are the same mean (the Dice comparison is at equal settings)."""
SECURE = ("federation.secure_aggregation=secagg+", "federation.norm_bound=0")
BASE = (
    "federation.min_sites=2",
    "simulation.cpus_per_site=1",
    f"data.split_seed={SPLIT_SEED}",
    "train.local_steps=3",
    "train.batch_size=2",
)


@dataclass
class Observed:
    """What the observers noted: each site's quantized update and each centre-side unmasked total, in order."""

    quantized: list[np.ndarray] = field(default_factory=list)
    totals: list[np.ndarray] = field(default_factory=list)
    updates: list[np.ndarray] = field(default_factory=list)


@pytest.fixture()
def observed(monkeypatch) -> Observed:
    seen = Observed()
    quantized, clipped, checked = secagg.quantized, secagg.clipped, secure_sum.SecureSum._checked_sum

    def noting_clip(update, bound):
        seen.updates.append(update.copy())
        return clipped(update, bound)

    def noting_quantized(update, bound):
        values = quantized(update, bound)
        seen.quantized.append(values.copy())
        return values

    def noting_total(self, total, count):
        seen.totals.append(total.copy())
        return checked(self, total, count)

    monkeypatch.setattr(secagg, "clipped", noting_clip)
    monkeypatch.setattr(secagg, "quantized", noting_quantized)
    monkeypatch.setattr(secure_sum.SecureSum, "_checked_sum", noting_total)
    return seen


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    return generate_federation(
        tmp_path_factory.mktemp("secagg-data"), n_sites=SITES, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0
    )


@dataclass
class Run:
    events: list[dict]
    grid: LocalGrid
    strategy: FedSegStrategy


def run(tmp_path: Path, datasets, *overrides: str, rounds: int = 1, tamper=None, name: str = "run") -> Run:
    """A federation of the real apps in this process, its strategy as the ServerApp builds it (with central DP when
    configured); ``tamper(node, reply)`` may replace a reply that left a site."""
    cfg = federation(
        load_config(
            None,
            [
                *tiny(*BASE, f"federation.rounds={rounds}", *overrides),
                f"federation.runs_dir={tmp_path / 'runs'}",
                f"federation.run_name={name}",
            ],
        ),
        datasets,
    )
    folder = tmp_path / "runs" / name
    strategy, weights = model_strategy(cfg, folder)
    grid = LocalGrid(cfg, client_app.app, tamper=tamper)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(weights),
        num_rounds=rounds,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    return Run(list(read_events(folder / METRICS_FILE)), grid, strategy)


def plain_sum(quantized: list[np.ndarray]) -> np.ndarray:
    """The sum of quantized updates, exactly, in the field (it never wraps: each is at most 2^22)."""
    return (np.sum([q.astype(np.int64) for q in quantized], axis=0) % secagg.MODULUS).astype(np.uint32)


def replies(grid: LocalGrid, message_type: str) -> list[Message]:
    return [r for r in grid.received if r.metadata.message_type == message_type]


def rounds_aggregated(events: list[dict]) -> list[tuple[int, int]]:
    return [(e["round"], e["sites_ok"]) for e in events if e["event"] == "round" and e.get("aggregated")]


# --- the sum, and what one masked vector says ---------------------------------------------------------------------


@pytest.mark.simulation
def test_the_centre_unmasks_exactly_the_sum_of_the_quantized_updates(tmp_path, datasets, observed):
    done = run(tmp_path, datasets, *SECURE)
    assert len(observed.quantized) == SITES and len(observed.totals) == 1
    assert np.array_equal(observed.totals[0], plain_sum(observed.quantized))
    assert rounds_aggregated(done.events) == [(1, SITES)]
    train = [e for e in done.events if e["event"] == "train"]
    assert len(train) == SITES and all(e["num_examples"] is None for e in train), "no case count in the clear"
    for reply in replies(done.grid, MessageType.TRAIN):
        assert set(reply.content.array_records[keys.ARRAYS]) == {secagg.MASKED}
        assert keys.NUM_EXAMPLES not in reply.content.metric_records[keys.METRICS]


@pytest.mark.simulation
def test_a_masked_vector_is_unrelated_to_the_update_it_hides(tmp_path, datasets, observed):
    done = run(tmp_path, datasets, *SECURE)
    masked = [
        r.content.array_records[keys.ARRAYS][secagg.MASKED].numpy() for r in replies(done.grid, MessageType.TRAIN)
    ]
    for update, vector in zip(observed.updates, masked, strict=True):
        assert vector.dtype == np.uint32 and vector.size == update.size
        assert abs(np.corrcoef(update, vector.astype(np.float64))[0, 1]) < 0.05
        # uniform over the field: every sixteenth of it holds about a sixteenth of the values
        counts = np.bincount((vector >> 28).astype(np.int64), minlength=16)
        assert np.all(np.abs(counts / vector.size - 1 / 16) < 0.02), counts
    quantized = observed.quantized[0]  # for contrast: the quantized update itself sits in a narrow band
    assert np.bincount((quantized >> 28).astype(np.int64), minlength=16).max() == quantized.size


@pytest.mark.simulation
def test_fewer_shares_than_the_threshold_rebuild_nothing(tmp_path, datasets) -> None:
    done = run(tmp_path, datasets, *SECURE)
    digests = {}
    for reply in replies(done.grid, secagg.SHARES_QUERY):
        _, digests[reply.metadata.src_node_id] = secagg.encrypted_shares(reply.content.config_records[secagg.RECORD])
    held: dict[int, list[bytes]] = {n: [] for n in digests}
    for reply in replies(done.grid, secagg.UNMASK_QUERY):
        for node, share in secagg.unmask_shares(reply.content.config_records[secagg.RECORD]).items():
            held[node].append(share)
    t = secagg.threshold(SITES, 0.6)
    assert t == 2
    for node, shares in held.items():
        assert len(shares) == SITES
        assert hashlib.sha256(combine_shares(shares[:t])).digest() == digests[node]
        for one in shares:  # below the threshold: another secret, or none
            try:
                rebuilt = combine_shares([one])
            except ValueError:
                continue
            assert hashlib.sha256(rebuilt).digest() != digests[node]
        with pytest.raises(secure_sum.UnmaskFailed, match="threshold"):
            secure_sum.SecureSum._rebuilt(shares[: t - 1], t, lambda s: True, "a seed")


@pytest.mark.simulation
def test_a_site_answers_one_unmask_request_per_round(tmp_path, datasets):
    done = run(tmp_path, datasets, *SECURE)
    nodes = sorted(done.grid.nodes)
    asking_again = incoming(
        RecordDict(
            {
                keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: 1}),
                secagg.RECORD: ConfigRecord({secagg.SURVIVORS: nodes[:2], secagg.DROPPED: nodes[2:]}),
            }
        ),
        secagg.UNMASK_QUERY,
        nodes[0],
    )
    answer = client_app.app(asking_again, done.grid.context(nodes[0]))
    assert answer.has_error(), "a second request could collect the other kind of share of a peer"


# --- drops and malformed replies ------------------------------------------------------------------------------------


def _gone(message_type: str, node: int):
    """A tamper hook: site ``node``'s reply to ``message_type`` never arrives (the SuperLink's answer instead)."""

    def tamper(src: int, reply: Message) -> Message:
        if src == node and reply.metadata.message_type == message_type:
            return Message(Error(code=0, reason="node unavailable"), reply_to=_request_of(reply))
        return reply

    return tamper


def _request_of(reply: Message) -> Message:
    return incoming(
        RecordDict(), reply.metadata.message_type, reply.metadata.src_node_id, int(reply.metadata.group_id or 1)
    )


@pytest.mark.simulation
@pytest.mark.parametrize("stage", [MessageType.TRAIN, secagg.UNMASK_QUERY])
def test_a_site_that_drops_leaves_a_correct_round(tmp_path, datasets, observed, stage):
    """Dropping before its masked update arrives (its pairwise masks are rebuilt and removed), or after it (its
    seed is rebuilt from the other two sites' shares)."""
    done = run(tmp_path, datasets, *SECURE, tamper=_gone(stage, SITES))
    included = observed.quantized[: SITES - 1] if stage == MessageType.TRAIN else observed.quantized
    assert np.array_equal(observed.totals[0], plain_sum(included))
    assert rounds_aggregated(done.events) == [(1, len(included))]


def _malformed(message_type: str, node: int, change):
    def tamper(src: int, reply: Message) -> Message:
        if src != node or reply.metadata.message_type != message_type or reply.has_error():
            return reply
        content = RecordDict(dict(reply.content.items()))
        change(content)
        return Message(content, reply_to=_request_of(reply))

    return tamper


def _short_vector(content: RecordDict) -> None:
    vector = content.array_records[keys.ARRAYS][secagg.MASKED].numpy()
    content[keys.ARRAYS] = ArrayRecord({secagg.MASKED: Array(vector[:-1].copy())})


def _entries(record: ConfigRecord, key: str) -> list:
    """A list entry of a protocol record, to rebuild it altered."""
    value = record[key]
    assert isinstance(value, list)
    return value


def _one_share_missing(content: RecordDict) -> None:
    record = content.config_records[secagg.RECORD]
    content[secagg.RECORD] = ConfigRecord(
        {
            secagg.DESTINATIONS: _entries(record, secagg.DESTINATIONS)[:-1],
            secagg.CIPHERTEXTS: _entries(record, secagg.CIPHERTEXTS)[:-1],
            secagg.SEED_DIGEST: record[secagg.SEED_DIGEST],
        }
    )


def _garbage_shares(content: RecordDict) -> None:
    record = content.config_records[secagg.RECORD]
    content[secagg.RECORD] = ConfigRecord(
        {secagg.NODES: record[secagg.NODES], secagg.SHARES: [bytes(len(s)) for s in _entries(record, secagg.SHARES)]}
    )


@pytest.mark.simulation
@pytest.mark.parametrize(
    "stage,change,left_out",
    [
        (MessageType.TRAIN, _short_vector, True),
        (secagg.SHARES_QUERY, _one_share_missing, True),
        (secagg.UNMASK_QUERY, _garbage_shares, False),
    ],
)
def test_a_malformed_reply_is_left_out_without_ending_the_round(tmp_path, datasets, observed, stage, change, left_out):
    """A short masked vector or a share list that misses a peer is refused at the centre and its site treated as
    dropped; shares for unmasking are only known bad when they rebuild nothing, so the centre rebuilds each secret
    from another majority of shares and the site's masked update still counts."""
    done = run(tmp_path, datasets, *SECURE, tamper=_malformed(stage, SITES, change))
    if stage == secagg.SHARES_QUERY:  # left out before training: it never masks, the others never mask with it
        assert len(observed.quantized) == SITES - 1
    included = observed.quantized[: SITES - 1] if left_out else observed.quantized
    assert np.array_equal(observed.totals[0], plain_sum(included))
    assert rounds_aggregated(done.events) == [(1, len(included))]
    failures = [e for e in done.events if e["event"] == "failure"]
    assert [e["site"] for e in failures] == ([f"site-{SITES}"] if left_out else []), failures


# --- what a site checks of the centre -------------------------------------------------------------------------------


def _relayed(nodes, mask_keys, share_keys, t):
    return {secagg.NODES: nodes, secagg.MASK_KEYS: mask_keys, secagg.SHARE_KEYS: share_keys, secagg.THRESHOLD: t}


@pytest.mark.parametrize(
    "record,match",
    [
        (_relayed([1, 2, 3], [b"m1", b"m2", b"m3"], [b"s1", b"s2", b"s3"], 2), None),
        (_relayed([1, 2, 1], [b"m1", b"m2", b"m1"], [b"s1", b"s2", b"s1"], 2), "twice"),
        (_relayed([1, 2, 3], [b"mX", b"m2", b"m3"], [b"s1", b"s2", b"s3"], 2), "not the ones it sent"),
        (_relayed([1, 2, 3], [b"m1", b"m2", b"m2"], [b"s1", b"s2", b"s3"], 2), "appears twice"),
        (_relayed([1, 2, 3], [b"m1", b"m2", b"m3"], [b"s1", b"s2", b"s3"], 1), "not a majority"),
        (_relayed([2, 3], [b"m2", b"m3"], [b"s2", b"s3"], 2), "not listed exactly once"),
        (
            _relayed(
                list(range(1, secagg.MAX_SITES + 2)),
                [b"m"] * (secagg.MAX_SITES + 1),
                [b"s"] * (secagg.MAX_SITES + 1),
                2,
            ),
            "more than",
        ),
    ],
)
def test_a_site_refuses_a_relayed_key_list_no_honest_centre_sends(record, match):
    if match is None:
        nodes, keys_by_node, t = secagg.peer_list(record, 1, (b"m1", b"s1"))
        assert nodes == [1, 2, 3] and keys_by_node[2] == (b"m2", b"s2") and t == 2
        return
    with pytest.raises(secagg.ProtocolError, match=match):
        secagg.peer_list(record, 1, (b"m1", b"s1"))


@pytest.mark.parametrize(
    "survivors,dropped,match",
    [
        ([1, 2], [2], "both as survivor and as dropped"),
        ([1, 2], [9], "not among"),
        ([2, 3], [1], "not listed among the survivors"),
        ([1], [2, 3], "fewer than the threshold"),
    ],
)
def test_a_site_refuses_an_unmask_request_that_could_unmask_a_peer(survivors, dropped, match):
    with pytest.raises(secagg.ProtocolError, match=match):
        secagg.node_lists({secagg.SURVIVORS: survivors, secagg.DROPPED: dropped}, [1, 2, 3], 1, 2)


@pytest.mark.simulation
def test_nothing_unmasked_leaves_a_site_that_was_asked_for_a_masked_update(tmp_path, datasets):
    done = run(tmp_path, datasets, *SECURE)
    site = Site.resolve(done.grid.context(1))
    policy = EgressPolicy.for_site(site, "float32")
    masked_reply = next(r for r in replies(done.grid, MessageType.TRAIN) if r.metadata.src_node_id == 1)
    assert problems(masked_reply, policy.masked(), MessageType.TRAIN) == []
    plain = RecordDict(dict(masked_reply.content.items()))
    weights, _ = initial_weights(site.cfg)
    plain[keys.ARRAYS] = ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()})
    found = problems(Message(plain, reply_to=_request_of(masked_reply)), policy.masked(), MessageType.TRAIN)
    assert any("not in the model signature" in p for p in found), found
    with_count = RecordDict(dict(masked_reply.content.items()))
    with_count[keys.METRICS] = MetricRecord(
        {**dict(masked_reply.content.metric_records[keys.METRICS]), keys.NUM_EXAMPLES: 3}
    )
    found = problems(Message(with_count, reply_to=_request_of(masked_reply)), policy.masked(), MessageType.TRAIN)
    assert any(keys.NUM_EXAMPLES in p for p in found), found
    audit = [
        line for line in (Path(site.cfg.site.state_dir) / "egress.jsonl").read_text().splitlines() if "secagg" in line
    ]
    assert {
        t for t in (secagg.KEYS_QUERY, secagg.SHARES_QUERY, secagg.UNMASK_QUERY) if any(t in line for line in audit)
    } == {secagg.KEYS_QUERY, secagg.SHARES_QUERY, secagg.UNMASK_QUERY}


# --- configuration ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting,why",
    [
        ("federation.norm_bound=10", "norm_bound: 0"),
        ("federation.aggregator=median", "aggregator: mean"),
        ("federation.aggregator=trimmed_mean", "aggregator: mean"),
        ("federation.clip_updates=true", "clip_updates: false"),
        ("federation.schedule=cyclic", "schedule: parallel"),
    ],
)
def test_combinations_that_need_one_sites_update_are_refused(setting, why):
    overrides = ["federation.secure_aggregation=secagg+", "federation.norm_bound=0", setting]
    if setting.endswith("cyclic"):
        overrides.append("federation.server_optimizer=none")
    with pytest.raises(ConfigError, match="shows the centre only the sum") as refused:
        load_config(None, overrides)
    assert why in str(refused.value)


@pytest.mark.parametrize("setting", ["federation.secagg_threshold=0.5", "federation.secagg_clip_norm=0"])
def test_protocol_numbers_are_checked(setting):
    with pytest.raises(ConfigError, match="majority"):
        load_config(None, [*SECURE, setting])


def test_central_dp_composes_with_secure_aggregation():
    cfg = load_config(None, [*SECURE, "privacy.noise_multiplier=1.0", "privacy.clipping_norm=2.0"])
    assert secure_sum.clip_bound(cfg) == 2.0, "the sites clip to the bound the DP noise is calibrated to"


# --- the model it trains ----------------------------------------------------------------------------------------------

DICE_ROUNDS = 3


@pytest.mark.simulation
def test_secure_aggregation_trains_the_model_plain_aggregation_does(tmp_path, datasets, observed):
    plain = run(tmp_path, datasets, "federation.norm_bound=0", rounds=DICE_ROUNDS, name="plain")
    secure = run(tmp_path, datasets, *SECURE, rounds=DICE_ROUNDS, name="secure")
    bound = load_config(None, list(SECURE)).federation.secagg_clip_norm
    assert max(np.linalg.norm(u) for u in observed.updates) < bound, "a clipped update would not be equal settings"
    dice = {}
    for name, done in (("plain", plain), ("secure", secure)):
        assert rounds_aggregated(done.events) == [(r, SITES) for r in range(1, DICE_ROUNDS + 1)]
        closing = [e for e in done.events if e["event"] == "round" and e["round"] == DICE_ROUNDS]
        dice[name] = closing[0]["dice_mean"]
    print(f"Dice after {DICE_ROUNDS} rounds: plain {dice['plain']:.4f}, secagg+ {dice['secure']:.4f}")
    assert dice["secure"] == pytest.approx(dice["plain"], abs=0.01)
    assert dice["plain"] > 0.1, "the comparison is between models that learnt something"


@pytest.mark.simulation
def test_central_dp_noises_the_unmasked_sum_over_the_federations_size(tmp_path, datasets, observed):
    z, clip = 0.5, 5.0
    done = run(
        tmp_path,
        datasets,
        *SECURE,
        f"privacy.noise_multiplier={z}",
        f"privacy.clipping_norm={clip}",
        "federation.server_optimizer=none",
        name="dp",
    )
    (privacy,) = [e for e in done.events if e["event"] == "privacy"]
    assert (privacy["sites"], privacy["denominator"]) == (SITES, SITES)
    strategy = done.strategy
    start = strategy.reference
    order = strategy.round_mean.secure_sum.order
    released = load_file(tmp_path / "runs" / "dp" / "checkpoints" / "round-0001.safetensors")
    mean = secagg.unflat(secagg.dequantized_sum(observed.totals[0], SITES, clip) / SITES, strategy.shapes, order)
    noise = np.concatenate([(released[k].numpy() - start[k] - mean[k]).ravel() for k in order])
    assert np.std(noise) == pytest.approx(z * clip / SITES, rel=0.05)
    assert abs(np.mean(noise)) < 0.05 * z * clip / SITES


def test_the_centres_boundary_takes_a_protocol_record_only_in_a_protocol_reply(tmp_path):
    from server.inbound import Inbox

    inbox = Inbox({7: "site-1"})
    record = ConfigRecord({secagg.MASK_KEY: b"m" * 215, secagg.SHARE_KEY: b"s" * 215})
    identity = ConfigRecord({keys.SITE: "site-1", keys.SIGNATURE: "x"})

    def reply(message_type: str, protocol: ConfigRecord) -> Message:
        content = RecordDict({keys.IDENTITY: identity, secagg.RECORD: protocol})
        return Message(content, reply_to=incoming(RecordDict(), message_type, 7))

    assert not inbox.receive(reply(secagg.KEYS_QUERY, record)).has_error()
    assert inbox.receive(reply(MessageType.TRAIN, record)).has_error()
    assert inbox.receive(reply(secagg.KEYS_QUERY, ConfigRecord({secagg.MASK_KEY: "text"}))).has_error()


def test_garbage_shares_from_many_sites_cost_the_centre_a_bounded_number_of_tries(monkeypatch):
    """Shares that rebuild nothing make the secret lost after MAX_SUBSETS tries, not an endless search
    (C(40, 21) subsets without the bound; the bound is lowered here only so that the test takes a second)."""
    import server.secure_sum as secure_sum

    combined, combine = [], secure_sum.combine_shares

    def counted(shares: list[bytes]) -> bytes:
        combined.append(len(shares))
        return combine(shares)

    monkeypatch.setattr(secure_sum, "MAX_SUBSETS", 25)
    monkeypatch.setattr(secure_sum, "combine_shares", counted)
    garbage = [bytes([i]) * 32 for i in range(40)]
    with pytest.raises(secure_sum.UnmaskFailed, match=r"rebuild it \(first 25 subsets tried\)"):
        secure_sum.SecureSum._rebuilt(garbage, 21, lambda secret: False, "a seed")
    assert combined == [21] * 25

"""Property-based fuzzing of both receiving boundaries, through the real stacks (hypothesis).

The centre: a hostile site's replies (mutated records, wrong stypes, lying layouts and shapes, non-finite and
huge values, lists where numbers belong, control characters in every string, other sites' names, error texts,
silence) go through the ServerApp's real grid stack (server/packed_grid.py, server/receiving_grid.py with
server/inbound.py) into the real strategy for two rounds, beside three honest sites. Properties: the run
completes with every honest site in every round and a finite model; every event names a registered site; the
metrics log and the console stay one line per event.

A site: hostile messages from the centre (path-like ids, odd rounds, configuration values of every type, text
with control characters, arrays whose bytes lie) go through the real ClientApp (client/client_app.py
``_handle`` behind Flower's dispatch). Properties: the app never raises; every error reply carries one of the
site's fixed reasons; no file outside the site's state folder changes; no log line of the site holds a
control character.

The examples are derandomized (a fixed seed) and few enough for CI; ``FEDSEG_FUZZ=slow`` selects a profile that
runs twenty times as many.
"""

from __future__ import annotations

import logging
import os
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import keys
from common.metrics_log import read_events
from common.progress import CONTROL, describe
from common.wire import pack
from tests.helpers.messages import GLOBAL
from tests.helpers.scripted_grid import honest_answer, run_rounds

CI_EXAMPLES = 120
settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("slow", parent=settings.get_profile("ci"), max_examples=20 * CI_EXAMPLES)
PROFILE = "slow" if os.environ.get("FEDSEG_FUZZ") == "slow" else "ci"

SITES = {1: "hospital-a", 2: "hospital-b", 3: "hospital-c", 4: "hospital-x"}
HOSTILE = 4

# --- values a hostile party may put anywhere -------------------------------------------------------------------

nasty_text = st.one_of(
    st.sampled_from(
        [
            "hospital-a",
            "hospital-b",
            "site-1",
            "../egress.jsonl",
            "/etc/passwd",
            "a\nb",
            "\x1b[2J",
            "\u2028",
            "x" * 5000,
            "",
            "site hospital-a: ok",
            "\x00",
        ]
    ),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Zl", "L", "N", "P"]), max_size=40),
)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
odd_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e300, -1e300, 1e-300]))
metric_value = st.one_of(int64, odd_float, st.lists(odd_float, max_size=20), st.lists(int64, max_size=5))
config_value = st.one_of(
    int64,
    odd_float,
    st.booleans(),
    nasty_text,
    st.binary(max_size=20),
    st.lists(int64, max_size=4),
    st.lists(nasty_text, max_size=3),
)
metric_name = st.one_of(
    st.sampled_from(
        [
            keys.NUM_EXAMPLES,
            "loss",
            "proximal_loss",
            "duration_s",
            "dice",
            "t_delivered",
            "t_work_done",
            keys.TEST_NUM_EXAMPLES,
            "dice_class_1",
            "fp_cases",
        ]
    ),
    nasty_text.filter(bool),
)


def _lying_array(kind: str, values: np.ndarray | Array) -> Array:
    """An Array whose header and bytes disagree, or whose bytes are not what numpy can read."""
    honest = values if isinstance(values, Array) else Array(values)
    if kind == "shape":
        return Array(dtype=honest.dtype, shape=(*honest.shape, 2), stype=honest.stype, data=honest.data)
    if kind == "dtype":
        return Array(dtype="float16", shape=honest.shape, stype=honest.stype, data=honest.data)
    if kind == "stype":
        return Array(dtype=honest.dtype, shape=honest.shape, stype="torch.Tensor", data=honest.data)
    return Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=b"\x93NUMPY" + bytes(7))


array_values = st.one_of(
    st.sampled_from(
        [
            np.full((4, 4), np.nan, np.float32),
            np.full((4, 4), 1e38, np.float32),
            np.zeros((4, 4), np.float64),
            np.zeros((4, 4), np.int64),
            np.zeros((5, 4), np.float32),
            np.zeros((0,), np.float32),
            np.ones((4,), np.float16),
        ]
    ),
)


@st.composite
def mutation(draw) -> tuple:
    """One change a hostile site makes to the honest reply it would have sent."""
    return draw(
        st.one_of(
            st.tuples(
                st.just("metric"),
                st.sampled_from([keys.METRICS, keys.EVALUATION, keys.FINGERPRINT]),
                metric_name,
                metric_value,
            ),
            st.tuples(st.just("identity"), st.sampled_from([keys.SITE, keys.SIGNATURE, "extra"]), nasty_text),
            st.tuples(st.just("array"), st.sampled_from(["w", "b", "extra", "\n"]), array_values),
            st.tuples(
                st.just("lying-array"),
                st.sampled_from(["w", "b"]),
                st.sampled_from(["shape", "dtype", "stype", "bytes"]),
            ),
            st.tuples(st.just("drop"), st.sampled_from([keys.METRICS, keys.IDENTITY, keys.ARRAYS, keys.EVALUATION])),
            st.tuples(st.just("record"), nasty_text.filter(bool)),
            st.tuples(
                st.just("layout"),
                st.sampled_from(["names", "dtypes", "ndims", "shapes"]),
                st.one_of(st.lists(int64, max_size=6), st.lists(nasty_text, max_size=3), st.integers()),
            ),
            st.tuples(st.just("flat"), st.sampled_from(["shape", "dtype", "stype", "bytes"])),
        )
    )


@st.composite
def hostile_reply(draw) -> tuple:
    """What the hostile site does in each round: mutate its reply, answer an error text, or say nothing."""
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "error", "silent"]))
    return kind, draw(st.lists(mutation(), min_size=1, max_size=4)), draw(nasty_text)


def _apply(body: RecordDict, change: tuple) -> RecordDict:
    op = change[0]
    if op == "metric":
        _, record, name, value = change
        if record not in body.metric_records:
            body[record] = MetricRecord({})
        body[record][name] = value
    elif op == "identity" and keys.IDENTITY in body.config_records:
        body.config_records[keys.IDENTITY][change[1]] = change[2]
    elif op == "array" and keys.ARRAYS in body.array_records:
        body.array_records[keys.ARRAYS][change[1]] = Array(change[2])
    elif op == "lying-array" and keys.ARRAYS in body.array_records:
        body.array_records[keys.ARRAYS][change[1]] = _lying_array(change[2], GLOBAL[change[1]] + np.float32(0.1))
    elif op == "drop" and change[1] in body:
        del body[change[1]]
    elif op == "record":
        body[change[1]] = ConfigRecord({"x": 1})
    elif op == "layout" and keys.LAYOUT in body.config_records:
        body.config_records[keys.LAYOUT][change[1]] = change[2]
    elif op == "flat" and keys.LAYOUT in body.config_records and body.array_records.get(keys.ARRAYS):
        name = next(iter(body.array_records[keys.ARRAYS].keys()))
        body.array_records[keys.ARRAYS][name] = _lying_array(change[1], body.array_records[keys.ARRAYS][name])
    return body


def _hostile_site(plan: list[tuple]):
    honest = honest_answer(SITES)
    calls = iter(range(10**6))

    def answer(node: int, msg: Message) -> RecordDict | Error | None:
        body = honest(node, msg)
        if node != HOSTILE:
            return body
        assert isinstance(body, RecordDict)  # an honest site always answers
        kind, changes, text = plan[next(calls) % len(plan)]
        if kind == "silent":
            return None
        if kind == "error":
            return Error(code=1001, reason=f"site {text}: {text}")
        packed_first = any(c[0] in ("layout", "flat") for c in changes)
        body = pack(body) if packed_first else body
        for change in changes:
            body = _apply(body, change)
        return body

    return answer


@pytest.mark.simulation
@settings(settings.get_profile(PROFILE))
@given(plan=st.lists(hostile_reply(), min_size=1, max_size=3))
def test_fuzz_hostile_replies_never_stop_the_run(plan):
    """The run goes on with the honest sites, names only registered sites, and logs one line per event."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        strategy = run_rounds(run, SITES, _hostile_site(plan), 2)  # the deployed defaults, norm bound on
        assert strategy.recorder.checkpoints.state.last_round == 2
        events = list(read_events(run / "metrics.jsonl"))
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len(events)
        trained = [(e["round"], e["site"]) for e in events if e["event"] == "train"]
        for rnd in (1, 2):
            assert [s for r, s in trained if r == rnd].count("hospital-a") == 1
            assert {s for r, s in trained if r == rnd} >= {"hospital-a", "hospital-b", "hospital-c"}
        assert {e["site"] for e in events if e.get("site") is not None} <= set(SITES.values())
        for event in events:
            line = describe(event, expected=len(SITES))
            assert line is None or (len(line.splitlines()) == 1 and CONTROL.search(line) is None), line


# --- a site ---------------------------------------------------------------------------------------------------

MESSAGE_TYPES = [MessageType.TRAIN, MessageType.EVALUATE, "query.fingerprint", "query.cross_eval"]


@st.composite
def hostile_message(draw, signature: str) -> tuple:
    config = draw(
        st.dictionaries(
            st.one_of(
                st.sampled_from(
                    [
                        keys.SERVER_ROUND,
                        keys.SIGNATURE,
                        keys.WIRE_DTYPE,
                        keys.PROXIMAL_MU,
                        keys.EVALUATE_RECEIVED,
                        keys.CROSS_EVAL_TASK,
                        keys.CROSS_EVAL_MODEL,
                        keys.PLAN,
                    ]
                ),
                nasty_text.filter(bool),
            ),
            st.one_of(config_value, st.sampled_from([signature, "identify", "evaluate", "float32", 1, 0.0])),
            max_size=6,
        )
    )
    arrays = draw(
        st.one_of(st.none(), st.dictionaries(st.sampled_from(["w", "b", "../x", "\n"]), array_values, max_size=2))
    )
    lie = draw(st.one_of(st.none(), st.sampled_from(["shape", "dtype", "stype", "bytes"])))
    message_id = draw(
        st.one_of(
            st.sampled_from(["../victim", "../../outside.txt", "/tmp/x", "", "a" * 64]),
            st.text(alphabet=string.hexdigits.lower(), min_size=64, max_size=64),
        )
    )
    group_id = draw(st.one_of(st.sampled_from(["1", "", "\u00b2", "99999999999999", "1\n"]), nasty_text))
    return draw(st.sampled_from(MESSAGE_TYPES)), config, arrays, lie, message_id, group_id


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _tree(root: Path, skip: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and skip not in p.parents}


@pytest.fixture(scope="module")
def fuzzed_site(tmp_path_factory, tiny_federation):
    """One real site (its own data, site.yaml and state folder) that every example sends messages to."""
    from client import client_app
    from client.site import Site
    from tests.helpers.local_grid import LocalGrid
    from tests.helpers.site_harness import one_site

    root = tmp_path_factory.mktemp("fuzzed-site")
    cfg = one_site(root, tiny_federation["site-1"])
    context = LocalGrid(cfg, client_app.app).context(1)
    site = Site.resolve(context)
    (root / "outside.txt").write_text("1.0")
    (site.state.root / "victim").write_text("1.0")
    return root, context, site.state.root, site.signature


def test_fuzz_hostile_messages_stay_outside_the_site(fuzzed_site, tiny_federation):
    from client import client_app
    from client.reasons import is_fixed
    from common.wire import ERROR_SEPARATOR
    from tests.helpers.envelopes import incoming

    root, context, state, signature = fuzzed_site
    data = Path(tiny_federation["site-1"])
    lines = _Lines()
    logging.getLogger("fedseg").addHandler(lines)

    @settings(settings.get_profile(PROFILE))
    @given(message=hostile_message(signature))
    def one(message) -> None:
        message_type, config, arrays, lie, message_id, group_id = message
        before = _tree(root, state) | _tree(data, state)
        records = RecordDict({keys.CONFIG: ConfigRecord(config)})
        if arrays is not None:
            records[keys.ARRAYS] = ArrayRecord(
                {k: _lying_array(lie, v) if lie else Array(v) for k, v in arrays.items()}
            )
        msg = incoming(records, message_type, node_id=1)
        msg.metadata.__dict__["_message_id"] = message_id
        msg.metadata.__dict__["_group_id"] = group_id
        reply = client_app.app(msg, context)
        if reply.has_error():
            assert reply.error.reason is not None
            assert is_fixed(reply.error.reason.split(ERROR_SEPARATOR, 1)[1]), reply.error.reason
        assert (_tree(root, state) | _tree(data, state)) == before
        assert (state / "victim").read_text() == "1.0"
        assert not any(CONTROL.search(m) for m in lines.messages), [m for m in lines.messages if CONTROL.search(m)]

    try:
        one()
    finally:
        logging.getLogger("fedseg").removeHandler(lines)

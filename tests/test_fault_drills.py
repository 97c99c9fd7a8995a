"""Fault drills with real processes: a site killed mid-round, the server killed and restarted; a dropped link,
a site past the deadline and a full disk.

One federation of two sites with a hospital's default cohort floor (so neither
sends a validation score), quorum one, four rounds (a round's evaluation
rides with the next round's training, so round r's summary line is written
once round r + 1 has trained; the last round evaluates on its own):
- round 1 runs normally;
- in round 2, site-2's daemon and everything under it is frozen as round 1
  closes and SIGKILLed, so it never answers: the round completes on site-1 alone at its deadline
  (``CRASH_TIMEOUT_S``), and site-2's failure is logged;
- round 3 trains on site-1 alone, which closes round 2; site-1 is then frozen
  (SIGSTOP) so that round 3's evaluation waits for it;
- the whole server is SIGKILLed in round 3 and site-2 restarted while the
  centre is down, its local norm tensors still the ones on disk; the server,
  started with an edited configuration, is refused; started again with its
  own, it resumes at round 3 from the round-2 checkpoint, and the metrics log
  ends with every round and every reply exactly once. site-1 is thawed once
  a resumed round has reached site-2, so site-2 surely trains again: round 3
  when site-2 has reconnected before the resumed run starts it, else round 4
  (the restarted SuperLink may still count the frozen site-1 as connected
  and give round 3 to it alone, which then closes at its deadline without it).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from common.processes import descendants
from common.runs import CHECKPOINT_DIR, ROUND_CHECKPOINT
from server.certs import init_pki
from simulations.synthetic import generate_federation
from tests.helpers.deploy_harness import (
    GATEWAY_HOST,
    Launched,
    TcpProxy,
    allow,
    events,
    federation_yaml,
    make_site,
    site_norm_files,
    snapshot_app,
    wait_for,
    write_yaml,
)

pytestmark = pytest.mark.processes

SITES = ["site-1", "site-2"]
ROUNDS = 4
RUN = "drill"
DRILL_POLL_S = 3.0
CRASH_TIMEOUT_S = 30.0
"""The crash drill's round deadline, before Flower's heartbeat expiry (2 x 30 s) could end a round: a silent
site is named by the deadline (server/screening.py), and every second a federation waits costs the suite CPU."""


def _signal_tree(launched: Launched, sig: signal.Signals) -> None:
    for pid in [launched.proc.pid, *descendants(launched.proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _has(run, **match) -> bool:
    return any(all(e.get(k) == v for k, v in match.items()) for e in events(run))


def test_site_and_server_crashes_lose_nothing(tmp_path):
    # eight cases: six train, two validate, enough for a hospital's default floor of five to train but not to score
    data = generate_federation(tmp_path / "data", n_sites=2, n_cases=8, shape=(32, 32, 24), strength=1.0, seed=0)
    app, digest = snapshot_app(tmp_path / "app")
    fed = federation_yaml(
        tmp_path, app, SITES, rounds=ROUNDS, min_sites=1, run_name=RUN, round_timeout_s=CRASH_TIMEOUT_S
    )
    init_pki(tmp_path / "certs", [], [GATEWAY_HOST])
    site_yaml = {n: make_site(tmp_path, n, data[n], fed, [digest], min_cohort=None) for n in SITES}
    for name, path in site_yaml.items():
        allow(fed, name, path)
    run = tmp_path / "runs" / RUN

    def norm() -> Path:
        """site-2's latest norm tensors of this run (one file per round it trained: client/site_state.py)."""
        return site_norm_files(tmp_path / "sites" / "site-2", run)[-1]

    server = Launched(tmp_path / "server-1.out", "fedseg-server", "start", "--config", str(fed))
    daemons = {
        n: Launched(tmp_path / f"{n}-1.out", "fedseg-client", "start", "--config", str(p)) for n, p in site_yaml.items()
    }
    everything = [server, *daemons.values()]
    try:
        # --- a site dies in round 2, before it can answer ----------------------------------------------
        # site-2 is frozen (SIGSTOP) within a few milliseconds of round 1's close and then killed: a round takes
        # about two seconds, so waiting for its round-2 message could find site-2 already done with it.
        wait_for(lambda: _has(run, event="train", round=1, site="site-2"), 600, "round 1", *everything, poll_s=0.02)
        _signal_tree(daemons["site-2"], signal.SIGSTOP)
        saved_after_round_1 = hashlib.sha256(norm().read_bytes()).hexdigest()
        daemons["site-2"].kill_tree()  # frozen before it could reply: it never answers round 2
        summary = wait_for(
            lambda: [e for e in events(run) if e["event"] == "round" and e["round"] == 2],
            300,
            "round 2 to complete on quorum and round 3 to train",
            server,
        )
        # Round 3's evaluation goes to site-1 at once and takes about two seconds: site-1 is frozen (SIGSTOP) so
        # the server is still in round 3 when it is killed below, however fast rounds have become.
        _signal_tree(daemons["site-1"], signal.SIGSTOP)
        assert summary[0]["sites_failed"] == ["site-2"] and summary[0]["aggregated"]
        assert _has(run, event="failure", round=2, site="site-2")
        assert _has(run, event="train", round=2, site="site-1")
        tensors = load_file(norm())  # whole and loadable: written atomically, never torn by the kill
        at_restart = hashlib.sha256(norm().read_bytes()).hexdigest()
        weights = [v for k, v in tensors.items() if k.endswith("weight")]
        assert weights and not all(torch.equal(w, torch.ones_like(w)) for w in weights), (
            "site-2's norm tensors are back at the initialisation"
        )

        # --- the server dies after round 2, in round 3; site-2 restarts while the centre is down --------------
        server.kill_tree()
        assert not _has(run, event="round", round=3)
        daemons["site-2"] = Launched(
            tmp_path / "site-2-2.out", "fedseg-client", "start", "--config", str(site_yaml["site-2"])
        )
        everything = [server, *daemons.values()]
        edited = yaml.safe_load(fed.read_text())  # a restart with more rounds asked for: refused, nothing started
        edited["federation"]["rounds"] = ROUNDS + 2
        edited = write_yaml(tmp_path / "federation-edited.yaml", edited)
        refused = Launched(tmp_path / "server-edited.out", "fedseg-server", "start", "--config", str(edited))
        everything.append(refused)
        wait_for(lambda: refused.proc.poll() is not None, 120, "the edited configuration to be refused", refused)
        assert refused.proc.returncode == 2, refused.output()  # a user error
        assert f"federation.rounds: {ROUNDS} in the run, {ROUNDS + 2} now" in refused.output(), refused.output()
        wait_for(lambda: "SuperNode started" in daemons["site-2"].output(), 120, "site-2 to restart", daemons["site-2"])
        assert hashlib.sha256(norm().read_bytes()).hexdigest() == at_restart, "restarting rewrote the norm tensors"
        site_2_log = tmp_path / "sites" / "site-2" / "supernode.log"
        received_before = site_2_log.read_text().count("Receiving: train message")  # what the killed server sent
        server = Launched(tmp_path / "server-2.out", "fedseg-server", "start", "--config", str(fed))
        everything = [server, *daemons.values()]
        # site-1 stays frozen until a resumed round has reached site-2, so that site-2 trains whatever the
        # order in which the sites reconnect: it proves site-2 trains on with its restored norm tensors.
        wait_for(
            lambda: site_2_log.read_text().count("Receiving: train message") > received_before,
            600,
            "a resumed round to reach site-2",
            *everything,
        )
        _signal_tree(daemons["site-1"], signal.SIGCONT)
        wait_for(lambda: server.proc.poll() is not None, 900, "the resumed run to finish", *everything)
        assert server.proc.returncode == 0, server.output()[-3000:]
        assert "resuming after round 2" in server.output()
    finally:
        for proc in everything:
            proc.terminate()

    log = events(run)
    assert Counter(e["round"] for e in log if e["event"] == "round") == dict.fromkeys(range(1, ROUNDS + 1), 1)
    trained = Counter((e["round"], e["site"]) for e in log if e["event"] == "train")
    assert max(trained.values()) == 1, trained  # no reply counted twice
    assert {k for k in trained if k[0] < 3} == {(1, "site-1"), (1, "site-2"), (2, "site-1")}
    # site-2 trains in a resumed round; site-1 too once thawed
    assert {k for k in trained if k[0] >= 3 and k[1] == "site-2"}, trained
    starts = [e for e in log if e["event"] == "run-start"]
    assert [s["resumed_from_round"] for s in starts] == [0, 2]
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed"
    assert log[-1]["rounds_completed"] == ROUNDS
    assert site_norm_files(tmp_path / "sites" / "site-2", run)[-1].name >= "round-0003.safetensors", (
        "site-2 kept no norm tensors of a resumed round"
    )
    assert hashlib.sha256(norm().read_bytes()).hexdigest() not in (saved_after_round_1, at_restart), (
        "site-2 did not train again after rejoining"
    )


# --- a dropped link, a site past the deadline, a full disk --------------------------------------------
#
# A second federation of two sites, quorum one, six rounds, no cross-site
# evaluation; site-2 reaches the gateway through a TCP proxy the test controls:
# - round 1 (or the next, if site-2 was done with round 1 before the drill saw
#   it): while site-2 works on its training message, its link is cut
#   (connections reset, new ones refused) for a few seconds and until site-2 has
#   met the cut, then restored;
# - the next round to reach site-2 (usually 2): its ClientApp is frozen
#   (SIGSTOP) within milliseconds of starting, past federation.round_timeout_s:
#   the training step closes at its deadline without it; its reply, when it
#   comes, is logged as late and never used. Rounds take about a second, so
#   the drills pick the round by the process they catch, not the other way round;
# - a later round: site-2's disk fills up while it works (RLIMIT_FSIZE 0 on its
#   ClientApp processes: every write to a file fails, as on a full disk; no
#   root needed): it answers with the fixed reason and its norm tensors stay whole;
# - the round after: the disk has room again and site-2 trains.
# Every round and every (round, site) line is in the metrics log exactly once.
# The drills wait on a round's checkpoint (its aggregate), not its summary line:
# that one is written only when the next round has trained.

DRILL_RUN = "drills"
DRILL_ROUNDS = 6
TIMEOUT_S = 30.0
CUT_S = 4.0


def _clientapps(state: Path) -> set[int]:
    """The site's running ClientApp processes: the children of its warm parent."""
    warm = json.loads((state / "daemon.json").read_text()).get("warm_pid")
    return set(descendants(warm)) if warm else set()


def _started_at(pid: int) -> float:
    """The process's start as a Unix time (to the kernel's clock tick), from /proc."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _clientapp_since(state: Path, since: float, *logs: Launched) -> int:
    """A site-2 ClientApp started after ``since``, whether it is already running or yet to come.

    Judged by start time, not by being new to the test: the server's next message may reach
    site-2 before the test sees the moment it waits for, and its ClientApp then already runs.
    """

    def started() -> int | None:
        for pid in _clientapps(state):
            try:
                if _started_at(pid) >= since:
                    return pid
            except (OSError, ValueError, IndexError):
                pass  # it has just exited
        return None

    pid = wait_for(started, 120, "a ClientApp process at site-2", *logs, poll_s=0.05)
    assert isinstance(pid, int)
    return pid


def _has_open(pid: int, name: str) -> bool:
    try:
        return any(os.readlink(fd).endswith(name) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _lines(run: Path, event: str, **match) -> list[dict]:
    return [e for e in events(run) if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def _aggregated(run: Path, rnd: int) -> bool:
    return (run / CHECKPOINT_DIR / ROUND_CHECKPOINT.format(rnd)).is_file()


def _open_round(run: Path) -> int:
    """The round in progress: the one after the last aggregated (its checkpoint is written before the next
    round's messages go out)."""
    done = [r for r in range(1, DRILL_ROUNDS + 1) if _aggregated(run, r)]
    return max(done, default=0) + 1


@pytest.fixture(scope="module")
def drills(tmp_path_factory):
    root = tmp_path_factory.mktemp("drills")
    data = generate_federation(root / "data", n_sites=2, n_cases=4, shape=(32, 32, 24), strength=1.0, seed=0)
    app, digest = snapshot_app(root / "app")
    # Flower's 3 s polling at both ends: a round then lasts seconds, as the drills' waits assume, not the
    # fraction of a second that packed messages and fast polling give (the drills test faults, not speed).
    fed = federation_yaml(
        root,
        app,
        SITES,
        rounds=DRILL_ROUNDS,
        min_sites=1,
        run_name=DRILL_RUN,
        train={"local_steps": 10},
        round_timeout_s=TIMEOUT_S,
        cross_eval=False,
        poll_interval_s=DRILL_POLL_S,
    )
    init_pki(root / "certs", [], [GATEWAY_HOST])
    gateway = yaml.safe_load(fed.read_text())["server"]["fleet_port"]
    proxy = TcpProxy(GATEWAY_HOST, (GATEWAY_HOST, gateway))
    site_yaml = {
        "site-1": make_site(root, "site-1", data["site-1"], fed, [digest], poll_interval_s=DRILL_POLL_S),
        "site-2": make_site(
            root,
            "site-2",
            data["site-2"],
            fed,
            [digest],
            poll_interval_s=DRILL_POLL_S,
            server_address=f"{GATEWAY_HOST}:{proxy.port}",
        ),
    }
    for name, path in site_yaml.items():
        allow(fed, name, path)
    server = Launched(root / "server.out", "fedseg-server", "start", "--config", str(fed))
    daemons = [Launched(root / f"{n}.out", "fedseg-client", "start", "--config", str(p)) for n, p in site_yaml.items()]
    ctx = {
        "run": root / "runs" / DRILL_RUN,
        "state": root / "sites" / "site-2",
        "proxy": proxy,
        "server": server,
        "site-2": daemons[1],
        "all": [server, *daemons],
    }
    try:  # the plan is made (both fingerprints in): round 1 is next
        wait_for(lambda: len(_lines(ctx["run"], "timeline", round=0)) == 2, 600, "the plan", *ctx["all"])
        yield ctx
    finally:
        for proc in ctx["all"]:
            proc.terminate()
        proxy.close()


def test_a_cut_link_mid_round_loses_nothing(drills):
    run, supernode_log = drills["run"], drills["state"] / "supernode.log"

    def cut_noticed() -> bool:
        return (
            "Connection attempt failed" in supernode_log.read_text() or "SuperNode exited" in drills["site-2"].output()
        )

    (plan,) = _lines(run, "timeline", round=0, site="site-2")
    _clientapp_since(drills["state"], plan["created"] + plan["reply_pulled"], *drills["all"])  # round 1's, or later
    cut_round = _open_round(run)
    drills["proxy"].cut()
    time.sleep(CUT_S)
    # The link stays down until site-2 has tried to use it (its reply, a heartbeat): a site still training when
    # the link comes back would not notice the cut at all.
    wait_for(cut_noticed, 120, "site-2 to meet the cut link", *drills["all"])
    drills["proxy"].restore()
    wait_for(lambda: _aggregated(run, cut_round), 300, "the cut round to complete", *drills["all"])
    assert _lines(run, "train", round=cut_round, site="site-1")


def test_a_site_past_the_deadline_is_left_out_on_time_and_its_late_reply_never_used(drills):
    state, run = drills["state"], drills["run"]
    # The first site-2 ClientApp to start from now on, caught within milliseconds: a round now takes about a
    # second, so waiting for a given round's message could see it only once it is done.
    frozen = _clientapp_since(state, time.time(), *drills["all"])
    os.kill(frozen, signal.SIGSTOP)
    drills["slow_round"] = slow_round = _open_round(run)
    assert slow_round < DRILL_ROUNDS - 1, "no round is left for the full-disk drill and its recovery"
    try:  # the training step closes at its deadline with site-1's reply alone
        closed = wait_for(
            lambda: _lines(run, "train", round=slow_round),
            TIMEOUT_S + 120,
            "the training step to close without site-2",
            *drills["all"],
        )
    finally:
        os.kill(frozen, signal.SIGCONT)
    (sent, *_) = _lines(run, "timeline", round=slow_round, stage="train")
    assert [e["site"] for e in closed] == ["site-1"]
    assert TIMEOUT_S <= closed[0]["time"] - sent["created"] < TIMEOUT_S + 15, "the deadline was not kept"
    wait_for(lambda: _aggregated(run, slow_round), TIMEOUT_S + 120, "the slow round to close", *drills["all"])
    late = wait_for(
        lambda: _lines(run, "late-reply", site="site-2", for_round=slow_round, stage="train"),
        TIMEOUT_S * 3 + 60,
        "site-2's late reply to be logged",
        *drills["all"],
    )
    assert late[0]["late_by_s"] >= TIMEOUT_S
    assert not _lines(run, "train", round=slow_round, site="site-2")
    (missed,) = _lines(run, "failure", round=slow_round, site="site-2", stage="train")  # named, not just absent
    assert missed["reason"].startswith(f"no reply within federation.round_timeout_s ({TIMEOUT_S:g} s)"), missed


def test_a_full_disk_is_answered_with_a_fixed_reason_and_keeps_the_norm_tensors(drills):
    """Every site-2 ClientApp that reaches fedseg's code (it opened its site.log) gets a full disk,
    until one fails its training; the next process has its disk back."""
    state, run = drills["state"], drills["run"]
    full, saved = set(), None
    deadline = time.monotonic() + 300
    while not (
        failures := [
            e for e in _lines(run, "failure", site="site-2", stage="train") if e["round"] > drills["slow_round"]
        ]
    ):
        assert time.monotonic() < deadline, "site-2 never failed its training on its full disk"
        for pid in _clientapps(state) - full:
            if _has_open(pid, "site.log"):
                saved = {p: p.read_bytes() for p in site_norm_files(state, run)} if saved is None else saved
                try:
                    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
                except ProcessLookupError:
                    pass
                full.add(pid)
        time.sleep(0.01)
    assert (
        failures[0]["reason"] == "site site-2: the site's disk is full: its state folder cannot be written; "
        "free space at the site"
    )
    kept = site_norm_files(state, run)
    assert {p: p.read_bytes() for p in kept} == saved and load_file(kept[-1]), "the full disk tore the norm tensors"
    assert not [*state.glob("*.tmp"), *state.glob("runs/*/norm/*.tmp"), *state.glob("cache/*/*.tmp")], (
        "the failed write left a temporary file"
    )
    drills["full_round"] = full_round = failures[0]["round"]
    assert full_round < DRILL_ROUNDS, "the disk filled up in the last round: no round is left to recover in"
    wait_for(
        lambda: _lines(run, "train", round=full_round + 1, site="site-2"),
        300,
        "site-2 to train again in the next round",
        *drills["all"],
    )
    assert site_norm_files(state, run)[-1] not in saved, "site-2 kept no norm tensors of the round after"


def test_every_round_and_reply_is_logged_exactly_once(drills):
    server = drills["server"]
    wait_for(lambda: server.proc.poll() is not None, 300, "the drill run to finish", *drills["all"])
    assert server.proc.returncode == 0, server.output()[-3000:]
    log = events(drills["run"])
    assert Counter(e["round"] for e in log if e["event"] == "round") == {r: 1 for r in range(1, DRILL_ROUNDS + 1)}
    for stage in ("train", "evaluate", "timeline"):
        lines = Counter((e["round"], e["site"], e.get("stage")) for e in log if e["event"] == stage)
        assert max(lines.values()) == 1, (stage, lines)
    trained = {(e["round"], e["site"]) for e in log if e["event"] == "train"}
    assert {(r, "site-1") for r in range(1, DRILL_ROUNDS + 1)} <= trained
    slow_round, full_round = drills["slow_round"], drills["full_round"]
    assert (full_round + 1, "site-2") in trained and not {(slow_round, "site-2"), (full_round, "site-2")} & trained
    slow = [e for e in log if e["event"] == "round" and e["round"] == slow_round]
    assert slow[0]["sites_ok"] == 1 and slow[0]["sites_failed"] == ["site-2"] and slow[0]["aggregated"]
    assert log[-1]["event"] == "run-end" and log[-1]["status"] == "completed"

"""Supervision without Docker: busy versus stuck (on a driven clock, and against a real stand-in
process saturated at max_batch_size 2), restart's crash-loop limit, and the one meaning of rollback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_standin import Server, checkpoint, stream  # noqa: F401  (checkpoint: a fixture)
from trtllm_deploy.errors import CheckFailed
from trtllm_deploy.serving import launch, state, supervise
from trtllm_deploy.serving.state import Deployment
from trtllm_deploy.serving.supervise import CrashLoop, Failure, Seen

ROOT = Path(__file__).resolve().parents[1]


class DrivenClock(supervise.Clock):
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def run_observe(seen_at, *, hang_s=8.0, duration=60.0, trouble=lambda: None, **more):
    """observe() on a driven clock; ``seen_at(t)`` says what the runtime shows t s after the start."""
    clock = DrivenClock()
    start = clock.t
    failure = supervise.observe(trouble, lambda: seen_at(clock.t - start), lambda what: f"explained: {what}",
                                interval=1.0, hang_s=hang_s, duration=duration, clock=clock, **more)
    return failure, clock.t - start


def test_a_saturated_server_that_iterates_is_busy_not_stuck_for_60_s():
    # The probe queues behind full batches for the whole minute; the runtime iterates every ~2 s.
    failure, ran = run_observe(lambda t: Seen(iterations=int(t // 2), tokens=0, waiting=t))
    assert failure is None and ran >= 60


def test_no_iteration_and_no_token_while_the_probe_waits_is_a_hang_within_hang_s():
    # Iterating for 10 s, then stuck: every rank alive, the probe waiting, the counter frozen.
    failure, ran = run_observe(lambda t: Seen(iterations=int(min(t, 10)), tokens=0, waiting=t))
    assert failure is not None and failure.kind == "hang"
    assert 10 + 8 < ran <= 10 + 8 + 2, ran
    assert "every rank and mpirun are alive" in failure.what and failure.explanation.startswith("explained")


@pytest.mark.parametrize("seen_at, hang", [
    # No iteration stats at all (the runtime reports none): the probe's answers are the progress.
    pytest.param(lambda t: Seen(None, int(t), waiting=0.2), False, id="no-metrics-probe-answers"),
    pytest.param(lambda t: Seen(None, 3, waiting=max(0.0, t - 5)), True, id="no-metrics-probe-starves"),
    # Nothing in flight (the probe between requests) is never a hang, even with a frozen counter.
    pytest.param(lambda t: Seen(7, 3, waiting=0.0), False, id="idle"),
])
def test_the_probe_is_the_last_resort(seen_at, hang):
    failure, _ = run_observe(seen_at, duration=40)
    assert (failure is not None and failure.kind == "hang") == hang, failure


def test_a_dead_rank_is_found_at_the_first_look_whatever_the_progress():
    failure, ran = run_observe(lambda t: Seen(int(t), 0, 0.0), trouble=lambda: "rank-1 on spark-2 died")
    assert failure.kind == "dead" and failure.looks == 1 and ran == 0


def test_good_comes_only_after_good_after_s_of_healthy_watching():
    called: list[float] = []
    clock_box = {}

    def seen(t):
        clock_box["t"] = t
        return Seen(int(t), 0, 0.0)

    failure, _ = run_observe(seen, duration=30, good_after_s=20,
                             on_good=lambda: called.append(clock_box["t"]))
    assert failure is None and len(called) == 1 and 20 <= called[0] <= 21
    called.clear()
    failure, _ = run_observe(lambda t: Seen(int(min(t, 5)), 0, t), duration=60, good_after_s=20,
                             on_good=lambda: called.append(1))
    assert failure.kind == "hang" and called == []   # it hung before it had served long enough


# --- against a real stand-in process ----------------------------------------------------------

def start_slow(checkpoint_dir, env=None) -> Server:
    server = Server(["trtllm-serve", str(checkpoint_dir), "--max_batch_size", "2"],
                    env={"STANDIN_TOKENS_PER_S": "2", **(env or {})})
    return server.wait_ready()


def long_streams(port: int, count: int, tokens: int) -> list[threading.Thread]:
    asks = [{"model": "m", "prompt": f"long {i}", "max_tokens": tokens} for i in range(count)]
    threads = [threading.Thread(target=stream, args=(port, "/v1/completions", ask),
                                kwargs={"timeout": 120}, daemon=True) for ask in asks]
    for thread in threads:
        thread.start()
    return threads


def test_the_standin_serves_iteration_stats_since_the_last_call(checkpoint):  # noqa: F811
    server = start_slow(checkpoint, {"STANDIN_TOKENS_PER_S": "50"})
    try:
        long_streams(server.port, 1, 5)[0].join(timeout=30)
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            stats = json.load(answer)
        assert [s["iter"] for s in stats] == [1, 2, 3, 4, 5]
        assert {"timestamp", "iterLatencyMS", "numActiveRequests", "numQueuedRequests"} <= set(stats[0])
        assert stats[0]["maxNumActiveRequests"] == 2
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert json.load(answer) == []   # taken: the next call has only what came since
    finally:
        server.stop()


def watched(server, hang_s: float, duration: float, serving=None):
    """``supervise.observe`` on a stand-in for ``duration`` s through a real Probe (``serving``: the
    runtime, default trtllm-serve): the failure, the probe, and how long its request had waited at
    each look."""
    probe = supervise.Probe(f"http://127.0.0.1:{server.port}", serving)
    waited = []

    def seen():
        found = probe.seen()
        waited.append(found.waiting)
        return found

    alive = lambda: None if server.process.poll() is None else "the stand-in exited"  # noqa: E731
    try:
        failure = supervise.observe(alive, seen, lambda what: what, interval=1.0, hang_s=hang_s,
                                    duration=duration)
    finally:
        probe.close()
    return failure, probe, waited


def test_a_saturated_standin_at_max_batch_size_2_is_watched_60_s_without_a_hang(checkpoint):  # noqa: F811
    """A real 60 s run: two streams of 200 tokens at 2 tokens/s fill both batch slots for the whole
    minute, so the probe's 1-token request waits behind them far longer than hang_s."""
    server = start_slow(checkpoint)
    try:
        long_streams(server.port, 2, 200)
        failure, probe, waited = watched(server, hang_s=4.0, duration=60)
        assert failure is None, failure
        assert max(waited) > 30 and probe.tokens == 0   # the probe really queued, unanswered, all along
    finally:
        server.stop()


def test_a_hung_standin_is_found_within_hang_s_plus_2_s(checkpoint):  # noqa: F811
    server = start_slow(checkpoint, {"STANDIN_TOKENS_PER_S": "20", "STANDIN_FAULT": "hang:3"})
    probe = None
    try:
        long_streams(server.port, 1, 50)
        server.wait_for_line("STANDIN_FAULT hang:3")
        hung_at = time.monotonic()
        probe = supervise.Probe(f"http://127.0.0.1:{server.port}")
        alive = lambda: None if server.process.poll() is None else "the stand-in exited"  # noqa: E731
        failure = supervise.observe(alive, probe.seen, lambda what: what, interval=1.0, hang_s=4.0,
                                    duration=30)
        assert failure is not None and failure.kind == "hang", failure
        assert time.monotonic() - hung_at <= 4.0 + 2.0
    finally:
        if probe:
            probe.close()
        server.stop()


# --- restart's limit and the one meaning of rollback -----------------------------------------

def test_restart_backs_off_and_calls_three_failures_in_ten_minutes_a_crash_loop():
    loop = CrashLoop(limit=3, window_s=600, backoff_s=5)
    assert [loop.failed(0), loop.failed(60), loop.failed(120)] == [5, 10, None]
    assert "3 failures within 10 min" in loop.reason()


def test_failures_spread_wider_than_the_window_are_not_a_crash_loop():
    loop = CrashLoop(limit=3, window_s=600, backoff_s=5)
    assert [loop.failed(t) for t in (0, 400, 800, 1200, 1600)] == [5, 10, 10, 10, 10]


@dataclass
class Recorded:
    """What handling did, in order; a launch fails while ``launch_fails`` is above 0."""

    calls: list = field(default_factory=list)
    launch_fails: int = 0
    rollback_fails: bool = False

    def actions(self) -> supervise.Actions:
        def stop(cluster, job):
            self.calls.append(("stop", job))

        def start(cluster, deployment, tmp, **kw):
            self.calls.append(("launch", deployment.job))
            if self.launch_fails:
                self.launch_fails -= 1
                raise CheckFailed("rank-0 on spark-1 died before serving was ready")
            return launch.Launched(deployment)

        def roll_back(cluster, failing, tmp, **kw):
            self.calls.append(("roll_back", failing.job))
            if self.rollback_fails:
                raise CheckFailed("nothing to roll back to from serve: no good deployment differs")
            return launch.Launched(failing)

        return supervise.Actions(stop=stop, launch=start, roll_back=roll_back)


FAILING = Deployment(job="serve", runtime="trtllm", image="trt:1", artifact="model-a", tp=2)
DIED = Failure("dead", "rank-1 on spark-2 died", 1, "rank-1 on spark-2 died\n  spark-2/rank-1.log:\n    boom")


def test_restart_relaunches_after_its_back_off():
    done, clock = Recorded(), DrivenClock()
    handled = supervise.handle(None, FAILING, DIED, "restart", "/tmp", loop=CrashLoop(backoff_s=5),
                               clock=clock, actions=done.actions())
    assert handled.relaunched is not None and done.calls == [("stop", "serve"), ("launch", "serve")]
    assert clock.slept == [5]


def test_a_crash_loop_gives_up_restarting_and_rolls_back_with_the_reason_and_the_ranks_lines():
    done, clock, lines = Recorded(launch_fails=5), DrivenClock(), []
    handled = supervise.handle(None, FAILING, DIED, "restart", "/tmp", report=lines.append,
                               loop=CrashLoop(limit=3, window_s=600, backoff_s=5), clock=clock,
                               actions=done.actions())
    # The watch's failure and two failed starts make three within the window: then rollback.
    assert done.calls == [("stop", "serve"), ("launch", "serve"), ("launch", "serve"), ("roll_back", "serve")]
    assert clock.slept == [5, 10]
    assert handled.failure.kind == "crash loop" and "3 failures within 10 min" in handled.failure.what
    assert handled.relaunched is not None and "rollback" in handled.policy
    told = "\n".join(lines)
    assert "crash loop" in told and "spark-2/rank-1.log" in told and "boom" in told


def test_a_rollback_with_nowhere_to_go_stops_and_says_why():
    done = Recorded(rollback_fails=True)
    handled = supervise.handle(None, FAILING, DIED, "rollback", "/tmp", actions=done.actions())
    assert handled.relaunched is None and "nothing to roll back to" in handled.gave_up
    assert done.calls == [("stop", "serve"), ("roll_back", "serve")]


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return SimpleNamespace(name="bench")


def test_passing_the_gate_is_not_good_and_rollback_takes_the_newest_good_that_differs(cluster):
    older = Deployment(job="serve", runtime="trtllm", image="trt:0", artifact="model-a", tp=2)
    state.record(cluster, current=FAILING)   # gated, current, never watched long enough
    assert state.good(cluster) == [] and state.rollback_target(cluster, FAILING) is None
    state.promote(cluster, older)
    state.promote(cluster, FAILING)
    assert state.last_good(cluster) == FAILING
    # The failing deployment itself was good once; rollback skips it for the one that differs.
    assert state.rollback_target(cluster, FAILING) == older
    assert state.rollback_target(cluster, older) == FAILING
    # The same deployment promoted again moves up instead of being listed twice.
    state.promote(cluster, older)
    assert state.good(cluster) == [older, FAILING]
    # Another job name or port is the same deployment again; another environment is not.
    renamed = Deployment(job="serve2", runtime="trtllm", image="trt:0", artifact="model-a", tp=2, port=9000)
    assert state.rollback_target(cluster, renamed) == FAILING
    assert not state.differs(renamed, older) and state.differs(renamed, FAILING)
    assert state.differs(older, Deployment(**{**older.as_json(), "env": (("STANDIN_FAULT", "oom"),)}))


def test_roll_back_with_no_good_deployment_and_no_fallback_image_stops_saying_why(cluster):
    with pytest.raises(CheckFailed) as caught:
        launch.roll_back(cluster, FAILING, "/tmp", lockfile=None)
    assert "nothing to roll back to" in str(caught.value) and "[vllm] image" in str(caught.value)
    vllm = Deployment(job="serve-vllm", runtime="vllm", image="vllm:1", artifact="model-a", tp=2)
    with pytest.raises(CheckFailed, match="already runs vLLM"):
        launch.roll_back(cluster, vllm, "/tmp", image="vllm:2")


@pytest.mark.parametrize("args, message", [
    pytest.param(["--restarts", "0"], "--restarts must be at least 1", id="restarts"),
    pytest.param(["--on-failure", "again"], "expected one of stop, restart, rollback", id="policy"),
])
def test_bad_supervise_flags_are_refused_with_exit_2(args, message):
    done = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "supervise", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr

"""The pipeline runtime on real executor threads, with small numpy stages standing in for ORT.

The executors here are the real ``Executor`` machinery (queue, thread, futures, observers);
only the stage computation is a numpy function, so faults can be injected on purpose.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from handlers.executors import Executor, ExecutorError
from handlers.perf_model import PerfHistory
from handlers.pipeline import Runtime, StagePlan, StageTimeout
from handlers.plan import choose_layout
from handlers.runtime_config import ConfigError, RuntimeConfig
from handlers.service import _slice_outcomes, failure_error


class FnExecutor(Executor):
    def __init__(self, name, fns, device="cpu", fail=None, delay=0.0, observer=None):
        super().__init__(name, observer)
        self.device = device
        self._fns = fns
        self._fail = fail  # stage -> exception to raise
        self._delay = delay
        self.ran: list[tuple[str, int]] = []
        self.threads: set[int] = set()

    def _load(self):
        return list(self._fns)

    def _run(self, stage, feeds):
        self.threads.add(threading.get_ident())
        time.sleep(self._delay)
        if self._fail and stage in self._fail:
            raise self._fail[stage]
        self.ran.append((stage, len(next(iter(feeds.values())))))
        return self._fns[stage](feeds)


HEAD = {"head": lambda f: {"h": f["x"] * 2.0}}
TAIL = {"tail": lambda f: {"y": f["h"] + 1.0}}
BOTH = {**HEAD, **TAIL}
PLAN_INPUTS = {"head": (("x",), ("h",)), "tail": (("h",), ("y",))}


def make_runtime(executors, head, tail, micro_batch=2, timeout=5.0):
    runtime_ref = []
    for ex in executors:
        ex._observer = lambda *a: runtime_ref[0].observe_run(*a)
        ex.start()
    plans = [
        StagePlan("head", ("x",), ("h",), tuple(head)),
        StagePlan("tail", ("h",), ("y",), tuple(tail)),
    ]
    runtime = Runtime(plans, executors, PerfHistory(), ["y"], micro_batch=micro_batch, stage_timeout_s=timeout)
    runtime_ref.append(runtime)
    return runtime


def x_batch(n):
    return {"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3)}


def test_micro_batches_flow_through_both_stages_and_come_back_in_order():
    a, b = FnExecutor("cpu0", BOTH), FnExecutor("cpu1", BOTH)
    runtime = make_runtime([a, b], ["cpu0", "cpu1"], ["cpu0", "cpu1"], micro_batch=2)
    try:
        feeds = x_batch(9)
        out = runtime.infer(feeds)
        np.testing.assert_array_equal(out["y"], feeds["x"] * 2 + 1)
        stats = runtime.drain_stats()
        assert stats.micro_batches == 5
        assert sum(n for (stage, _), n in stats.placements.items() if stage == "tail") == 5
        # both executors took work: the scheduler spreads micro-batches
        assert a.ran and b.ran
    finally:
        runtime.close()


def test_head_and_tail_overlap_on_different_groups():
    """Strict pipeline: while cpu1 runs tail i, cpu0 already runs head i+1."""
    events = []
    lock = threading.Lock()

    def timed(stage, fn):
        def run(f):
            with lock:
                events.append((stage, "start", time.perf_counter()))
            time.sleep(0.03)
            out = fn(f)
            with lock:
                events.append((stage, "end", time.perf_counter()))
            return out
        return run

    head = FnExecutor("cpu0", {"head": timed("head", HEAD["head"])})
    tail = FnExecutor("cpu1", {"tail": timed("tail", TAIL["tail"])})
    runtime = make_runtime([head, tail], ["cpu0"], ["cpu1"], micro_batch=1)
    try:
        started = time.perf_counter()
        out = runtime.infer(x_batch(4))
        elapsed = time.perf_counter() - started
        np.testing.assert_array_equal(out["y"], x_batch(4)["x"] * 2 + 1)
        # serial would be 8 x 30 ms; pipelined is about 5 x 30 ms
        assert elapsed < 0.22, elapsed
        starts = {(s, i): t for i, (s, k, t) in enumerate(events) if k == "start"}
        assert any(
            hs < te and hs > ts
            for (sh, _), hs in starts.items() if sh == "head"
            for (st, _), ts in starts.items() if st == "tail"
            for te in [ts + 0.03]
        ), "some head started while a tail was running"
    finally:
        runtime.close()


def test_a_failing_tail_executor_is_retried_on_another():
    bad = FnExecutor("cpu0", BOTH, fail={"tail": ExecutorError("stage 'tail' failed on cpu0")})
    good = FnExecutor("cpu1", BOTH)
    runtime = make_runtime([bad, good], ["cpu0"], ["cpu0", "cpu1"], micro_batch=1)
    try:
        out = runtime.infer(x_batch(4))
        np.testing.assert_array_equal(out["y"], x_batch(4)["x"] * 2 + 1)
        assert [s for s, _ in good.ran].count("tail") == 4
        assert bad.threads and bad._thread.is_alive(), "the failing executor keeps serving"
    finally:
        runtime.close()


def test_gpu_out_of_memory_falls_back_to_a_cpu_group():
    gpu = FnExecutor("cuda0s0", BOTH, device="cuda:0",
                     fail={"tail": ExecutorError("stage 'tail' on cuda0s0: CUDA out of memory")})
    gpu2 = FnExecutor("cuda0s1", BOTH, device="cuda:0",
                      fail={"tail": ExecutorError("stage 'tail' on cuda0s1: CUDA out of memory")})
    cpu = FnExecutor("cpu0", TAIL)
    runtime = make_runtime([gpu, gpu2, cpu], ["cuda0s0", "cuda0s1"], ["cuda0s0", "cuda0s1", "cpu0"], micro_batch=2)
    try:
        # Make the GPUs look fast so the scheduler picks them first.
        for name in ("cuda0s0", "cuda0s1"):
            runtime.history.observe_run("tail", name, 2, 1e-5)
        runtime.history.observe_run("tail", "cpu0", 2, 1.0)
        out = runtime.infer(x_batch(4))
        np.testing.assert_array_equal(out["y"], x_batch(4)["x"] * 2 + 1)
        assert [s for s, _ in cpu.ran] == ["tail", "tail"], "out-of-memory retries skip the other stream"
    finally:
        runtime.close()


def test_only_the_failed_micro_batch_fails_when_nothing_else_can_run_it():
    calls = {"n": 0}

    def flaky(f):
        calls["n"] += 1
        if calls["n"] % 3 == 2:  # the middle micro-batch of every run
            raise ExecutorError("stage 'tail' failed on cpu1")
        return TAIL["tail"](f)

    head = FnExecutor("cpu0", HEAD)
    tail = FnExecutor("cpu1", {"tail": flaky})
    runtime = make_runtime([head, tail], ["cpu0"], ["cpu1"], micro_batch=2)
    try:
        outcomes = runtime.run(x_batch(6))
        assert [(o.start, o.stop) for o in outcomes] == [(0, 2), (2, 4), (4, 6)]
        assert [o.error is None for o in outcomes] == [True, False, True]
        # The service gives the failure to exactly the requests whose rows it held.
        assert isinstance(_slice_outcomes(outcomes, 1, 3), ExecutorError)
        ok = _slice_outcomes(outcomes, 4, 6)
        np.testing.assert_array_equal(ok["y"], x_batch(6)["x"][4:6] * 2 + 1)
        assert failure_error(outcomes[1].error).status == 503
        with pytest.raises(ExecutorError):
            runtime.infer(x_batch(6))  # infer raises where run reports
    finally:
        runtime.close()


def test_a_hung_stage_misses_its_deadline_with_a_504():
    slow = FnExecutor("cpu0", BOTH, delay=0.5)
    runtime = make_runtime([slow], ["cpu0"], ["cpu0"], micro_batch=4, timeout=0.2)
    try:
        (outcome,) = runtime.run(x_batch(2))
        assert isinstance(outcome.error, StageTimeout)
        assert failure_error(outcome.error).status == 504
    finally:
        runtime.close()


def test_slices_span_several_micro_batches():
    from handlers.pipeline import MicroBatchOutcome

    rows = np.arange(10.0)[:, None]
    outcomes = [MicroBatchOutcome(0, 4, {"y": rows[0:4]}, None), MicroBatchOutcome(4, 10, {"y": rows[4:10]}, None)]
    np.testing.assert_array_equal(_slice_outcomes(outcomes, 2, 7)["y"], rows[2:7])


@pytest.mark.parametrize(("partitioned", "cuda", "config", "head", "tail"), [
    (True, ["g0", "g1"], {}, ["g0", "g1"], ["g0", "g1", "c0", "c1"]),
    (True, ["g0"], {"tail_devices": "cpu"}, ["g0"], ["c0", "c1"]),
    (True, ["g0"], {"tail_devices": "cuda"}, ["g0"], ["g0"]),
    (True, [], {}, ["c0"], ["c1"]),
    (True, ["g0"], {"head_devices": "cpu"}, ["c0"], ["g0", "c1"]),
    (False, ["g0"], {}, ["g0"], ["g0"]),
    (False, [], {}, ["c0"], ["c0"]),
])
def test_layout_puts_the_head_on_the_gpu_and_the_tail_where_allowed(partitioned, cuda, config, head, tail):
    layout = choose_layout(partitioned, cuda, ["c0"], ["c1"], RuntimeConfig(**config))
    assert list(layout.head) == head
    assert list(layout.tail) == tail


def test_layout_refuses_a_gpu_requirement_without_a_gpu():
    with pytest.raises(ConfigError, match="tail_devices"):
        choose_layout(True, [], ["c0"], ["c1"], RuntimeConfig(tail_devices="cuda"))

"""The pipeline runtime on real executor threads, with small numpy stages standing in for ORT.

The executors here are the real ``Executor`` machinery (queue, thread, futures, observers);
only the stage computation is a numpy function, so faults can be injected on purpose.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from handlers.errors import ExecutorOutOfMemory, http_error
from handlers.executors.base import CancelToken, Executor, ExecutorError
from handlers.runtime.assembly import choose_layout, gpu_pad_batch, warmup_sizes
from handlers.runtime.config import ConfigError, RuntimeConfig
from handlers.runtime.flow import Runtime, StagePlan, StageTimeout
from handlers.runtime.perf_model import PerfHistory
from handlers.runtime.quarantine import Quarantine
from handlers.service import _slice_outcomes
from handlers.testing.faults import FaultInjector, FaultSpec


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


def make_runtime(executors, head, tail, micro_batch=2, timeout=5.0, **options):
    for ex in executors:
        ex.start()
    plans = [
        StagePlan("head", ("x",), ("h",), tuple(head)),
        StagePlan("tail", ("h",), ("y",), tuple(tail)),
    ]
    runtime = Runtime(plans, executors, PerfHistory(), ["y"], micro_batch=micro_batch,
                      stage_timeout_s=timeout, **options).start()
    for ex in executors:
        ex.run_observer = runtime.observe_run
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
        out = runtime.infer(x_batch(4))
        np.testing.assert_array_equal(out["y"], x_batch(4)["x"] * 2 + 1)
        # Each executor runs its stage serially: the k-th start pairs with the k-th end.
        spans = {
            stage: list(zip([t for s, k, t in events if s == stage and k == "start"],
                            [t for s, k, t in events if s == stage and k == "end"], strict=True))
            for stage in ("head", "tail")
        }
        assert len(spans["head"]) == len(spans["tail"]) == 4
        assert any(
            hs < te and ts < he for hs, he in spans["head"] for ts, te in spans["tail"]
        ), "some head ran while a tail was running"
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
                     fail={"tail": ExecutorOutOfMemory("stage 'tail' on cuda0s0: CUDA out of memory")})
    gpu2 = FnExecutor("cuda0s1", BOTH, device="cuda:0",
                      fail={"tail": ExecutorOutOfMemory("stage 'tail' on cuda0s1: CUDA out of memory")})
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
        assert http_error(outcomes[1].error).status == 503
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
        assert http_error(outcome.error).status == 504
    finally:
        runtime.close()


def test_slices_span_several_micro_batches():
    from handlers.runtime.flow import MicroBatchOutcome

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


# -- resilience: deadlines, cancellation, quarantine, re-probes, injected faults -------------

def armed(*specs):
    injector = FaultInjector([FaultSpec(**s) for s in specs])
    injector.arm()
    return injector


def probe_feeds(stage):
    return {"head": {"x": x_batch(1)["x"]}, "tail": {"h": x_batch(1)["x"] * 2.0}}[stage]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_hung_tail_is_cancelled_at_its_deadline_retried_elsewhere_and_reprobed():
    hung = FnExecutor("cpu1", BOTH)
    good = FnExecutor("cpu0", BOTH)
    hung.faults = armed({"kind": "hang", "stage": "tail", "executor": "cpu1", "count": 1})
    quarantine = Quarantine(["cpu0", "cpu1"], backoff_s=0.3)
    runtime = make_runtime([good, hung], ["cpu0"], ["cpu0", "cpu1"], micro_batch=1, timeout=0.3,
                           quarantine=quarantine, probe_feeds=probe_feeds)
    try:
        runtime.history.observe_run("tail", "cpu1", 1, 1e-6)  # make cpu1 the first choice
        runtime.history.observe_run("tail", "cpu0", 1, 1.0)
        out = runtime.infer(x_batch(1))
        np.testing.assert_array_equal(out["y"], x_batch(1)["x"] * 2 + 1)
        stats = runtime.drain_stats()
        assert stats.timeouts[("tail", "cpu1")] == 1 and stats.quarantines["cpu1"] == 1
        assert [s for s, _ in good.ran] == ["head", "tail"], "the retry ran on cpu0"
        # The hang waited on its job's cancel token: the same thread is free again at once.
        assert wait_for(lambda: hung.running() is None, 2.0)
        assert wait_for(lambda: not quarantine.is_quarantined("cpu1")), "a probe brings it back"
        assert runtime.drain_stats().probes[("cpu1", "ok")] == 1
        assert len(hung.threads) == 1 and hung._thread.is_alive()
        assert runtime.in_flight() == 0
    finally:
        runtime.close()


def test_the_only_tail_executor_hanging_answers_a_timeout_then_fast_503s_while_quarantined():
    head, tail = FnExecutor("cpu0", HEAD), FnExecutor("cpu1", TAIL)
    tail.faults = armed({"kind": "hang", "stage": "tail", "count": 1})
    quarantine = Quarantine(["cpu0", "cpu1"], backoff_s=60.0)
    runtime = make_runtime([head, tail], ["cpu0"], ["cpu1"], micro_batch=2, timeout=0.2,
                           quarantine=quarantine)
    try:
        (outcome,) = runtime.run(x_batch(2))
        assert isinstance(outcome.error, StageTimeout) and "cpu1" in str(outcome.error)
        assert http_error(outcome.error).status == 504
        # Still quarantined (the hang's one shot is spent, so a run there would be a 200).
        (outcome,) = runtime.run(x_batch(2))
        error = http_error(outcome.error)
        assert error.status == 503
        assert "no executor in service for stage 'tail'" in error.message
        assert "cpu1" in error.message and "deadline" in error.message
    finally:
        runtime.close()


def test_failures_in_a_row_quarantine_an_executor_until_a_probe_succeeds():
    flaky, good = FnExecutor("cpu1", BOTH), FnExecutor("cpu0", BOTH)
    flaky.faults = armed({"kind": "error", "stage": "tail", "executor": "cpu1", "count": 3})
    quarantine = Quarantine(["cpu0", "cpu1"], after_failures=3, backoff_s=0.2)
    runtime = make_runtime([good, flaky], ["cpu0"], ["cpu0", "cpu1"], micro_batch=1,
                           quarantine=quarantine, probe_feeds=probe_feeds)
    try:
        runtime.history.observe_run("tail", "cpu1", 1, 1e-6)
        runtime.history.observe_run("tail", "cpu0", 1, 1.0)
        for _ in range(3):  # each failure is retried on cpu0: every answer is right
            out = runtime.infer(x_batch(1))
            np.testing.assert_array_equal(out["y"], x_batch(1)["x"] * 2 + 1)
        assert quarantine.is_quarantined("cpu1") and "3 failures in a row" in quarantine.reason("cpu1")
        runtime.infer(x_batch(1))
        assert [s for s, _ in flaky.ran] == [], "a quarantined executor gets no placements"
        assert wait_for(lambda: not quarantine.is_quarantined("cpu1"))
        assert ("tail", 1) in flaky.ran, "the probe ran a calibration-size tail"
    finally:
        runtime.close()


def test_failed_probes_back_off_exponentially_up_to_the_cap():
    now = [0.0]
    quarantine = Quarantine(["cpu1"], backoff_s=1.0, max_backoff_s=3.0, clock=lambda: now[0])
    assert quarantine.quarantine("cpu1", "tail", "missed the deadline")
    waits = []
    for _ in range(4):
        start = now[0]
        while not quarantine.due_probes():
            now[0] += 0.25
        waits.append(now[0] - start)
        quarantine.probe_result("cpu1", ok=False)
    assert waits == [1.0, 2.0, 3.0, 3.0]
    assert quarantine.is_quarantined("cpu1")
    now[0] += 3.0
    assert quarantine.due_probes() == [("cpu1", "tail")]
    quarantine.probe_result("cpu1", ok=True)
    assert quarantine.excluded() == frozenset()


def test_jobs_queued_behind_a_hung_run_are_rerouted_when_it_is_quarantined():
    hung, good = FnExecutor("cpu1", TAIL), FnExecutor("cpu0", BOTH)
    hung.faults = armed({"kind": "hang", "stage": "tail", "count": 1})
    runtime = make_runtime([good, hung], ["cpu0"], ["cpu0", "cpu1"], micro_batch=1, timeout=0.3,
                           quarantine=Quarantine(["cpu0", "cpu1"], backoff_s=60.0))
    try:
        # Fast history on cpu1 and no reservations: both tails are queued there at once.
        runtime.history.observe_run("tail", "cpu1", 1, 1e-6)
        runtime.history.observe_run("tail", "cpu0", 1, 10.0)
        out = runtime.infer(x_batch(3))
        np.testing.assert_array_equal(out["y"], x_batch(3)["x"] * 2 + 1)
        assert runtime.drain_stats().placements[("tail", "cpu1")] >= 2, "tails did queue on cpu1"
        assert [s for s, _ in good.ran].count("tail") == 3, "every tail ended on cpu0"
        assert hung.ran == [], "nothing queued on cpu1 ran there after it was quarantined"
        assert runtime.in_flight() == 0
    finally:
        runtime.close()


def test_out_of_memory_everywhere_is_a_507_and_the_executors_keep_serving():
    a, b = FnExecutor("cpu0", BOTH), FnExecutor("cpu1", BOTH)
    injector = armed({"kind": "oom", "stage": "tail", "count": 2})
    a.faults = b.faults = injector
    runtime = make_runtime([a, b], ["cpu0", "cpu1"], ["cpu0", "cpu1"], micro_batch=2,
                           quarantine=Quarantine(["cpu0", "cpu1"], after_failures=5))
    try:
        (outcome,) = runtime.run(x_batch(2))
        error = http_error(outcome.error)
        assert error.status == 507 and "out of memory" in error.message
        assert injector.fired == [2], "the retry went to the other group, which failed too"
        out = runtime.infer(x_batch(2))
        np.testing.assert_array_equal(out["y"], x_batch(2)["x"] * 2 + 1)
    finally:
        runtime.close()


def test_the_request_budget_answers_even_when_a_run_cannot_be_cancelled():
    stuck = FnExecutor("cpu0", BOTH, delay=3.0)  # time.sleep ignores the cancel token
    runtime = make_runtime([stuck], ["cpu0"], ["cpu0"], micro_batch=2, timeout=0.5,
                           request_timeout_s=0.6)
    try:
        started = time.perf_counter()
        (outcome,) = runtime.run(x_batch(2))
        assert time.perf_counter() - started < 2.0, "answered without waiting for the run"
        assert isinstance(outcome.error, StageTimeout)
        assert http_error(outcome.error).status == 504
    finally:
        runtime.close()


def test_threads_stay_flat_over_a_thousand_batches_after_faults():
    a, b = FnExecutor("cpu0", BOTH), FnExecutor("cpu1", BOTH)
    a.faults = b.faults = armed({"kind": "error", "stage": "any", "probability": 0.05, "seed": 3})
    runtime = make_runtime([a, b], ["cpu0", "cpu1"], ["cpu0", "cpu1"], micro_batch=1,
                           quarantine=Quarantine(["cpu0", "cpu1"], backoff_s=0.01),
                           probe_feeds=probe_feeds)
    try:
        for _ in range(20):
            runtime.run(x_batch(2))
        threads = threading.active_count()
        answered = sum(len(runtime.run(x_batch(2))) for _ in range(1000))
        assert answered == 2000
        assert threading.active_count() == threads
        assert wait_for(lambda: runtime.in_flight() == 0, 2.0)
    finally:
        runtime.close()


def _slow_onnx(path, n=1000, depth=40):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, prev = [], "x"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"y{i}"]))
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["b", n])],
        initializer=[numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    return prev


def test_a_real_onnx_runtime_run_is_terminated_at_the_stage_deadline(tmp_path):
    from handlers.executors.cpu import CpuExecutor
    from handlers.hardware.topology import CoreGroup

    out = _slow_onnx(tmp_path / "slow.onnx")
    executor = CpuExecutor(CoreGroup("cpu0", (0,), 0, 0), {"whole": tmp_path / "slow.onnx"}, pin=False)
    executor.start()
    x = np.ones((1000, 1000), np.float32)
    started = time.perf_counter()
    executor.submit("whole", {"x": x}, 1000).result()
    full = time.perf_counter() - started
    runtime = Runtime([StagePlan("whole", ("x",), (out,), ("cpu0",))], [executor], PerfHistory(),
                      [out], micro_batch=1000, stage_timeout_s=full / 8).start()
    try:
        started = time.perf_counter()
        (outcome,) = runtime.run({"x": x})
        assert isinstance(outcome.error, StageTimeout)
        # ORT honoured RunOptions.terminate between nodes: the thread is free long before the
        # run would have ended, and serves the next job.
        assert wait_for(lambda: executor.running() is None, full / 2)
        assert time.perf_counter() - started < full * 0.75, (time.perf_counter() - started, full)
        small = executor.submit("whole", {"x": np.ones((1, 1000), np.float32)}, 1).result(timeout=30)
        assert small[out].shape == (1, 1000)
    finally:
        runtime.close()


def test_fault_injection_is_refused_unless_the_environment_allows_it(monkeypatch):
    yaml_config = {"hetserve": {"faults": {"kind": "hang", "stage": "tail"}}}
    monkeypatch.delenv("HETSERVE_ENABLE_FAULTS", raising=False)
    with pytest.raises(ConfigError, match="HETSERVE_ENABLE_FAULTS=1"):
        RuntimeConfig.from_model_yaml(yaml_config)
    monkeypatch.setenv("HETSERVE_ENABLE_FAULTS", "1")
    config = RuntimeConfig.from_model_yaml(yaml_config)
    assert config.faults == (FaultSpec(kind="hang", stage="tail"),)
    for bad, word in (({"kind": "explode"}, "kind"), ({"kind": "error", "when": 1}, "when"),
                      ({"kind": "error", "probability": 0.5, "every_nth": 2}, "not both")):
        with pytest.raises(ConfigError, match=word):
            RuntimeConfig.from_model_yaml({"hetserve": {"faults": bad}})


def test_every_nth_and_count_decide_which_runs_fail():
    injector = armed({"kind": "error", "every_nth": 2, "count": 2})
    token = CancelToken()
    failed = []
    for i in range(8):
        try:
            injector.check("tail", "cpu0", token)
        except ExecutorError as exc:
            assert "injected" in str(exc)
            failed.append(i)
    assert failed == [1, 3]
    unarmed = FaultInjector([FaultSpec(kind="error")])
    unarmed.check("tail", "cpu0", token)  # not armed yet: calibration must not fail


def test_stage_deadline_must_fit_in_the_response_timeout():
    with pytest.raises(ConfigError, match="stage_timeout_s"):
        RuntimeConfig.from_model_yaml({"responseTimeout": 20, "hetserve": {"stage_timeout_s": 30}})
    with pytest.raises(ConfigError, match="responseTimeout"):
        RuntimeConfig.from_model_yaml({"responseTimeout": 60, "hetserve": {"request_timeout_s": 60}})
    config = RuntimeConfig.from_model_yaml({"responseTimeout": 60})
    assert config.request_timeout_s == pytest.approx(54.0)


@pytest.mark.parametrize(
    "yaml, lanes, pad",
    [
        ({"batchSize": 8}, 1, 8),  # the whole batch is one micro-batch
        ({"batchSize": 8}, 4, 2),  # split over four streams
        ({"batchSize": 7}, 2, 4),  # the larger half
        ({"batchSize": 8, "hetserve": {"micro_batch": 3}}, 2, 3),
        ({"batchSize": 8, "hetserve": {"cuda_fixed_batch": False}}, 1, 0),
        ({}, 1, 1),  # TorchServe's default batchSize
    ],
)
def test_gpu_runs_are_padded_to_the_largest_micro_batch(yaml, lanes, pad):
    assert gpu_pad_batch(RuntimeConfig.from_model_yaml(yaml), lanes) == pad


def test_switches_must_be_booleans():
    with pytest.raises(ConfigError, match="cuda_fixed_batch must be true or false"):
        RuntimeConfig.from_model_yaml({"hetserve": {"cuda_fixed_batch": "yes"}})


@pytest.mark.parametrize(
    "largest, pad, done, sizes",
    [
        (8, 0, (1, 4), [2, 3, 5, 6, 7, 8]),  # unpadded: every size is its own shape
        (8, 8, (1, 4), []),  # padded to 8: calibration already ran that one shape
        (8, 2, (1, 4), [3, 5, 6, 7, 8]),  # 1 and 2 share the padded shape 2
        (4, 6, (), [1]),  # one run warms the padded shape
    ],
)
def test_warm_up_runs_each_gpu_shape_once(largest, pad, done, sizes):
    assert warmup_sizes(largest, pad, done) == sizes


def test_the_supervisor_saves_the_history_periodically_off_the_request_path():
    runtime = make_runtime([FnExecutor("cpu0", BOTH)], ["cpu0"], ["cpu0"])
    saved_by: list[str] = []
    try:
        runtime.supervisor.save_every(lambda: saved_by.append(threading.current_thread().name), 0.05)
        np.testing.assert_array_equal(runtime.infer(x_batch(2))["y"], x_batch(2)["x"] * 2 + 1)
        assert wait_for(lambda: len(saved_by) >= 2, 5.0)
        assert set(saved_by) == {"hetserve-supervisor"}, "saves run on the supervisor thread"
    finally:
        runtime.close()
    count = len(saved_by)
    time.sleep(0.2)
    assert len(saved_by) == count, "close() stops the periodic saves"


def test_an_idle_supervisor_sleeps_until_work_arrives():
    """Many idle models on one box: no worker's supervisor may poll (issue 23, item 4); the
    deadline tests above show it still watches every run it is woken for."""
    runtime = make_runtime([FnExecutor("cpu0", BOTH), FnExecutor("cpu1", BOTH)], ["cpu0"], ["cpu1"])
    try:
        time.sleep(0.5)  # ten polling intervals
        assert runtime.supervisor.passes == 0
        np.testing.assert_array_equal(runtime.infer(x_batch(4))["y"], x_batch(4)["x"] * 2 + 1)
        assert wait_for(lambda: runtime.supervisor.passes > 0)  # woken by the submitted runs
        time.sleep(0.2)  # a pass already due may still come
        passes = runtime.supervisor.passes
        time.sleep(0.5)
        assert runtime.supervisor.passes == passes, "idle again: asleep again"
    finally:
        runtime.close()


def test_the_placer_books_the_earliest_predicted_end_and_frees_on_completion():
    from handlers.runtime.placement import Placer

    now = [0.0]
    history = PerfHistory(clock=lambda: now[0])
    history.observe_run("tail", "cpu0", 2, 0.010)
    history.observe_run("tail", "cpu1", 2, 0.004)
    placer = Placer(history, {"cpu0": "cpu", "cpu1": "cpu"}, lambda: now[0])
    feeds = x_batch(2)
    first = placer.place("tail", 2, feeds, ["cpu0", "cpu1"])
    second = placer.place("tail", 2, feeds, ["cpu0", "cpu1"])
    third = placer.place("tail", 2, feeds, ["cpu0", "cpu1"])
    # cpu1 ends first twice (0.004, 0.008), then cpu0 (0.010) beats cpu1's 0.012
    assert [p.executor for p in (first, second, third)] == ["cpu1", "cpu1", "cpu0"]
    assert placer.place("tail", 2, feeds, ["cpu1"]).start == pytest.approx(0.008)
    placer.complete("cpu1", 0.006)  # finished 2 ms late: the runs booked behind it move too
    assert placer.free_times.free_at("cpu1") == pytest.approx(0.014)

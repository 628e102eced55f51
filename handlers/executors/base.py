"""The executor base class: one thread each, owning the sessions for the stages it can run.

Subclasses: ``handlers.executors.cpu.CpuExecutor`` (one core group) and
``handlers.executors.cuda.CudaExecutor`` (one CUDA stream).

A failing run fails only its job's future: the executor thread survives to run the next job.
A run can be cancelled (``interrupt``): each job carries a ``CancelToken`` that sets ONNX
Runtime's ``RunOptions.terminate`` on the job's own run options, so the thread comes back and
is reused instead of leaking behind a hung run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from handlers.errors import ExecutorFailed, executor_failure
from handlers.errors import ExecutorLoadError as ExecutorLoadError  # also importable from here
from handlers.observability.tracing import Span

if TYPE_CHECKING:
    from handlers.observability.tracing import Recorder

log = logging.getLogger(__name__)

# (stage, executor, batch, seconds) -> None; called from the executor thread after each run.
RunObserver = Callable[[str, str, int, float], None]
# (link, bytes, seconds) -> None, e.g. ("cuda:0->cpu", 602112, 1.2e-4).
TransferObserver = Callable[[str, int, float], None]
# A stage run's outputs by name: numpy arrays, or DeviceTensors a CUDA executor leaves on its GPU.
StageOutputs = dict[str, Any]


def host_feeds(
    feeds: Mapping[str, Any], observer: TransferObserver | None = None
) -> dict[str, np.ndarray]:
    """Feeds for a CPU session: tensors left on a GPU (anything with ``to_host``) are copied
    here, in the consuming executor's thread, and the copy is reported as a transfer."""
    out: dict[str, np.ndarray] = {}
    for name, value in feeds.items():
        if isinstance(value, np.ndarray):
            out[name] = value
            continue
        started = time.perf_counter()
        out[name] = value.to_host()
        if observer is not None:
            observer(f"{value.device}->cpu", value.nbytes, time.perf_counter() - started)
    return out


# The name executors raise under; the class lives with the other failures in handlers.errors.
ExecutorError = ExecutorFailed


class CancelToken:
    """Cancels one job's run: wakes waits on it and terminates its ORT runs."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._run_options: list[Any] = []

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            for options in self._run_options:
                options.terminate = True

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        """True when cancelled within ``timeout`` seconds."""
        return self._event.wait(timeout)

    def run_options(self) -> Any:
        """Fresh ORT run options bound to this token (about 0.4 us to create)."""
        import onnxruntime as ort

        options = ort.RunOptions()
        with self._lock:
            options.terminate = self._event.is_set()
            self._run_options.append(options)
        return options


@dataclass
class Job:
    stage: str
    feeds: Mapping[str, np.ndarray]
    batch: int
    observe: bool = True  # False for warm-up runs that must not bias the history
    future: Future[StageOutputs] = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    cancel: CancelToken = field(default_factory=CancelToken)


class FaultHook(Protocol):
    """Consulted just before each run; raises, blocks or returns (``handlers.testing.faults``)."""

    def check(self, stage: str, executor: str, cancel: CancelToken) -> None: ...


class Executor:
    """Base: a job queue drained by one thread; subclasses load sessions and run them."""

    device = "cpu"
    # Rows every run is zero-padded to, for one fixed input shape (CUDA); 0: runs as given.
    pad_batch = 0

    def __init__(
        self,
        name: str,
        observer: RunObserver | None = None,
        transfer_observer: TransferObserver | None = None,
    ) -> None:
        self.name = name
        # Where observed runs and transfers go (the runtime's history); the assembly attaches
        # them once the runtime exists, before any job is submitted.
        self.run_observer = observer
        self.transfer_observer = transfer_observer
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, name=f"hetserve-{name}", daemon=True)
        self.stages: frozenset[str] = frozenset()
        self.faults: FaultHook | None = None  # consulted before each run (tests only)
        self.timeline: Recorder | None = None  # records this executor's spans when set
        # Stamps job starts (what stage deadlines compare with); the runtime injects its own.
        self.clock: Callable[[], float] = time.perf_counter
        # (job, clock() at its start) while a job runs; one tuple, so reads are atomic.
        self._running: tuple[Job, float] | None = None

    def start(self, timeout: float | None = None) -> None:
        self._thread.start()
        self._ready.result(timeout=timeout)  # re-raises the load error, if any

    def submit(
        self, stage: str, feeds: Mapping[str, np.ndarray], batch: int, observe: bool = True
    ) -> Future[StageOutputs]:
        if stage not in self.stages:
            raise ExecutorError(f"executor {self.name} has no stage {stage!r}")
        job = Job(stage, feeds, batch, observe)
        self._jobs.put(job)
        return job.future

    def running(self) -> tuple[Future[StageOutputs], float] | None:
        """The running job's future and the time (on ``clock``) it started, if any."""
        current = self._running
        return (current[0].future, current[1]) if current is not None else None

    def interrupt(self, future: Future[StageOutputs]) -> bool:
        """Stop the job behind ``future``: a queued one never runs, a running one is cancelled.
        False when it is no longer queued or running here."""
        current = self._running
        if current is not None and current[0].future is future:
            current[0].cancel.cancel()
            return True
        return future.cancel()

    def run_options(self) -> Any:
        """ORT run options that the runtime can terminate, for the job now running."""
        current = self._running
        return current[0].cancel.run_options() if current is not None else None

    def trace(self, lane: str, kind: str, name: str, start: float, end: float,
              nbytes: int = 0) -> None:
        """Record a span of the job now running, if a timeline is attached."""
        timeline, current = self.timeline, self._running
        if timeline is not None:
            batch = current[0].batch if current is not None else 0
            timeline.record(Span(lane, kind, name, start, end, batch, nbytes))

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            current = self._running
            if current is not None:
                current[0].cancel.cancel()
            self._jobs.put(None)
            self._thread.join(timeout)

    # -- the executor thread --
    def _main(self) -> None:
        try:
            self._on_thread_start()
            self.stages = frozenset(self._load())
        except Exception as exc:  # noqa: BLE001 - reported through the ready future
            self._ready.set_exception(ExecutorLoadError(f"executor {self.name}: {exc}"))
            return
        self._ready.set_result(None)
        while (job := self._jobs.get()) is not None:
            # Visible as running before it starts, so an interrupt in between is not lost.
            started = self.clock()
            self._running = (job, started)
            if not job.future.set_running_or_notify_cancel():
                self._running = None
                continue
            try:
                self._fault_hook(job)
            except Exception as exc:  # noqa: BLE001 - an injected fault fails only its job
                self._running = None
                self._discard(job)
                job.future.set_exception(self._job_error(job, exc))
                continue
            try:
                outputs = self._run(job.stage, job.feeds)
            except Exception as exc:  # noqa: BLE001 - one failed job must not end the thread
                self._running = None
                job.future.set_exception(self._job_error(job, exc))
                continue
            self._running = None
            elapsed = self.clock() - started
            if self.run_observer is not None and job.observe:
                self.run_observer(job.stage, self.name, job.batch, elapsed)
            job.future.set_result(outputs)
        self._unload()

    def _job_error(self, job: Job, exc: Exception) -> ExecutorError:
        if job.cancel.cancelled:
            log.warning("executor %s: stage %s cancelled after its deadline", self.name, job.stage)
            return ExecutorError(
                f"stage {job.stage!r} on {self.name} was cancelled after missing its deadline"
            )
        if isinstance(exc, ExecutorFailed):  # already says what went wrong, e.g. out of memory
            log.warning("executor %s: %s", self.name, exc)
            return exc
        log.warning("executor %s: stage %s failed: %s", self.name, job.stage, exc)
        return executor_failure(exc, job.stage, self.name)

    def _fault_hook(self, job: Job) -> None:
        """The one place fault injection reaches a run: no subclass has to remember it."""
        if self.faults is not None:
            self.faults.check(job.stage, self.name, job.cancel)

    def _discard(self, job: Job) -> None:
        """A job that will not run: give back what ``submit`` reserved for it (default: nothing)."""

    def _on_thread_start(self) -> None:
        pass

    def _load(self) -> list[str]:
        raise NotImplementedError

    def _run(self, stage: str, feeds: Mapping[str, np.ndarray]) -> StageOutputs:
        raise NotImplementedError

    def _unload(self) -> None:
        pass

"""The runtime's supervisor: one background thread, started and stopped explicitly.

Every ``interval_s`` it enforces stage deadlines (cancels an overdue run, quarantines its
executor and retries the micro-batch elsewhere, moving the jobs queued behind it), starts
re-probes of quarantined executors that are due, and saves the performance history when
``save_every`` asked for it: the periodic save runs here, off the request path and without the
runtime's lock (``PerfHistory`` locks itself). It works on the state the runtime shares with it
(``lock``, ``attempts``, ``probes``) and answers through the runtime's own retry path.

An idle runtime (no stage run or probe in flight, no executor quarantined) has nothing to watch:
the thread then sleeps until the runtime submits work (``wake``), the next save is due, or
``close``. A box of many idle models (one supervisor per worker) thus takes no CPU polling.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from handlers.errors import StageTimeout
from handlers.executors.base import StageOutputs
from handlers.runtime.in_flight import Attempt, InFlight

# What the supervisor does with a run it took off an executor: retry it elsewhere or fail it.
Retry = Callable[[Attempt, BaseException], None]

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, state: InFlight, retry: Retry, interval_s: float = 0.05) -> None:
        self.state = state
        self._retry = retry
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._work = threading.Event()  # set by wake(): a stage run was submitted
        self.passes = 0  # passes made so far: an idle runtime makes none (tests read it)
        self._thread: threading.Thread | None = None
        self._save: Callable[[], None] | None = None
        self._save_interval_s = 0.0
        self._last_save = 0.0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="hetserve-supervisor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._work.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def save_every(self, save: Callable[[], None], interval_s: float) -> None:
        """Call ``save`` from the supervisor thread every ``interval_s`` seconds."""
        self._save, self._save_interval_s = save, interval_s
        self._last_save = self.state.clock()

    def _maybe_save(self) -> None:
        if self._save is None or self.state.clock() - self._last_save < self._save_interval_s:
            return
        self._last_save = self.state.clock()
        self._save()

    def wake(self) -> None:
        """Work was submitted: watch it (cheap, called for every stage run)."""
        if not self._work.is_set():
            self._work.set()

    def _sleep(self) -> bool:
        """Wait for the next pass: one interval while there is work, else until woken or a save
        is due. False once closed."""
        self._work.clear()  # before the check: a wake() from here on ends the wait below
        if self.state.idle():
            due = None
            if self._save is not None:
                due = max(self._last_save + self._save_interval_s - self.state.clock(), 0.0)
            self._work.wait(due)
            if self._stop.is_set():
                return False
        return not self._stop.wait(self.interval_s)

    def _loop(self) -> None:
        while self._sleep():
            self.passes += 1
            try:
                self._enforce_deadlines()
                self._start_probes()
                self._maybe_save()
            except Exception:  # noqa: BLE001 - the supervisor must outlive any one bad pass
                log.exception("hetserve supervisor pass failed")

    def _enforce_deadlines(self) -> None:
        rt = self.state
        now = rt.clock()  # the executors stamp job starts with the same clock
        overdue: list[tuple[str, Future[StageOutputs], Attempt | None]] = []
        for name, executor in rt.executors.items():
            running = executor.running()
            if running is None or now - running[1] <= rt.stage_timeout_s:
                continue
            future = running[0]
            with rt.lock:
                attempt = rt.attempts.pop(future, None)
                if attempt is None or attempt.settled:
                    if future in rt.probes:
                        overdue.append((name, future, None))
                    continue  # otherwise a calibration run, or one already handled
                attempt.settled = True
                rt.stats.timeouts[(attempt.stage.name, name)] += 1
                reason = f"missed the {rt.stage_timeout_s:g} s stage deadline"
                if rt.quarantine.quarantine(name, attempt.stage.name, reason):
                    rt.on_quarantined(name)
            overdue.append((name, future, attempt))
        # Move the queued jobs first: once interrupted, the executor would take the next one.
        self._reroute_queued()
        for name, future, attempt in overdue:
            rt.executors[name].interrupt(future)
            if attempt is not None:
                error = StageTimeout(
                    f"stage {attempt.stage.name!r} on {name} missed the "
                    f"{rt.stage_timeout_s:g} s stage deadline"
                )
                self._retry(attempt, error)

    def _reroute_queued(self) -> None:
        """Jobs still queued on a quarantined executor move elsewhere instead of waiting there."""
        rt = self.state
        with rt.lock:
            out = rt.quarantine.excluded()
            queued = [f for f, a in rt.attempts.items() if a.executor in out and not a.settled]
        for future in queued:
            future.cancel()  # fails for a running job; a queued one reroutes in _stage_done

    def _start_probes(self) -> None:
        rt = self.state
        with rt.lock:
            due = rt.quarantine.due_probes()
        for name, stage in due:
            if rt.probe_feeds is None:  # nothing to probe with: the next real job is the probe
                self._probe_done(name, None)
                continue
            try:
                feeds = rt.probe_feeds(stage)
                batch = next(iter(feeds.values())).shape[0]
                future = rt.executors[name].submit(stage, feeds, batch, observe=False)
            except Exception as exc:  # noqa: BLE001 - a probe that cannot start has failed
                log.warning("hetserve: could not probe executor %s: %s", name, exc)
                with rt.lock:
                    rt.quarantine.probe_result(name, False)
                continue
            with rt.lock:
                rt.probes[future] = name
            future.add_done_callback(functools.partial(self._probe_done, name))

    def _probe_done(self, name: str, future: Future[StageOutputs] | None) -> None:
        rt = self.state
        ok = future is None or (not future.cancelled() and future.exception() is None)
        with rt.lock:
            if future is not None:
                rt.probes.pop(future, None)
            rt.quarantine.probe_result(name, ok)
            rt.stats.probes[(name, "ok" if ok else "failed")] += 1
        if ok:
            log.warning("hetserve: executor %s back in service after a successful probe", name)
        else:
            log.warning("hetserve: probe of executor %s failed; it stays quarantined", name)

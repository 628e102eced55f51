"""The quarantine that keeps real faults contained: which executors are out of service.

It takes an executor out of placement after it misses a stage deadline or fails
``after_failures`` runs in a row, and lets it back only after a re-probe (a calibration-size run)
succeeds; failed probes back off exponentially, capped.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class _Health:
    failures: int = 0  # in a row
    quarantined: bool = False
    stage: str = ""  # the stage it failed on: the one to re-probe
    reason: str = ""
    backoff_s: float = 0.0
    probe_at: float = 0.0
    probing: bool = False


class Quarantine:
    """Which executors are out of service and when each is due for a re-probe.

    Not locked itself: the runtime calls it under its own lock.
    """

    def __init__(
        self,
        names: Sequence[str],
        after_failures: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._health = {name: _Health() for name in names}
        self.after_failures = after_failures
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self.quarantines: Counter[str] = Counter()  # executor -> times quarantined
        self.probes: Counter[tuple[str, str]] = Counter()  # (executor, "ok" | "failed") -> count

    def excluded(self) -> frozenset[str]:
        return frozenset(n for n, h in self._health.items() if h.quarantined)

    def is_quarantined(self, name: str) -> bool:
        return self._health[name].quarantined

    def reason(self, name: str) -> str:
        return self._health[name].reason

    def record_success(self, name: str) -> None:
        self._health[name].failures = 0

    def record_failure(self, name: str, stage: str, reason: str) -> bool:
        """True when this failure puts the executor in quarantine."""
        health = self._health[name]
        health.failures += 1
        if health.failures < self.after_failures:
            return False
        return self.quarantine(name, stage, f"{health.failures} failures in a row, last: {reason}")

    def quarantine(self, name: str, stage: str, reason: str) -> bool:
        """True when the executor was in service until now."""
        health = self._health[name]
        if health.quarantined:
            return False
        health.quarantined, health.stage, health.reason = True, stage, reason
        health.backoff_s = self.backoff_s
        health.probe_at = self._clock() + health.backoff_s
        self.quarantines[name] += 1
        return True

    def due_probes(self) -> list[tuple[str, str]]:
        """(executor, stage) pairs to re-probe now; each is marked as being probed."""
        now, due = self._clock(), []
        for name, health in self._health.items():
            if health.quarantined and not health.probing and now >= health.probe_at:
                health.probing = True
                due.append((name, health.stage))
        return due

    def probe_result(self, name: str, ok: bool) -> None:
        health = self._health[name]
        health.probing = False
        self.probes[(name, "ok" if ok else "failed")] += 1
        if ok:
            health.quarantined, health.failures, health.reason = False, 0, ""
            return
        health.backoff_s = min(health.backoff_s * 2, self.max_backoff_s)
        health.probe_at = self._clock() + health.backoff_s

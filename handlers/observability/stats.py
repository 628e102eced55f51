"""What a runtime counts between two drains: placements, run and queue times, timeouts,
quarantines, probes, retries, CPU fallbacks. The runtime fills it (``handlers.runtime``), the
adapter turns each batch's drained copy into TorchServe metrics (``observability/metrics.py``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RuntimeStats:
    """Counters the handler turns into TorchServe metrics after each batch."""

    placements: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, executor) -> count
    run_ms: list[tuple[str, str, float]] = field(default_factory=list)  # (stage, executor, ms)
    queue_ms: list[tuple[str, float]] = field(default_factory=list)  # (stage, ms)
    micro_batches: int = 0
    timeouts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, executor) -> missed deadlines
    quarantines: Counter[str] = field(default_factory=Counter)  # executor -> times taken out
    probes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (executor, "ok" | "failed") -> count
    retries: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, executor that failed) -> count
    cpu_fallbacks: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, GPU executor out of memory)

    def drain(self) -> RuntimeStats:
        snapshot = RuntimeStats(
            Counter(self.placements), list(self.run_ms), list(self.queue_ms), self.micro_batches,
            Counter(self.timeouts), Counter(self.quarantines), Counter(self.probes),
            Counter(self.retries), Counter(self.cpu_fallbacks),
        )
        for counter in (self.placements, self.timeouts, self.quarantines, self.probes,
                        self.retries, self.cpu_fallbacks):
            counter.clear()
        self.run_ms.clear()
        self.queue_ms.clear()
        self.micro_batches = 0
        return snapshot

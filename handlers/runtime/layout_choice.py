"""Keep the shipped CPU layout only where it beats the whole model on one core group.

The archive's default splits the model into head and tail over two or more CPU core groups.
On some boxes (two cores, a model whose stages are unbalanced, a slow hand-over) that pipeline
serves less than the plain whole model on one group of every core. At load the runtime times a
full batch through both, alternating so that a neighbour's load hits both alike, and keeps the
faster one: ``choose`` is that decision, a pure function of the measured times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CONFIGURED = "configured"
WHOLE = "whole"


@dataclass(frozen=True)
class LayoutDecision:
    keep: str  # CONFIGURED or WHOLE
    batch: int
    configured_s: float  # median seconds per batch
    whole_s: float
    runs: int

    def describe(self) -> str:
        kept = "the configured layout" if self.keep == CONFIGURED else "the whole model on one group"
        return (
            f"layout check at batch {self.batch} (median of {self.runs}): configured "
            f"{1e3 * self.configured_s:.1f} ms, whole model on one group {1e3 * self.whole_s:.1f} ms "
            f"per batch; keeping {kept}"
        )


def choose(configured: Sequence[float], whole: Sequence[float], batch: int) -> LayoutDecision:
    """The layout with the lower median time per batch; a tie keeps the configured one."""
    if not configured or not whole:
        raise ValueError("both layouts need at least one timed batch")
    if any(t < 0 for t in (*configured, *whole)):
        raise ValueError("batch times cannot be negative")
    a, b = statistics.median(configured), statistics.median(whole)
    return LayoutDecision(WHOLE if b < a else CONFIGURED, batch, a, b, min(len(configured), len(whole)))


def time_alternating(
    run_configured: Callable[[], object],
    run_whole: Callable[[], object],
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """Seconds per call of each, measured in turns (configured, whole, configured, ...)."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    configured: list[float] = []
    whole: list[float] = []
    for _ in range(rounds):
        for run, out in ((run_configured, configured), (run_whole, whole)):
            started = clock()
            run()
            out.append(clock() - started)
    return configured, whole

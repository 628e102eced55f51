"""Keep every executor's estimate honest (issue 17, item 4): pure policies, clocks injected.

dmda only places work where it predicts the earliest end, so one inflated estimate (a cold cache,
a noisy neighbour, a history from another machine) keeps an executor from ever being chosen and
therefore from ever being re-measured. Three policies undo that:

* ``decayed_alpha``: an observation replaces more of an estimate the older the estimate is;
  a stored mean a few half-lives old is mostly replaced by the first fresh run.
* ``due_for_reprobe`` / ``mark_reprobes``: a (stage, executor) pair not measured for
  ``after_s`` gets one placement as if uncalibrated, at most once per ``after_s``.
* ``clamped_stamp``: an ``updated`` stamp in the future (a skewed clock, a hand-edited file)
  counts as the oldest, or it would win every merge-on-save for ever.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

from handlers.runtime.scheduler import Candidate

# One half-life per re-probe period: each re-probe of a stale pair moves its estimate about
# two thirds of the way to the fresh measurement (alpha 0.3), so 20 ms against 0.3 ms real
# is within 2x after four re-probes.
DECAY_HALF_LIFE_S = 10.0
REPROBE_AFTER_S = 10.0


def decayed_alpha(alpha: float, age_s: float, half_life_s: float = DECAY_HALF_LIFE_S) -> float:
    """EWMA weight of a new observation on an estimate last updated ``age_s`` ago.

    ``alpha`` for a fresh estimate, approaching 1 (the new value replaces it) as it ages; the
    estimate's own weight halves every ``half_life_s``.
    """
    if not age_s > 0:  # no age (or a NaN): plain EWMA
        return alpha
    weight: float = 1.0 - (1.0 - alpha) * 0.5 ** (age_s / half_life_s)
    return weight


def clamped_stamp(updated: float, now: float) -> float:
    """``updated``, or 0.0 (the oldest possible) if it lies after ``now``.

    Not ``now``: a file re-read at every save would be re-stamped "now" each time and still
    win every merge against the measurements it should give way to.
    """
    return updated if updated <= now else 0.0


def due_for_reprobe(
    last_observed: float | None, last_reprobe: float | None, now: float, after_s: float
) -> bool:
    """A measured pair unseen for ``after_s`` and not re-probed within ``after_s``."""
    if last_observed is None:  # never measured: dmda already calibrates it first
        return False
    if now - last_observed < after_s:
        return False
    return last_reprobe is None or now - last_reprobe >= after_s


def mark_reprobes(
    stage: str,
    candidates: Sequence[Candidate],
    last_observed: Callable[[str, str], float | None],
    reprobed: MutableMapping[tuple[str, str], float],
    now: float,
    after_s: float = REPROBE_AFTER_S,
) -> list[Candidate]:
    """``candidates`` with at most one stale executor shown as uncalibrated (run_s None), so
    dmda places this micro-batch there and re-measures it; ``reprobed`` remembers when."""
    out = list(candidates)
    for i, cand in enumerate(out):
        key = (stage, cand.executor)
        if cand.run_s is not None and due_for_reprobe(
            last_observed(stage, cand.executor), reprobed.get(key), now, after_s
        ):
            reprobed[key] = now
            out[i] = cand._replace(run_s=None)
            break
    return out

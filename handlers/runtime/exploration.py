"""Keep every executor's estimate honest (issue 17, item 4): pure policies, clocks injected.

dmda only places work where it predicts the earliest end, so one inflated estimate (a cold cache,
a noisy neighbour, a history from another machine) keeps an executor from ever being chosen and
therefore from ever being re-measured. Three policies undo that:

* ``decayed_alpha``: an observation replaces more of an estimate the older the estimate is;
  a stored mean a few half-lives old is mostly replaced by the first fresh run.
* ``due_for_reprobe`` / ``mark_reprobes``: an estimate of one (stage, executor, batch bucket)
  that this process has not measured for ``after_s`` gets one placement as if uncalibrated.
  Per bucket, not per pair: an executor kept busy with 1-row runs must still have its 4-row
  estimate re-measured (issue 22). "Measured" means in this process, so estimates loaded from
  a saved history, or scaled from another bucket, are re-measured at their first use. A
  re-probe that confirms its estimate doubles that key's wait (up to ``MAX_REPROBE_AFTER_S``):
  an executor that is simply slower is not re-run at every batch size every ``after_s``.
* ``clamped_stamp``: an ``updated`` stamp in the future (a skewed clock, a hand-edited file)
  counts as the oldest, or it would win every merge-on-save for ever.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import NamedTuple

from handlers.runtime.scheduler import Candidate

RunKey = tuple[str, str, int]  # (stage, executor, batch bucket), as in perf_model

# One half-life per re-probe period: each re-probe of a stale estimate moves it about
# two thirds of the way to the fresh measurement (alpha 0.3), so 20 ms against 0.3 ms real
# is within 2x after four re-probes.
DECAY_HALF_LIFE_S = 10.0
REPROBE_AFTER_S = 10.0
# Confirmed estimates wait longer between re-probes, up to this: with buckets 1-32 a never-chosen
# executor would otherwise take six re-probe runs per stage every 10 s, not one.
MAX_REPROBE_AFTER_S = 8 * REPROBE_AFTER_S
# An estimate that moved by at most this share since its last re-probe was confirmed by it.
CONFIRMED_WITHIN = 0.25


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


class Reprobe(NamedTuple):
    """The last re-probe of one (stage, executor, bucket)."""

    at: float  # when it was placed
    wait_s: float  # how long after ``at`` the key may be re-probed again
    estimate_s: float  # the estimate it was placed against


def due_for_reprobe(
    confirmed_at: float | None, last: Reprobe | None, now: float, after_s: float
) -> bool:
    """An estimate this process has not measured for ``after_s`` (or at all: loaded from a saved
    history, or scaled from another bucket) whose last re-probe's wait is over."""
    if confirmed_at is not None and now - confirmed_at < after_s:
        return False
    return last is None or now - last.at >= last.wait_s


def next_reprobe(
    last: Reprobe | None, estimate_s: float, now: float, after_s: float, max_after_s: float
) -> Reprobe:
    """The record of a re-probe placed ``now`` against ``estimate_s``.

    If the estimate moved by at most ``CONFIRMED_WITHIN`` since the last re-probe, that one
    confirmed it and the wait doubles (up to ``max_after_s``); otherwise it is ``after_s`` again,
    so an estimate still being corrected is re-measured at the full rate.
    """
    wait = after_s
    if last is not None and abs(estimate_s - last.estimate_s) <= CONFIRMED_WITHIN * last.estimate_s:
        wait = min(2.0 * last.wait_s, max_after_s)
    return Reprobe(now, max(wait, after_s), estimate_s)


def mark_reprobes(
    stage: str,
    bucket: int,
    candidates: Sequence[Candidate],
    confirmed_at: Callable[[RunKey], float | None],
    reprobed: MutableMapping[RunKey, Reprobe],
    now: float,
    after_s: float = REPROBE_AFTER_S,
    max_after_s: float = MAX_REPROBE_AFTER_S,
) -> Sequence[Candidate]:
    """``candidates`` with at most one executor whose estimate for this batch bucket is due
    shown as uncalibrated (run_s None), so dmda places this micro-batch there and re-measures
    it; ``reprobed`` remembers when. ``candidates`` itself when none is due."""
    for i, cand in enumerate(candidates):
        if cand.run_s is None:  # never measured: dmda already calibrates it first
            continue
        key = (stage, cand.executor, bucket)
        last = reprobed.get(key)
        if due_for_reprobe(confirmed_at(key), last, now, after_s):
            reprobed[key] = next_reprobe(last, cand.run_s, now, after_s, max_after_s)
            out = list(candidates)
            out[i] = cand._replace(run_s=None)
            return out
    return candidates

"""Performance history: what the scheduler believes each stage costs on each executor.

Like StarPU's history-based models, run times are kept per (stage, executor, batch-size
bucket) as an exponentially weighted moving average, and each link's transfer cost as an
EWMA fit of ``latency + bytes / bandwidth``. The history is saved to a JSON file shared by the
worker processes of one model, so a restarted worker starts calibrated.

Each run estimate also has a *confirmation* stamp: when this process last measured that
(stage, executor, bucket). It is never saved or merged, so an estimate loaded from a file, or
scaled from another bucket, is unconfirmed until this process runs it: the re-probe policy
(``handlers.runtime.exploration``) re-measures it instead of trusting it for ever, and that
first run here replaces a loaded estimate rather than averaging with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from handlers.runtime.exploration import clamped_stamp, decayed_alpha

log = logging.getLogger(__name__)

HISTORY_FORMAT = "hetserve-perf-history"
HISTORY_VERSION = 1

# Bounds on what a saved history may hold: a run of an hour, a transfer of a petabyte. Larger
# values are corrupt, and squares of 1e200 overflow a float ("Numerical result out of range").
MAX_SECONDS = 3600.0
MAX_BYTES = float(2**50)
MAX_HISTORY_BYTES = 64 * 1024 * 1024

RunKey = tuple[str, str, int]  # (stage, executor, batch bucket)


class PerfHistoryError(ValueError):
    """A saved history that cannot be understood."""


def batch_bucket(batch: int) -> int:
    """The next power of two >= ``batch``: run times are kept per bucket, not per exact size."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (batch - 1).bit_length()


@dataclass(frozen=True)
class RunEntry:
    mean_s: float
    count: int
    updated: float  # clock time of the last observation; the newer entry wins a merge


@dataclass(frozen=True)
class LinkEntry:
    """EWMA sufficient statistics of (bytes, seconds) pairs for a least-squares line."""

    mean_bytes: float
    mean_s: float
    mean_bytes_sq: float
    mean_bytes_s: float
    count: int
    updated: float

    @property
    def per_byte_s(self) -> float:
        """Seconds per byte, from the EWMA fit; falls back to mean time / mean size."""
        var = self.mean_bytes_sq - self.mean_bytes**2
        # All sizes (nearly) equal: no slope to fit, charge everything to bandwidth.
        if var <= (1e-6 * self.mean_bytes) ** 2:
            return self.mean_s / self.mean_bytes if self.mean_bytes > 0 else 0.0
        slope = (self.mean_bytes_s - self.mean_bytes * self.mean_s) / var
        if slope <= 0:
            return self.mean_s / self.mean_bytes if self.mean_bytes > 0 else 0.0
        if self.mean_s - slope * self.mean_bytes < 0:  # negative latency: keep the line through 0
            return self.mean_s / self.mean_bytes
        return slope

    @property
    def latency_s(self) -> float:
        return max(0.0, self.mean_s - self.per_byte_s * self.mean_bytes)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        per_byte = self.per_byte_s
        return math.inf if per_byte == 0 else 1.0 / per_byte


class PerfHistory:
    """EWMA run-time and transfer models; safe to update from several executor threads."""

    def __init__(
        self,
        alpha: float = 0.3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # ``updated`` stamps decide merges between worker processes and across restarts, so the
        # default clock is wall time: a monotonic clock restarts from zero at boot.
        if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.clock = clock
        self._runs: dict[RunKey, RunEntry] = {}
        self._links: dict[str, LinkEntry] = {}
        # (latency, seconds per byte) per link, refitted on each observation, not per prediction:
        # predictions sit on the request path, observations do not.
        self._fits: dict[str, tuple[float, float]] = {}
        # Latest bucket list per (stage, executor): unseen buckets are scaled from these.
        self._buckets: dict[tuple[str, str], tuple[int, ...]] = {}
        # When this process last measured each (stage, executor, bucket), kept as observations
        # land: the re-probe check reads it for every candidate of every placement (a stamp
        # recomputed per decision once cost 42% of one). Loaded and merged entries have none.
        self._confirmed: dict[RunKey, float] = {}
        self._lock = threading.Lock()

    # ---- observations -------------------------------------------------------------------

    def observe_run(self, stage: str, executor: str, batch: int, seconds: float) -> None:
        _check_duration(seconds)
        key = (stage, executor, batch_bucket(batch))
        now = self.clock()
        pair = (stage, executor)
        with self._lock:
            old = self._runs.get(key)
            ours = key in self._confirmed
            self._confirmed[key] = now
            if old is None:
                self._runs[key] = RunEntry(seconds, 1, now)
                self._buckets[pair] = tuple(sorted((*self._buckets.get(pair, ()), key[2])))
            else:
                # An old estimate gives way faster: a stale or inflated one cannot linger. One
                # loaded from a file was measured by another process, under other conditions:
                # the first run here replaces it (a 2 s poison is gone at once, not after
                # seven re-probes), and later runs average as usual.
                alpha = decayed_alpha(self.alpha, now - old.updated) if ours else 1.0
                mean = old.mean_s + alpha * (seconds - old.mean_s)
                self._runs[key] = RunEntry(mean, old.count + 1, now)

    def observe_transfer(self, link: str, nbytes: int, seconds: float) -> None:
        _check_duration(seconds)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if not link:
            return  # same device: nothing moved
        n, t = float(nbytes), float(seconds)
        now = self.clock()
        with self._lock:
            old = self._links.get(link)
            if old is None:
                entry = LinkEntry(n, t, n * n, n * t, 1, now)
            else:
                entry = _ewma_link(old, n, t, decayed_alpha(self.alpha, now - old.updated), now)
            self._links[link] = entry
            self._fits[link] = (entry.latency_s, entry.per_byte_s)

    # ---- predictions --------------------------------------------------------------------

    def predict_run(self, stage: str, executor: str, batch: int) -> float | None:
        """EWMA time of the batch's bucket; an unseen bucket is scaled per sample from the
        nearest seen one; None if this stage never ran on this executor."""
        bucket = batch_bucket(batch)
        entry = self._runs.get((stage, executor, bucket))
        if entry is not None:
            return entry.mean_s
        seen = self._buckets.get((stage, executor))
        if not seen:
            return None
        # Nearest in log2 distance; on a tie the smaller bucket (its per-sample time is the
        # higher, so the guess errs slow rather than luring work to an unmeasured size).
        nearest = min(seen, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), b))
        return self._runs[(stage, executor, nearest)].mean_s * bucket / nearest

    def predict_transfer(self, link: str, nbytes: int) -> float | None:
        """Predicted seconds to move ``nbytes`` over ``link``; 0.0 for "" (same device)."""
        if not link or nbytes == 0:
            return 0.0
        fit = self._fits.get(link)
        if fit is None:
            return None
        return fit[0] + fit[1] * nbytes

    def is_calibrated(self, stage: str, executor: str) -> bool:
        return bool(self._buckets.get((stage, executor)))

    def confirmed_at(self, key: RunKey) -> float | None:
        """When this process last measured ``(stage, executor, bucket)``; None if it has not:
        never run, known only from a saved history, or predicted by scaling another bucket."""
        return self._confirmed.get(key)

    def run_entry(self, stage: str, executor: str, batch: int) -> RunEntry | None:
        return self._runs.get((stage, executor, batch_bucket(batch)))

    def link_entry(self, link: str) -> LinkEntry | None:
        return self._links.get(link)

    # ---- merge and persistence ----------------------------------------------------------

    def merge(self, other: PerfHistory) -> PerfHistory:
        """A new history with every entry of both; for a key in both, the newer ``updated``
        wins (on a tie, ``self``'s). Nothing in it is confirmed: it is what gets saved."""
        merged = PerfHistory(self.alpha, self.clock)
        with self._lock:
            runs, links = dict(self._runs), dict(self._links)
        for key, entry in other._runs.items():
            if key not in runs or entry.updated > runs[key].updated:
                runs[key] = entry
        for link, link_entry in other._links.items():
            if link not in links or link_entry.updated > links[link].updated:
                links[link] = link_entry
        merged._set(runs, links)
        return merged

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            runs, links = sorted(self._runs.items()), sorted(self._links.items())
        return {
            "format": HISTORY_FORMAT,
            "version": HISTORY_VERSION,
            "alpha": self.alpha,
            "runs": [
                {"stage": s, "executor": e, "bucket": b, **_fields(entry)}
                for (s, e, b), entry in runs
            ],
            "links": [{"link": link, **_fields(entry)} for link, entry in links],
        }

    @classmethod
    def from_json(
        cls,
        data: Any,
        alpha: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> PerfHistory:
        if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT:
            raise PerfHistoryError("not a hetserve performance history (missing format marker)")
        if data.get("version") != HISTORY_VERSION:
            raise PerfHistoryError(f"history version {data.get('version')!r} is not supported")
        history = cls(data.get("alpha", 0.3) if alpha is None else alpha, clock)
        try:
            runs = {
                (str(r["stage"]), str(r["executor"]), _bucket(r["bucket"])): _run_entry(r)
                for r in data["runs"]
            }
            links = {str(r["link"]): _link_entry(r) for r in data["links"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise PerfHistoryError(f"malformed performance history entry: {exc!r}") from None
        # A stamp in the future would win every merge-on-save for ever: it counts as the oldest.
        now = history.clock()
        runs = {k: replace(e, updated=clamped_stamp(e.updated, now)) for k, e in runs.items()}
        links = {k: replace(e, updated=clamped_stamp(e.updated, now)) for k, e in links.items()}
        history._set(runs, links)
        return history

    def save(self, path: str | os.PathLike[str]) -> None:
        """Merge into the file under an exclusive lock, then replace it atomically.

        Several workers of one model share the file: each keeps the others' entries, and for a
        key both measured the newer one wins. The in-memory history is left as it is.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target):
            on_disk = _read_history(target, self.alpha, self.clock)
            _replace_json(target, on_disk.merge(self).to_json() if on_disk is not None else self.to_json())

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        alpha: float = 0.3,
        clock: Callable[[], float] = time.time,
    ) -> PerfHistory:
        """The saved history, or an empty one (with a warning) if the file is missing or bad."""
        history = _read_history(Path(path), alpha, clock)
        return history if history is not None else cls(alpha, clock)

    def _set(self, runs: dict[RunKey, RunEntry], links: dict[str, LinkEntry]) -> None:
        # Only for histories nobody reads yet (merge and load results): readers take no lock.
        # Their entries come from files or other histories: none is confirmed in this process.
        buckets: dict[tuple[str, str], list[int]] = {}
        for stage, executor, bucket in runs:
            buckets.setdefault((stage, executor), []).append(bucket)
        with self._lock:
            self._runs, self._links = runs, links
            self._fits = {k: (e.latency_s, e.per_byte_s) for k, e in links.items()}
            self._buckets = {pair: tuple(sorted(b)) for pair, b in buckets.items()}
            self._confirmed = {}


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive lock on ``target``'s lock file: one writer at a time across workers."""
    with open(target.with_name(target.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_json(target: Path, data: dict[str, Any]) -> None:
    """Write ``data`` next to ``target`` and rename it over ``target``: readers see all or none."""
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_history(path: Path, alpha: float, clock: Callable[[], float]) -> PerfHistory | None:
    try:
        if path.stat().st_size > MAX_HISTORY_BYTES:
            log.warning("ignoring performance history %s: over %d bytes; starting empty",
                        path, MAX_HISTORY_BYTES)
            return None
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read performance history %s (%s); starting empty", path, exc)
        return None
    try:
        return PerfHistory.from_json(json.loads(raw.decode("utf-8")), alpha=alpha, clock=clock)
    except (ValueError, UnicodeDecodeError, RecursionError, OverflowError) as exc:
        # JSONDecodeError is a ValueError; nesting 100,000 deep is a RecursionError. Any file
        # this cannot read starts the worker empty, with one warning that names file and cause.
        log.warning("ignoring corrupt performance history %s (%s: %s); starting empty",
                    path, type(exc).__name__, str(exc)[:200] or "no detail")
        return None


def _ewma_link(old: LinkEntry, n: float, t: float, a: float, now: float) -> LinkEntry:
    return LinkEntry(
        mean_bytes=old.mean_bytes + a * (n - old.mean_bytes),
        mean_s=old.mean_s + a * (t - old.mean_s),
        mean_bytes_sq=old.mean_bytes_sq + a * (n * n - old.mean_bytes_sq),
        mean_bytes_s=old.mean_bytes_s + a * (n * t - old.mean_bytes_s),
        count=old.count + 1,
        updated=now,
    )


def _check_duration(seconds: float) -> None:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"a duration must be a finite number >= 0, got {seconds!r}")


def _fields(entry: RunEntry | LinkEntry) -> dict[str, Any]:
    return asdict(entry)


def _bucket(value: Any) -> int:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"bucket {value!r} is not a power of two")
    return value


def _finite(value: Any, minimum: float = 0.0, maximum: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    if not math.isfinite(value) or not minimum <= value <= maximum:
        raise ValueError(f"{value!r} is out of range")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"count {value!r} is not a positive integer")
    count: int = value
    return count


def _run_entry(r: dict[str, Any]) -> RunEntry:
    return RunEntry(
        mean_s=_finite(r["mean_s"], maximum=MAX_SECONDS),
        count=_count(r["count"]),
        updated=_finite(r["updated"], -math.inf),
    )


def _link_entry(r: dict[str, Any]) -> LinkEntry:
    return LinkEntry(
        mean_bytes=_finite(r["mean_bytes"], maximum=MAX_BYTES),
        mean_s=_finite(r["mean_s"], maximum=MAX_SECONDS),
        mean_bytes_sq=_finite(r["mean_bytes_sq"], maximum=MAX_BYTES**2),
        mean_bytes_s=_finite(r["mean_bytes_s"], maximum=MAX_BYTES * MAX_SECONDS),
        count=_count(r["count"]),
        updated=_finite(r["updated"], -math.inf),
    )

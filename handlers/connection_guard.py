"""Keep the frontend's connection open for a moment after the worker dies (issue 17, item 1).

TorchServe 0.12's frontend drops, unanswered, every request its WorkerThread is still gathering
into a batch when the worker's connection closes: the close interrupts the gather while the
batch is not yet a request, and the thread's cleanup clears the gathered jobs without an answer
(pytorch/serve v0.12.0, WorkerThread.run: the "Worker disconnected" listener interrupts the thread
inside Model.pollBatch, and its finally answers only a non-null request before cleanJobs). That
window lasts up to maxBatchDelay and cannot be fixed from here.

What the handler can do is move the close out of that window. A small guard process, started
once per worker, holds duplicates of the worker's sockets and waits on a pipe whose only writer
is the worker. When the worker dies, however it dies (kill -9, out-of-memory killer, a crash in
native code), the pipe reads EOF; the guard keeps the sockets open for ``hold_s`` more, longer
than any gather, then exits. The frontend therefore finishes the batch it was gathering, sends it
to the dead worker, and only then sees the connection close: it answers every request of that
batch "500 Worker died." and restarts the worker ``hold_s`` later than it would have.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Margin on top of maxBatchDelay: the gather's end, the send and scheduling jitter.
HOLD_MARGIN_S = 0.5
# TorchServe's own default when model-config.yaml has no maxBatchDelay.
TORCHSERVE_MAX_BATCH_DELAY_MS = 100
# Tests and benchmarks only: set to "0" to measure what the guard prevents.
DISABLE_ENV = "HETSERVE_CONNECTION_GUARD"

# Runs in the guard: block until the worker (the pipe's only writer) is gone, hold, exit.
_GUARD_SCRIPT = (
    "import os, sys, time\n"
    "fd, hold = int(sys.argv[1]), float(sys.argv[2])\n"
    "while os.read(fd, 4096):\n"
    "    pass\n"
    "time.sleep(hold)\n"
)


def hold_seconds(model_yaml: object) -> float:
    """How long the guard keeps the connection after the worker died: one gather and a margin."""
    delay_ms: float = TORCHSERVE_MAX_BATCH_DELAY_MS
    if isinstance(model_yaml, dict):
        value = model_yaml.get("maxBatchDelay")
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            delay_ms = value
    return delay_ms / 1000.0 + HOLD_MARGIN_S


def socket_fds(fd_dir: Path = Path("/proc/self/fd")) -> list[int]:
    """This process's socket descriptors (the frontend's connection among them)."""
    fds = []
    for entry in fd_dir.iterdir():
        try:
            if os.readlink(entry).startswith("socket:"):
                fds.append(int(entry.name))
        except (OSError, ValueError):
            continue  # closed meanwhile (the listing's own descriptor)
    return sorted(fds)


class ConnectionGuard:
    """The guard process and the pipe end whose closing (the worker's death) starts its hold."""

    def __init__(self, process: subprocess.Popen[bytes], write_fd: int) -> None:
        self.process = process
        self._write_fd = write_fd

    @classmethod
    def start(cls, hold_s: float, fds: list[int] | None = None) -> ConnectionGuard | None:
        if os.environ.get(DISABLE_ENV, "1") == "0":
            log.warning("hetserve: connection guard disabled by %s=0", DISABLE_ENV)
            return None
        try:
            held = socket_fds() if fds is None else fds
            read_fd, write_fd = os.pipe()  # both non-inheritable; pass_fds passes only read_fd
        except OSError as exc:
            log.warning("hetserve: no connection guard (%s): a worker death while TorchServe "
                        "gathers a batch can leave its requests unanswered", exc)
            return None
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _GUARD_SCRIPT, str(read_fd), f"{hold_s:.3f}"],
                pass_fds=(read_fd, *held),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # Outside the worker's process group: a signal to the group spares the guard.
                start_new_session=True,
            )
        except OSError as exc:
            os.close(write_fd)
            log.warning("hetserve: no connection guard (%s)", exc)
            return None
        finally:
            os.close(read_fd)
        log.info("hetserve: connection guard pid %d holds %d socket(s) for %.2f s after a "
                 "worker death", process.pid, len(held), hold_s)
        return cls(process, write_fd)

    def stop(self) -> None:
        """Release the guard at once (an orderly unload: nothing is being gathered for us)."""
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)


# maxBatchDelay above this (with batchSize > 1) earns a warning when an archive is built.
RISKY_MAX_BATCH_DELAY_MS = 50


def batching_problems(model_yaml: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(warnings, errors) for the frontend batching settings of a model-config.yaml."""
    batch = model_yaml.get("batchSize", 1)
    delay = model_yaml.get("maxBatchDelay", TORCHSERVE_MAX_BATCH_DELAY_MS)
    timeout = model_yaml.get("responseTimeout", 120)
    if not isinstance(batch, int) or batch <= 1:
        return [], []
    if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
        return [], [f"maxBatchDelay must be a number of milliseconds >= 0, got {delay!r}"]
    hold = hold_seconds({"maxBatchDelay": delay})
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and hold >= timeout:
        return [], [
            f"maxBatchDelay {delay:g} ms: a worker death while TorchServe gathers a batch would "
            f"be answered after {hold:g} s, past responseTimeout ({timeout:g} s)"
        ]
    if delay > RISKY_MAX_BATCH_DELAY_MS:
        return [
            f"batchSize {batch} with maxBatchDelay {delay:g} ms: TorchServe 0.12 drops the "
            "requests it is gathering when a worker dies; hetserve's connection guard gets them a "
            f"500 instead, {hold:g} s later, and the worker restarts that much later. Keep "
            f"maxBatchDelay at or under {RISKY_MAX_BATCH_DELAY_MS} ms (the shipped config has 5)."
        ], []
    return [], []

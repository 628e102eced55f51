"""A batch's requests decoded side by side on a few threads, results handed back as they finish.

Decoding a photo is most of what a JPEG request costs (a 12 MP JPEG: hundreds of milliseconds
to decode and resize at full size), and Pillow's decode and resize, numpy's normalisation and
``tokenizers`` all release the GIL, so threads decode truly in parallel.

How many threads: TorchServe hands a worker one batch at a time, so while a batch decodes this
worker's executors have nothing to run; the cores they would use are free. The pool therefore
gets one thread per physical core of the worker's own share (what the CPU launcher's taskset
left it; ``decode_threads``). With one core the pool is off and decoding stays on the worker's
thread, as before. Threads are made on first use and sleep on a queue when idle: an idle worker
spends no CPU on them.

What goes to the pool: bodies of at least ``min_bytes``. A sentence tokenizes in about 0.1 ms,
roughly what handing it to another thread and back costs, so small bodies decode on the worker's
own thread while the pool works on the large ones.

Results stream back in completion order (``DecodeRun``) so that the caller can start running a
micro-batch whose requests are decoded while others are still decoding. ``decode`` must not
raise: it returns the request's tensors or its error, so a bad body fails only its own request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# Bodies below this decode on the worker's thread: a hand-off costs about as much as they do.
POOL_MIN_BYTES = 8 * 1024
# More threads than this only queue on the same memory bandwidth.
MAX_DECODE_THREADS = 8


def decode_threads(cores: int, decodes_bytes: bool) -> int:
    """Pool threads for a worker with ``cores`` physical cores; 0 (no pool) with one core, or
    when the archive has no image or text processor (tensor bodies cost little but a copy)."""
    if not decodes_bytes or cores < 2:
        return 0
    return min(cores, MAX_DECODE_THREADS)


class DecodeRun(Generic[Result]):
    """One batch's decodes: iterate for (index, result) as each finishes; ``pending`` says how
    many have not been handed out yet."""

    def __init__(self, inline: list[tuple[int, Result]], pooled: dict[Future[Result], int]) -> None:
        self._inline = inline
        self._pooled = pooled

    @property
    def pending(self) -> int:
        return len(self._inline) + len(self._pooled)

    def __iter__(self) -> Iterator[tuple[int, Result]]:
        while self._inline:
            yield self._inline.pop(0)
        while self._pooled:
            done, _ = wait(self._pooled, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=self._pooled.__getitem__):  # stable: request order
                index = self._pooled.pop(future)
                yield index, future.result()


class DecodePool:
    def __init__(self, threads: int, min_bytes: int = POOL_MIN_BYTES) -> None:
        self.threads = threads
        self.min_bytes = min_bytes
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="hetserve-decode") if threads > 1 else None
        )

    def start(
        self,
        items: Sequence[Item],
        decode: Callable[[Item], Result],
        size: Callable[[Item], int],
    ) -> DecodeRun[Result]:
        """Large items go to the pool first, then small ones decode here, on the caller's thread,
        while the pool works; nothing is decoded twice or dropped."""
        pooled: dict[Future[Result], int] = {}
        small = list(range(len(items)))
        if self._pool is not None:
            large = [i for i in small if size(items[i]) >= self.min_bytes]
            if len(large) > 1:  # one large body alone gains nothing from another thread
                pooled = {self._pool.submit(decode, items[i]): i for i in large}
                taken = set(large)
                small = [i for i in small if i not in taken]
        inline = [(i, decode(items[i])) for i in small]
        return DecodeRun(inline, pooled)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

"""Which decoded requests of a TorchServe batch share a run, and when each run may start.

Requests whose non-batch dims agree share one run. While the batch still decodes on the pool
(``handlers.decode_pool``), a shape group is released as soon as it holds ``early`` rows, the
size of the first micro-batch the runtime would have cut the whole batch into: that micro-batch
runs while its neighbours decode, and the rest of its shape keeps the same micro-batch size, so
the runs are the ones the runtime would have made, only started sooner. Text requests wait for
the whole batch: grouping them by length (``Processors.pad_texts``) needs every length.

Plain data in, plain data out; the service does the decoding and the running.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from handlers.processors import ProcessedRequest
from handlers.protocol.codecs import DecodedRequest

Group = list[tuple[int, DecodedRequest]]  # (request index in the batch, its tensors)
ShapeKey = tuple[Any, ...]


def shape_key(request: DecodedRequest) -> ShapeKey:
    """Requests with equal keys can share one run (dynamic dims may differ between keys)."""
    return tuple((name, a.shape[1:]) for name, a in sorted(request.arrays.items()))


def groups_by_shape(decoded: Group) -> list[Group]:
    groups: dict[ShapeKey, Group] = {}
    for index, request in decoded:
        groups.setdefault(shape_key(request), []).append((index, request))
    return list(groups.values())


def rows(group: Group) -> int:
    return sum(request.batch for _, request in group)


def is_text(request: DecodedRequest) -> bool:
    return isinstance(request, ProcessedRequest) and request.kind == "text"


def early_rows(first_micro_batch: int, requests: int, pool_threads: int) -> int:
    """Rows at which a shape group may start before the batch has decoded; 0: never (no pool
    to overlap with, or the runtime would run the whole batch as one micro-batch anyway)."""
    if pool_threads < 2 or requests < 2 or first_micro_batch >= requests:
        return 0
    return first_micro_batch


class ShapeGroups:
    """One batch's decoded requests gathered by shape as they arrive."""

    def __init__(self, early: int) -> None:
        self.early = early
        self._waiting: dict[ShapeKey, Group] = {}
        self._started: set[ShapeKey] = set()

    def add(self, index: int, request: DecodedRequest, still_decoding: bool) -> tuple[Group, int] | None:
        """(group, micro-batch rows) to start now, or None: keep gathering."""
        key = shape_key(request)
        group = self._waiting.setdefault(key, [])
        group.append((index, request))
        if not self.early or not still_decoding or is_text(request) or rows(group) < self.early:
            return None
        self._started.add(key)
        return self._waiting.pop(key), self.early

    def rest(self, pad_texts: Callable[[Group], Group] | None) -> list[tuple[Group, int]]:
        """Every group not started yet, texts padded (``pad_texts``) and regrouped by length;
        a shape that started early keeps its micro-batch size, the others the runtime's (0)."""
        waiting = [item for group in self._waiting.values() for item in group]
        self._waiting.clear()
        if pad_texts is not None:
            waiting = pad_texts(waiting)
        return [
            (group, self.early if shape_key(group[0][1]) in self._started else 0)
            for group in groups_by_shape(waiting)
        ]

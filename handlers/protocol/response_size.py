"""Responses too large for TorchServe (issue 17, item 6): refused with a 413, never sent.

TorchServe's frontend answers a worker reply over ``max_response_size`` (config.properties;
16 MiB by default) with "500 Worker died." and restarts the worker, failing the whole batch.
The handler cannot read config.properties, so ``limits.max_response_bytes`` mirrors it (same
default; raise both together). Before running, a request whose answer is certain to pass the
limit (the smallest encoding its outputs can have) gets a 413 and is left out of the batch, its
neighbours still run; after running, an encoded body over the limit is replaced by a 413 too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from handlers.artifact.manifest import TensorSpec

# TorchServe 0.12's default max_response_size.
TORCHSERVE_MAX_RESPONSE_SIZE = 16 * 2**20
# Fewest bytes one element takes in a JSON answer: "0.0," for floats, "0," otherwise.
_JSON_MIN_BYTES = {"f": 4}
_JSON_MIN_BYTES_OTHER = 2
JSON_FORMATS = ("json", "kservev2")


def sample_elements(spec: TensorSpec) -> int:
    """Elements per sample, counting a dynamic dimension as 1 (a lower bound)."""
    return math.prod(d if d is not None else 1 for d in spec.sample_shape)


def min_response_bytes(
    outputs: Sequence[TensorSpec], request_format: str, batch: int, names: Sequence[str] | None = None,
    binary: bool = False,
) -> int:
    """The fewest bytes the answer to ``batch`` samples can take in ``request_format``.

    ``binary``: a v2 request that asked for binary outputs (an element then takes its itemsize,
    fewer bytes than in JSON for 1- and 2-byte dtypes).
    """
    chosen = [s for s in outputs if names is None or s.name in names]
    if request_format not in JSON_FORMATS:
        sizes = [sample_elements(s) * np.dtype(s.dtype).itemsize for s in chosen]
        # Raw and .npy carry one tensor: without a name, the smallest is the bound.
        return batch * (min(sizes, default=0) if names is None else sum(sizes))
    return batch * sum(sample_elements(s) * _json_min_bytes(s, binary) for s in chosen)


def _json_min_bytes(spec: TensorSpec, binary: bool = False) -> int:
    json_min = _JSON_MIN_BYTES.get(np.dtype(spec.dtype).kind, _JSON_MIN_BYTES_OTHER)
    return min(json_min, np.dtype(spec.dtype).itemsize) if binary else json_min


def too_large_message(nbytes: int, limit: int, certain_before_running: bool) -> str:
    when = "would be at least" if certain_before_running else "is"
    return (
        f"the response {when} {nbytes} bytes, over the server's limit of {limit} "
        "(TorchServe's max_response_size, mirrored by hetserve limits.max_response_bytes): "
        "send fewer samples per request or ask for fewer outputs"
    )


def body_size(body: Any) -> int:
    return len(body) if isinstance(body, bytes | bytearray | str) else 0


def _raw_sample_bytes(spec: TensorSpec) -> int:
    return sample_elements(spec) * np.dtype(spec.dtype).itemsize


def archive_warnings(outputs: Sequence[TensorSpec], limits: Mapping[str, Any] | None) -> list[str]:
    """Warnings for ``hetserve archive``: a single sample whose raw answer passes the limit."""
    limit = int((limits or {}).get("max_response_bytes", TORCHSERVE_MAX_RESPONSE_SIZE))
    one = min_response_bytes(outputs, "raw", 1, [max(outputs, key=_raw_sample_bytes).name])
    if one <= limit:
        return []
    return [
        f"one sample's outputs take {one} bytes, over the response limit of {limit} "
        "(limits.max_response_bytes / TorchServe's max_response_size): every request would be "
        "refused with a 413; raise both limits together"
    ]

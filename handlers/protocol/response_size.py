"""Responses too large for TorchServe (issue 17, item 6; issue 22, item 5): a 413, never sent.

TorchServe's frontend answers a worker reply over ``max_response_size`` (config.properties;
6553500 bytes unless set, 16 MiB in the shipped config) with "500 Worker died." and restarts the
worker, failing the whole batch. hetserve's own ``limits.max_response_bytes`` keeps answers
under it: when the worker can read TorchServe's value (``handlers.frontend_limits``) and the
archive does not set its own, hetserve follows TorchServe's (one knob); an archive that sets it
gets the smaller of the two; when TorchServe's cannot be read, hetserve's (16 MiB default) holds.

Before running, a request whose answer is certain to pass the limit (the smallest encoding its
outputs can have) gets a 413 and is left out of the batch, its neighbours still run; after
running, an encoded body over the limit is replaced by a 413 too. The 413 names both limits with
their values and where each is raised, and the smaller encodings that would fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from handlers.artifact.manifest import TensorSpec
from handlers.errors import RequestError
from handlers.frontend_limits import FRONTEND_DEFAULT_MAX_RESPONSE_SIZE, FrontendLimit

if TYPE_CHECKING:
    from handlers.protocol.codec import DecodedRequest

# limits.max_response_bytes when unset: max_response_size in the shipped config.properties.
HETSERVE_DEFAULT_MAX_RESPONSE_BYTES = 16 * 2**20
HETSERVE_KNOB = "hetserve.limits.max_response_bytes"
JAVA_INT_MAX = 2**31 - 1  # TorchServe reads max_response_size as a Java int
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


@dataclass(frozen=True)
class ResponseLimit:
    """The answer size a worker may send, and where that number comes from."""

    hetserve_bytes: int = HETSERVE_DEFAULT_MAX_RESPONSE_BYTES  # limits.max_response_bytes
    hetserve_set: bool = False  # set in the archive's model-config.yaml, not the default
    torchserve: FrontendLimit | None = None  # TorchServe's max_response_size, if readable

    @property
    def bytes(self) -> int:
        if self.torchserve is None:
            return self.hetserve_bytes
        if not self.hetserve_set:  # one knob: TorchServe's
            return self.torchserve.bytes
        return min(self.hetserve_bytes, self.torchserve.bytes)

    @property
    def follows_torchserve(self) -> bool:
        return self.torchserve is not None and not self.hetserve_set

    def describe(self) -> str:
        """Both limits and their values (no server paths: a client reads this in a 413)."""
        own = f"{HETSERVE_KNOB}={self.hetserve_bytes}"
        if self.torchserve is None:
            return (
                f"{own} ({'archive' if self.hetserve_set else 'default'}); TorchServe's "
                f"max_response_size unknown (default {FRONTEND_DEFAULT_MAX_RESPONSE_SIZE})"
            )
        theirs = f"TorchServe's max_response_size={self.torchserve.bytes}"
        if self.follows_torchserve:
            return f"{theirs}, which hetserve follows ({HETSERVE_KNOB} is not set)"
        return f"{own} (archive), {theirs}"

    def log_line(self) -> str:
        """``describe`` plus where TorchServe's limit was read: for the worker's log."""
        source = f"; read from {self.torchserve.source}" if self.torchserve is not None else ""
        return f"answers up to {self.bytes} bytes: {self.describe()}{source}"


def too_large_message(
    nbytes: int,
    limit: ResponseLimit,
    certain_before_running: bool,
    request_format: str = "",
    binary_bytes: int | None = None,
    outputs: int = 1,
) -> str:
    """A 413's message: the size, both limits, how to raise each, and what would fit.

    ``binary_bytes``: the answer's tensors as binary (raw bytes, or a lower bound before
    running), for naming the smaller encodings; ``outputs``: how many it carries. Kept under
    ``handlers.errors.MESSAGE_CHARS`` (400) for the worst case.
    """
    when = "would be at least" if certain_before_running else "is"
    smaller = smaller_encodings(request_format, binary_bytes, outputs, limit.bytes, certain_before_running)
    return (
        f"the response {when} {nbytes} bytes, over the limit: "
        f"{limit.describe()}. {_how_to_raise(limit, min(_whole_mib(nbytes), JAVA_INT_MAX))}. "
        + (f"Fits: {smaller}." if smaller else "Or send fewer samples or ask for fewer outputs.")
    )


def _how_to_raise(limit: ResponseLimit, needed: int) -> str:
    torchserve = limit.torchserve is None or limit.torchserve.bytes < needed
    hetserve = not limit.follows_torchserve and limit.hetserve_bytes < needed
    rearchive = f"hetserve archive --set {HETSERVE_KNOB}={needed}"
    if torchserve and hetserve:
        return f"Raise both to {needed}: max_response_size (config.properties); {rearchive}"
    if hetserve:
        return f"Raise it: {rearchive}"
    return f"Raise it: max_response_size={needed} in config.properties"


def smaller_encodings(
    request_format: str, binary_bytes: int | None, outputs: int, limit: int, lower_bound: bool
) -> str:
    """The binary encoding of this answer, with its size, if it fits ``limit``; "" if not.

    A v2 answer can carry its tensors as binary blobs after a small JSON header; a JSON-tensor
    answer can be .npy (text and image requests: ``Accept: application/x-npy``; tensor requests
    are answered in their own encoding, so a .npy or raw request body).
    """
    if binary_bytes is None:
        return ""
    about = ">=" if lower_bound else "~"
    if request_format == "kservev2":
        size = binary_bytes + V2_HEADER_ALLOWANCE * outputs
        where = "binary v2 (parameters.binary_data_output: true)"
    elif request_format == "json":
        size = binary_bytes + NPY_HEADER_BYTES * outputs
        where = (
            ".npy (Accept: application/x-npy or a .npy body)" if outputs == 1
            else ".npy per output (Accept: application/x-npy, X-Output-Name)"
        )
    else:
        return ""
    return f"{where}, {about}{size} bytes" if size <= limit else ""


# A v2 binary answer's JSON header: name, datatype, shape and binary_data_size per output.
V2_HEADER_ALLOWANCE = 200
NPY_HEADER_BYTES = 128


def _whole_mib(nbytes: int) -> int:
    """``nbytes`` rounded up to a whole MiB: a limit to suggest."""
    return -(-nbytes // 2**20) * 2**20


def body_size(body: Any) -> int:
    return len(body) if isinstance(body, bytes | bytearray | str) else 0


def _raw_sample_bytes(spec: TensorSpec) -> int:
    return sample_elements(spec) * np.dtype(spec.dtype).itemsize


def archive_warnings(outputs: Sequence[TensorSpec], limits: Mapping[str, Any] | None) -> list[str]:
    """Warnings for ``hetserve archive``: a single sample whose raw answer passes the limit."""
    limit = int((limits or {}).get("max_response_bytes", HETSERVE_DEFAULT_MAX_RESPONSE_BYTES))
    one = min_response_bytes(outputs, "raw", 1, [max(outputs, key=_raw_sample_bytes).name])
    if one <= limit:
        return []
    return [
        f"one sample's outputs take {one} bytes, over the response limit of {limit} "
        f"({HETSERVE_KNOB}; when it is not set, TorchServe's max_response_size, or 16 MiB if "
        f"the worker cannot read that): every request would be refused with a 413; set "
        f"{HETSERVE_KNOB}={_whole_mib(one)} or more and TorchServe's max_response_size to match"
    ]


@dataclass(frozen=True)
class AnswerSizes:
    """One model's answers held to ``limit``: a 413 before running for a request whose answer
    cannot fit (``refusal``), and for an encoded answer that did not (``too_large``)."""

    outputs: Sequence[TensorSpec]
    limit: ResponseLimit

    def refusal(self, request: DecodedRequest) -> RequestError | None:
        least = min_response_bytes(
            self.outputs, request.format, request.batch, request.output_names,
            binary=request.binary_outputs.any,
        )
        if least <= self.limit.bytes:
            return None
        names = self._answered(request)
        binary = min_response_bytes(self.outputs, "raw", request.batch, names) if names else None
        return RequestError(413, too_large_message(least, self.limit, True, request.format, binary, len(names)))

    def too_large(self, size: int, outputs: Mapping[str, Any], request: DecodedRequest) -> RequestError:
        names = self._answered(request)
        binary = sum(int(getattr(outputs.get(name), "nbytes", 0)) for name in names) if names else None
        return RequestError(413, too_large_message(size, self.limit, False, request.format, binary, len(names)))

    def _answered(self, request: DecodedRequest) -> list[str]:
        """The outputs a request's answer carries; [] when they are binary already (a v2
        request that asked for binary outputs): no smaller encoding to name then."""
        names = list(request.output_names or [s.name for s in self.outputs])
        return [] if all(request.binary_outputs.wants(n) for n in names) else names

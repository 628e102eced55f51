"""The KServe v2 / Triton binary tensor extension: pure splitting and joining of bodies.

A binary request body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by
one blob per input whose ``parameters.binary_data_size`` says how many bytes it takes, in the
order the inputs are listed. Numeric blobs are little-endian tensor bytes in row-major order;
BYTES blobs are elements each prefixed by a 4-byte little-endian length. A binary response is
built the same way, with the header length in the response's ``Inference-Header-Content-Length``.

Every size a client claims is checked against the body before anything is sliced or allocated.
Standard library + numpy only: this module runs inside TorchServe workers.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handlers.protocol.validation import BAD_REQUEST, PAYLOAD_TOO_LARGE, RequestError, clip, quoted

# Triton's binary-tensor extension of v2: JSON header + raw blobs in one body.
V2_BINARY_HEADER = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
BINARY_CONTENT_TYPE = "application/octet-stream"

_LENGTH = struct.Struct("<I")
_DIGITS = re.compile(r"\s*(\d{1,15})\s*")


def header_length(value: str, body_bytes: int) -> int:
    """The JSON header's byte count from ``Inference-Header-Content-Length``, checked against the body."""
    match = _DIGITS.fullmatch(value)
    if match is None:
        raise RequestError(
            BAD_REQUEST, f"{V2_BINARY_HEADER} {quoted(value)} is not a byte count (a decimal integer)"
        )
    length = int(match.group(1))
    if not 0 < length <= body_bytes:
        raise RequestError(
            BAD_REQUEST,
            f"{V2_BINARY_HEADER} is {length} but the body has {body_bytes} bytes; it must count "
            "the JSON header's bytes (at least 1, at most the body's size)",
        )
    return length


def split_blobs(entries: list[Any], data: memoryview | bytes) -> dict[str, memoryview]:
    """Each binary input's blob out of ``data`` (the bytes after the JSON header), by input name.

    ``entries`` is the request's ``inputs`` list (names already checked to be unique strings).
    The declared sizes must add up to exactly ``len(data)``.
    """
    data = memoryview(data)
    blobs: dict[str, memoryview] = {}
    offset = 0
    for entry in entries:
        size = binary_size(entry)
        if size is None:
            continue
        name = entry["name"]
        if "data" in entry:
            raise RequestError(
                BAD_REQUEST, f"input {name!r}: has both 'data' and parameters.{BINARY_SIZE}; send one"
            )
        if size > len(data) - offset:
            raise RequestError(
                BAD_REQUEST,
                f"input {name!r}: {BINARY_SIZE} {size} runs past the end of the body "
                f"({len(data) - offset} bytes left after the header and the inputs before it)",
            )
        blobs[name] = data[offset : offset + size]
        offset += size
    if offset != len(data):
        raise RequestError(
            BAD_REQUEST,
            f"the inputs' {BINARY_SIZE} values add up to {offset} bytes but the body carries "
            f"{len(data)} bytes after the {V2_BINARY_HEADER} header",
        )
    return blobs


def binary_size(entry: Mapping[str, Any]) -> int | None:
    """An input's ``parameters.binary_data_size`` (None: its data is JSON), checked to be a count."""
    parameters = entry.get("parameters")
    if not isinstance(parameters, dict) or parameters.get(BINARY_SIZE) is None:
        return None
    size = parameters[BINARY_SIZE]
    if type(size) is not int or size < 0:
        raise RequestError(
            BAD_REQUEST,
            f"input {entry.get('name')!r}: parameters.{BINARY_SIZE} must be a non-negative "
            f"integer, got {quoted(size)}",
        )
    return size


def tensor_from_blob(name: str, blob: memoryview, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """A numeric blob as a read-only little-endian view, after checking its size against the shape."""
    if any(d < 0 for d in shape):  # callers check shapes; a negative one must never reshape
        raise RequestError(BAD_REQUEST, f"input {name!r}: shape {clip(str(shape))} has a negative dimension")
    count = 1
    for d in shape:
        count *= d
    needed = count * dtype.itemsize
    if needed != len(blob):
        raise RequestError(
            BAD_REQUEST,
            f"input {name!r}: shape {clip(str(shape))} of {dtype.name} needs {clip(str(needed))} "
            f"bytes, its {BINARY_SIZE} is {len(blob)}",
        )
    return np.frombuffer(blob, dtype=dtype.newbyteorder("<")).reshape(shape)


def bytes_elements(name: str, blob: memoryview | bytes, count: int, max_count: int) -> list[bytes]:
    """A BYTES blob's elements: ``count`` of them, each a 4-byte little-endian length + its bytes.

    ``max_count`` bounds how many a request may carry; it is checked before any is read.
    """
    if count > max_count:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"input {name!r}: {clip(str(count))} BYTES elements exceed the limit of {max_count}",
        )
    blob = memoryview(blob)
    elements: list[bytes] = []
    offset = 0
    for index in range(count):
        if len(blob) - offset < _LENGTH.size:
            raise RequestError(
                BAD_REQUEST,
                f"input {name!r}: BYTES element {index} has no 4-byte length (the blob ends "
                f"after {len(elements)} of {count} elements)",
            )
        (size,) = _LENGTH.unpack_from(blob, offset)
        offset += _LENGTH.size
        if size > len(blob) - offset:
            raise RequestError(
                BAD_REQUEST,
                f"input {name!r}: BYTES element {index} claims {size} bytes, only "
                f"{len(blob) - offset} are left in its blob",
            )
        elements.append(bytes(blob[offset : offset + size]))
        offset += size
    if offset != len(blob):
        raise RequestError(
            BAD_REQUEST,
            f"input {name!r}: {len(blob) - offset} bytes follow the last of its {count} BYTES "
            "elements; the shape and the blob disagree",
        )
    return elements


def join_bytes_elements(elements: list[bytes]) -> bytes:
    """The inverse of ``bytes_elements`` (what clients send; used by tests and tools)."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


# ---------------------------------------------------------------------------------------------
# outputs


@dataclass(frozen=True)
class BinaryOutputs:
    """Which outputs a request wants as binary blobs.

    ``default`` is the request's ``parameters.binary_data_output``; a requested output's own
    ``parameters.binary_data`` overrides it (Triton's rule, and what tritonclient sends).
    """

    default: bool = False
    per_output: Mapping[str, bool] = field(default_factory=dict)

    def wants(self, name: str) -> bool:
        return self.per_output.get(name, self.default)

    @property
    def any(self) -> bool:
        return self.default or any(self.per_output.values())


NO_BINARY = BinaryOutputs()


def binary_outputs(document: Mapping[str, Any]) -> BinaryOutputs:
    """The request's binary-output choice; flags must be JSON booleans."""
    parameters = document.get("parameters")
    default = False
    if isinstance(parameters, dict) and parameters.get("binary_data_output") is not None:
        default = _flag(parameters["binary_data_output"], "parameters.binary_data_output")
    per_output = {}
    requested = document.get("outputs")
    for entry in requested if isinstance(requested, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RequestError(BAD_REQUEST, "'outputs' must be a list of objects with a string 'name'")
        params = entry.get("parameters")
        if isinstance(params, dict) and params.get("binary_data") is not None:
            per_output[entry["name"]] = _flag(
                params["binary_data"], f"output {entry['name']!r}: parameters.binary_data"
            )
    if not default and not per_output:
        return NO_BINARY
    return BinaryOutputs(default, per_output)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(BAD_REQUEST, f"{what} must be true or false, got {quoted(value)}")
    return value


def binary_response(document: dict[str, Any], arrays: Mapping[str, np.ndarray], binary: BinaryOutputs) -> tuple[bytes, int]:
    """(body, JSON header length) for a v2 response ``document`` whose outputs carry JSON ``data``.

    Each output ``binary`` wants loses its ``data`` and gains ``parameters.binary_data_size``;
    its little-endian bytes follow the JSON header in output order.
    """
    blobs = []
    for output in document["outputs"]:
        name = output["name"]
        if not binary.wants(name):
            continue
        array = np.asarray(arrays[name])
        raw = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"), copy=False)).tobytes()
        output.pop("data", None)
        output["parameters"] = {**output.get("parameters", {}), BINARY_SIZE: len(raw)}
        blobs.append(raw)
    head = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([head, *blobs]), len(head)

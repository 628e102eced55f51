"""Where an ONNX file will make ONNX Runtime read from, found before ORT opens it.

A tensor stored as ONNX external data names a ``location`` that ORT joins to the model's
directory and reads (``../../etc/passwd``, an absolute path, or ORT's in-memory marker
``*/_ORT_MEM_ADDR_/*`` all work on a stock ORT). The handler therefore reads every tensor's
external-data entries itself and refuses the archive unless each location is a plain file name
of a verified archive file, with its byte range inside that file.

The ONNX protobuf is walked at the wire level (standard library only: the ``onnx`` package is not
a worker dependency). Only the fields that can hold a tensor are entered; everything else,
including inline weights, is skipped by length, so the walk costs time per message, not per byte.
Field numbers are those of onnx.proto3 (checked against the ``onnx`` package in the tests).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

# message kind -> {field number: child message kind}, for every path that reaches a TensorProto.
_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_LOCATION_EXTERNAL = 1
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# Subgraphs nest a few levels in real models; a deeper file is an attack on the walker.
MAX_NESTING = 64
KNOWN_KEYS = frozenset({"location", "offset", "length", "checksum"})


class UnsafeModelError(ValueError):
    """The ONNX file is malformed or points ORT at data outside the verified archive."""


@dataclass(frozen=True)
class ExternalRef:
    tensor: str
    entries: tuple[tuple[str, str], ...]
    marked_external: bool  # data_location == EXTERNAL


def external_refs(path: str | os.PathLike[str]) -> list[ExternalRef]:
    """Every tensor of the ONNX file at ``path`` that carries external-data entries or is
    marked external (initializers, sparse initializers, Constant attributes, subgraphs,
    functions)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise UnsafeModelError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _walk(view)
            finally:
                view.release()


def check_external_data(
    onnx_path: str, refs: list[ExternalRef], archive_files: Mapping[str, int]
) -> None:
    """Refuse ``refs`` (found in archive file ``onnx_path``) unless each names a plain file
    that ``archive_files`` (archive path -> verified size) lists, with a range inside it."""
    folder = PurePosixPath(onnx_path).parent
    for ref in refs:
        entries = dict(ref.entries)
        where = f"tensor {_short(ref.tensor)}"
        unknown = sorted(set(entries) - KNOWN_KEYS)
        if unknown:
            raise UnsafeModelError(f"{where}: unknown external-data key(s) {_short(unknown)}")
        location = entries.get("location")
        if location is None:
            raise UnsafeModelError(f"{where}: external data without a location")
        if not _plain_name(location):
            raise UnsafeModelError(
                f"{where}: external-data location {_short(location)} is not a plain file name "
                "inside the model directory"
            )
        target = str(folder / location)
        if target not in archive_files:
            raise UnsafeModelError(
                f"{where}: external-data file {_short(location)} is not listed in the manifest"
            )
        offset = _non_negative(entries.get("offset", "0"), where, "offset")
        length = entries.get("length")
        end = offset + (_non_negative(length, where, "length") if length is not None else 0)
        if end > archive_files[target]:
            raise UnsafeModelError(
                f"{where}: external-data range ends at byte {end}, past the end of {target!r} "
                f"({archive_files[target]} bytes)"
            )


def _plain_name(location: str) -> bool:
    return (
        bool(location)
        and location not in (".", "..")
        and all(sep not in location for sep in ("/", "\\", "\x00", ":"))
        and location.isprintable()
    )


def _non_negative(text: str, where: str, key: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise UnsafeModelError(f"{where}: external-data {key} {_short(text)} is not a byte count")
    return int(text)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- protobuf wire format ---------------------------------------------------------------------


def _walk(data: memoryview) -> list[ExternalRef]:
    found: list[ExternalRef] = []
    pending = [("model", 0, len(data), 0)]  # explicit stack: no recursion on hostile nesting
    while pending:
        kind, pos, end, depth = pending.pop()
        if depth > MAX_NESTING:
            raise UnsafeModelError(f"messages nest deeper than {MAX_NESTING} levels")
        if kind == "tensor":
            ref = _tensor(data, pos, end)
            if ref is not None:
                found.append(ref)
            continue
        children = _CHILDREN[kind]
        for field, start, stop in _fields(data, pos, end):
            child = children.get(field)
            if child is not None:
                if stop is None:
                    raise UnsafeModelError(f"field {field} of a {kind} message is not a message")
                pending.append((child, start, stop, depth + 1))
    return found


def _tensor(data: memoryview, pos: int, end: int) -> ExternalRef | None:
    name, entries, external = "?", [], False
    for field, start, stop in _fields(data, pos, end):
        if field == _TENSOR_NAME and stop is not None:
            name = _text(data, start, stop)
        elif field == _TENSOR_EXTERNAL_DATA and stop is not None:
            entries.append(_entry(data, start, stop))
        elif field == _TENSOR_DATA_LOCATION and stop is None:
            external = start == _LOCATION_EXTERNAL  # for varints ``start`` is the value
    if not entries and not external:
        return None
    return ExternalRef(name, tuple(entries), external)


def _entry(data: memoryview, pos: int, end: int) -> tuple[str, str]:
    key = value = ""
    for field, start, stop in _fields(data, pos, end):
        if field == _ENTRY_KEY and stop is not None:
            key = _text(data, start, stop)
        elif field == _ENTRY_VALUE and stop is not None:
            value = _text(data, start, stop)
    return key, value


def _fields(data: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int | None]]:
    """(field, start, stop) for length-delimited fields, (field, value, None) for varints;
    fixed-size fields are skipped."""
    while pos < end:
        tag, pos = _varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise UnsafeModelError("not a valid ONNX protobuf (field number 0)")
        if wire == _VARINT:
            value, pos = _varint(data, pos, end)
            yield field, value, None
        elif wire == _LENGTH:
            size, pos = _varint(data, pos, end)
            if size > end - pos:
                raise UnsafeModelError("not a valid ONNX protobuf (truncated)")
            yield field, pos, pos + size
            pos += size
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > end:
                raise UnsafeModelError("not a valid ONNX protobuf (truncated)")
        else:
            raise UnsafeModelError(f"not a valid ONNX protobuf (wire type {wire})")


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise UnsafeModelError("not a valid ONNX protobuf (truncated)")


def _text(data: memoryview, start: int, stop: int) -> str:
    try:
        return bytes(data[start:stop]).decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeModelError("not a valid ONNX protobuf (a string is not UTF-8)") from None

"""KServe v2 (Open Inference Protocol) bodies: decoding, responses, errors, envelope checks.

hetserve speaks v2 itself, with no TorchServe request envelope: TorchServe 0.12 hands the handler
the body of ``POST /v2/models/{name}/infer`` untouched, exactly as it does for
``POST /predictions/{name}``, and KServe's TorchServe runtime forwards v2 requests to one of the
two. Each request is decoded on its own (true shapes, the client's ``id``, requested outputs) and
answered on its own; errors use the protocol's ``{"error": message}``.

TorchServe's ``service_envelope=kservev2`` cannot be made correct from inside a handler: the
envelope (ts/torch_handler/request_envelope/kservev2.py) keeps only the first request of a batch,
names each output after an *input* and flattens every output's shape before the handler's answer
reaches the client. ``envelope_error`` lets the handler refuse every request of a batch such an
envelope (or any other) has rewritten, loudly, instead of answering some of them wrongly.

Standard library + numpy only: this module runs inside TorchServe workers.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from handlers.protocol.json_tensors import json_list, nested_to_array
from handlers.protocol.v2_binary import (
    BINARY_SIZE,
    NO_BINARY,
    BinaryOutputs,
    binary_outputs,
    binary_size,
    tensor_from_blob,
)
from handlers.protocol.v2_binary import (
    V2_BINARY_HEADER as V2_BINARY_HEADER,  # re-exported for the codecs and processors
)
from handlers.protocol.validation import (
    BAD_REQUEST,
    RequestError,
    RequestLimits,
    check_cast,
    check_element_budget,
    check_names,
    check_shape,
    clip,
    format_shape,
    name_list,
    quoted,
    validate_inputs,
)

if TYPE_CHECKING:
    from handlers.artifact.manifest import TensorSpec

FORMAT_V2 = "kservev2"

V2_TO_NUMPY = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2 = {numpy_name: v2 for v2, numpy_name in V2_TO_NUMPY.items()}

MAX_RANK = 32
MAX_V2_ID_CHARS = 256

# Said to every request of a batch that a TorchServe request envelope rewrote (see module doc).
ENVELOPE_MESSAGE = (
    "hetserve cannot run behind a TorchServe service_envelope (such as kservev2): the envelope "
    "keeps only the first request of a batch and flattens output shapes. Remove service_envelope "
    "(and TS_SERVICE_ENVELOPE) from the TorchServe configuration; hetserve answers KServe v2 "
    "itself on /v2/models/{name}/infer and /predictions/{name}"
)
ENVELOPE_STATUS = 500


@dataclass(frozen=True)
class V2Request:
    """A decoded v2 request: arrays in spec order with a leading batch dim, spec dtypes."""

    arrays: dict[str, np.ndarray]
    batch: int
    had_batch_dim: bool
    request_id: str | None
    output_names: tuple[str, ...] | None
    binary_outputs: BinaryOutputs = NO_BINARY


def envelope_error(data: Any, request_count: int | None) -> str | None:
    """``ENVELOPE_MESSAGE`` if TorchServe's batch was rewritten before reaching the handler.

    With body decoding off (the handler turns it off), TorchServe gives the handler one dict per
    request whose values are the raw bytes of the body (or of each form part, each query
    parameter). A stock envelope replaces that list: the kservev2 one with the first request's
    input dicts, the body one with bare payloads (the json one cannot parse bytes and fails in
    TorchServe before the handler). ``request_count`` is how many requests TorchServe batched
    (``len(context.request_ids)``; None: unknown).
    """
    if not isinstance(data, list):
        return ENVELOPE_MESSAGE
    if request_count is not None and len(data) != request_count:
        return ENVELOPE_MESSAGE
    for item in data:
        if not isinstance(item, dict):
            return ENVELOPE_MESSAGE
        if not all(isinstance(value, (bytes, bytearray)) for value in item.values()):
            return ENVELOPE_MESSAGE
    return None


def is_v2_document(document: Any) -> bool:
    """A JSON object shaped like a v2 request (``inputs`` is a list of objects)."""
    if not isinstance(document, dict):
        return False
    entries = document.get("inputs")
    return isinstance(entries, list) and (not entries or isinstance(entries[0], dict))


def decode_v2(
    document: dict[str, Any],
    inputs: Sequence[TensorSpec],
    limits: RequestLimits,
    outputs: Sequence[TensorSpec] | None = None,
    blobs: Mapping[str, memoryview] | None = None,
) -> V2Request:
    """Validate one v2 request; every ``RequestError`` it raises is marked as a v2 one.

    ``blobs``: the binary inputs' bytes when the body used the binary tensor extension
    (``v2_binary.split_blobs``); None for a JSON-only body.
    """
    try:
        return _decode(document, tuple(inputs), limits, outputs, blobs)
    except RequestError as err:
        err.request_format = FORMAT_V2
        raise


def _decode(
    document: dict[str, Any],
    inputs: tuple[TensorSpec, ...],
    limits: RequestLimits,
    outputs: Sequence[TensorSpec] | None,
    blobs: Mapping[str, memoryview] | None,
) -> V2Request:
    request_id = document.get("id")
    if request_id is not None and (
        not isinstance(request_id, str) or len(request_id) > MAX_V2_ID_CHARS
    ):
        raise RequestError(BAD_REQUEST, f"'id' must be a string of at most {MAX_V2_ID_CHARS} chars")
    # null stands for an absent optional field: pydantic-based clients (kserve's own v2 models)
    # send "parameters": null and "outputs": null unless told otherwise.
    if document.get("parameters") is not None and not isinstance(document["parameters"], dict):
        raise RequestError(BAD_REQUEST, "'parameters' must be an object")
    entries = document["inputs"]
    if not entries:
        raise RequestError(BAD_REQUEST, "'inputs' is empty")
    names = check_entries(entries)
    check_names(names, inputs)
    specs = {spec.name: spec for spec in inputs}
    budget = limits.max_elements
    candidates = {}
    for entry in entries:
        array = _tensor(entry, specs[entry["name"]], budget, limits, blobs)
        budget -= array.size
        candidates[entry["name"]] = array
    arrays, batch, had_batch_dim = validate_inputs(candidates, inputs, limits)
    requested = _requested_outputs(document.get("outputs"), outputs)
    return V2Request(arrays, batch, had_batch_dim, request_id, requested, binary_outputs(document))


def check_entries(entries: list[Any]) -> list[str]:
    """The inputs' names, each entry checked to be an object with a unique string name."""
    names: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RequestError(
                BAD_REQUEST, f"inputs[{index}] must be an object with a string 'name'"
            )
        if entry["name"] in names:
            raise RequestError(BAD_REQUEST, f"input {quoted(entry['name'])} is given twice")
        names.append(entry["name"])
    return names


def check_v2_shape(name: str, shape: Any) -> list[int]:
    """A v2 input's ``shape``: a list of at most MAX_RANK non-negative integers (no -1: a
    request's shape is its data's, never a pattern)."""
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise RequestError(
            BAD_REQUEST,
            f"input {quoted(name)}: 'shape' must be a list of non-negative integers (at most "
            f"{MAX_RANK}), got {quoted(shape)}",
        )
    return shape


def _tensor(
    entry: dict[str, Any],
    spec: TensorSpec,
    budget: int,
    limits: RequestLimits,
    blobs: Mapping[str, memoryview] | None,
) -> np.ndarray:
    name = spec.name
    datatype = entry.get("datatype")
    expected = NUMPY_TO_V2[spec.dtype]
    if datatype == "BYTES":
        raise RequestError(
            BAD_REQUEST, f"input {name!r}: BYTES tensors are not supported; send {expected}"
        )
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise RequestError(
            BAD_REQUEST,
            f"input {name!r}: unknown datatype {quoted(datatype)}; this input expects {expected}",
        )
    source = np.dtype(V2_TO_NUMPY[datatype])
    check_cast(name, source, np.dtype(spec.dtype))
    shape = check_v2_shape(name, entry.get("shape"))
    count = math.prod(shape)
    check_element_budget(name, count, budget)
    if binary_size(entry) is not None:
        if blobs is None:
            raise RequestError(
                BAD_REQUEST,
                f"input {name!r}: parameters.{BINARY_SIZE} is set but the request has no "
                f"{V2_BINARY_HEADER} header; send the header (the JSON part's byte count) "
                "or the data as JSON",
            )
        check_shape(spec, shape, limits)
        return tensor_from_blob(name, blobs[name], source, shape)
    if "data" not in entry:
        raise RequestError(BAD_REQUEST, f"input {name!r}: 'data' is missing")
    data = entry["data"]
    flat_or_nested = data if isinstance(data, list) else [data]
    array = nested_to_array(flat_or_nested, name, source, max(len(shape), 1), budget)
    if array.size != count:
        raise RequestError(
            BAD_REQUEST,
            f"input {name!r}: shape {clip(format_shape(shape))} needs {count} values, "
            f"'data' has {array.size}",
        )
    check_shape(spec, shape, limits)
    return array.reshape(shape)


def _requested_outputs(
    value: Any, outputs: Sequence[TensorSpec] | None
) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in value
    ):
        raise RequestError(BAD_REQUEST, "'outputs' must be a list of objects with a string 'name'")
    names = tuple(dict.fromkeys(o["name"] for o in value))
    for name in names:
        check_output_name(name, outputs)
    return names or None


def check_output_name(name: str, outputs: Sequence[TensorSpec] | None) -> None:
    known = [spec.name for spec in outputs or ()]
    if outputs is not None and name not in known:
        raise RequestError(
            BAD_REQUEST,
            f"unknown output {quoted(name)}; the model's outputs are {name_list(known)}",
        )


# ---------------------------------------------------------------------------------------------
# encoding


def v2_response(
    arrays: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    binary: BinaryOutputs = NO_BINARY,
) -> dict[str, Any]:
    """The v2 response document; ``arrays`` are already this request's rows, in order.

    Outputs ``binary`` wants get no JSON ``data`` here (``v2_binary.binary_response`` adds
    their blobs).

    ``id`` is always present: the protocol's response schema requires it (KServe's own
    ``InferenceResponse`` model refuses a response without one), so a request that sent none
    gets a fresh one.
    """
    response: dict[str, Any] = {"id": request_id if request_id is not None else str(uuid.uuid4())}
    response["model_name"] = model_name
    if model_version is not None:
        response["model_version"] = model_version
    response["outputs"] = [
        {
            "name": name,
            "datatype": NUMPY_TO_V2[a.dtype.name],
            "shape": list(a.shape),
            **({} if binary.wants(name) else {"data": json_list(a.reshape(-1))}),
        }
        for name, a in arrays.items()
    ]
    return response


def v2_error(message: str) -> dict[str, str]:
    return {"error": message}

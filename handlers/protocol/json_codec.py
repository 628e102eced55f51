"""Plain JSON tensors: {"input name": nested lists}, or a bare nested list for a single-input
model; answered as {"outputs": {"name": nested lists}}."""

from __future__ import annotations

import numpy as np

from handlers.protocol.body import JSON_CONTENT_TYPE, stamp
from handlers.protocol.codec import (
    FORMAT_JSON,
    BodyRequest,
    Codec,
    DecodedRequest,
    EncodedResponse,
    ResponseMeta,
    dumps,
)
from handlers.protocol.json_tensors import json_list, nested_to_array
from handlers.protocol.validation import (
    BAD_REQUEST,
    RequestError,
    check_names,
    name_list,
    validate_inputs,
)


class JsonCodec(Codec):
    format = FORMAT_JSON

    def matches(self, request: BodyRequest) -> bool:
        return not request.is_bytes  # any other parsed JSON document

    def decode(self, request: BodyRequest) -> DecodedRequest:
        return _decode_plain_json(request)

    def encode(
        self, arrays: dict[str, np.ndarray], request: DecodedRequest, meta: ResponseMeta
    ) -> EncodedResponse:
        body = {"outputs": {name: json_list(a) for name, a in arrays.items()}}
        return EncodedResponse(dumps(body), JSON_CONTENT_TYPE)


@stamp(FORMAT_JSON)
def _decode_plain_json(request: BodyRequest) -> DecodedRequest:
    value, inputs, limits = request.body, request.inputs, request.limits
    if isinstance(value, dict):
        check_names(value.keys(), inputs)
        given = value
    elif len(inputs) == 1:
        given = {inputs[0].name: value}
    else:
        raise RequestError(
            BAD_REQUEST,
            "a bare JSON array or value is accepted only for single-input models; send an object "
            f"mapping each input ({name_list(s.name for s in inputs)}) to its array",
        )
    budget = limits.max_elements
    candidates = {}
    for spec in inputs:
        dtype = np.dtype(spec.dtype)
        array = nested_to_array(given[spec.name], spec.name, dtype, len(spec.shape), budget)
        budget -= array.size
        candidates[spec.name] = array
    arrays, batch, had_batch_dim = validate_inputs(candidates, inputs, limits)
    return DecodedRequest(arrays, batch, FORMAT_JSON, had_batch_dim)

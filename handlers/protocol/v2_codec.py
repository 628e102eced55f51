"""The KServe v2 (Open Inference Protocol) codec: JSON documents, and the binary tensor
extension (a body with an ``Inference-Header-Content-Length`` header: JSON header + blobs).

The protocol's documents live in ``protocol/kserve_v2.py``, the extension's byte layout in
``protocol/v2_binary.py``; this module is the codec over them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from handlers.protocol.body import JSON_CONTENT_TYPE, header, parse_json, stamp
from handlers.protocol.codec import (
    BodyRequest,
    Codec,
    DecodedRequest,
    EncodedResponse,
    ResponseMeta,
    dumps,
)
from handlers.protocol.kserve_v2 import (
    FORMAT_V2,
    V2_BINARY_HEADER,
    check_entries,
    decode_v2,
    is_v2_document,
    v2_error,
    v2_response,
)
from handlers.protocol.v2_binary import (
    BINARY_CONTENT_TYPE,
    binary_response,
    header_length,
    split_blobs,
)
from handlers.protocol.validation import BAD_REQUEST, RequestError, RequestLimits


class KServeV2Codec(Codec):
    """A v2 document, or a binary-extension body (its header claims the body whatever the
    content type says)."""

    format = FORMAT_V2

    def matches(self, request: BodyRequest) -> bool:
        if request.is_bytes:
            return header(request.headers, V2_BINARY_HEADER) is not None
        return is_v2_document(request.body)

    def decode(self, request: BodyRequest) -> DecodedRequest:
        blobs = None
        document = request.body
        if request.is_bytes:
            document, blobs = split_v2_binary(request.body, request.headers, request.limits)
        return self.decode_document(request, document, blobs)

    def decode_document(
        self, request: BodyRequest, document: dict[str, Any], blobs: Mapping[str, memoryview] | None
    ) -> DecodedRequest:
        """A v2 document (and its binary inputs' blobs) into tensors."""
        v2 = decode_v2(document, request.inputs, request.limits, request.outputs, blobs)
        return DecodedRequest(
            v2.arrays, v2.batch, FORMAT_V2, v2.had_batch_dim, v2.request_id, v2.output_names,
            v2.binary_outputs,
        )

    def encode(
        self, arrays: dict[str, np.ndarray], request: DecodedRequest, meta: ResponseMeta
    ) -> EncodedResponse:
        binary = request.binary_outputs
        response = v2_response(
            arrays, model_name=meta.model_name, model_version=meta.model_version,
            request_id=meta.request_id, binary=binary,
        )
        if not any(binary.wants(name) for name in arrays):
            return EncodedResponse(dumps(response), JSON_CONTENT_TYPE)
        body, json_bytes = binary_response(response, arrays, binary)
        return EncodedResponse(body, BINARY_CONTENT_TYPE, {V2_BINARY_HEADER: str(json_bytes)})

    def error(self, err: RequestError) -> EncodedResponse:
        return EncodedResponse(dumps(v2_error(err.message)), JSON_CONTENT_TYPE, {}, err.status)


@stamp(FORMAT_V2)
def split_v2_binary(
    body: bytes | bytearray, headers: Mapping[str, Any] | None, limits: RequestLimits
) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """A binary-extension body -> (its v2 JSON header, each binary input's blob by name)."""
    length = header_length(header(headers, V2_BINARY_HEADER) or "", len(body))
    document = parse_json(body[:length], limits)
    if not is_v2_document(document):
        raise RequestError(
            BAD_REQUEST,
            f"the {length}-byte JSON header ({V2_BINARY_HEADER}) is not a KServe v2 request: "
            '"inputs" must be a list of tensor objects',
        )
    check_entries(document["inputs"])
    return document, split_blobs(document["inputs"], memoryview(body)[length:])

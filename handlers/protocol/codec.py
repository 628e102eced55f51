"""What every codec shares: the request it is handed, what it decodes to, what it answers.

A ``Codec`` is one body format. ``matches`` and ``decode`` see one ``BodyRequest`` (the body as
bytes, or for the JSON family the parsed document, with its media type, headers, query
parameters, the model's input and output specs and the limits); ``encode`` answers a decoded
request's outputs with one ``ResponseMeta``. ``handlers.protocol.codecs.RequestDecoder`` runs
the list: the first codec whose ``matches`` says yes decodes the request.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from handlers.protocol.body import JSON_CONTENT_TYPE
from handlers.protocol.v2_binary import NO_BINARY, BinaryOutputs
from handlers.protocol.validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
    RequestLimits,
)

if TYPE_CHECKING:
    from handlers.artifact.manifest import TensorSpec

FORMAT_JSON = "json"

_ERROR_TYPES = {
    BAD_REQUEST: "BadRequest",
    PAYLOAD_TOO_LARGE: "PayloadTooLarge",
    UNSUPPORTED_MEDIA_TYPE: "UnsupportedMediaType",
}


@dataclass(frozen=True)
class BodyRequest:
    """One request as a codec sees it: ``body`` is bytes, or a parsed JSON document."""

    body: Any
    media: str | None
    headers: Mapping[str, Any] | None
    inputs: tuple[TensorSpec, ...]
    limits: RequestLimits
    outputs: Sequence[TensorSpec] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)  # query parameters and form fields

    @property
    def is_bytes(self) -> bool:
        return isinstance(self.body, (bytes, bytearray))

    def with_body(self, body: Any) -> BodyRequest:
        return dataclasses.replace(self, body=body)


@dataclass(frozen=True)
class DecodedRequest:
    """One request's tensors, each with a leading batch dim and exactly its spec's dtype.

    Arrays may be read-only views of the request body (raw and .npy decode without copying).
    """

    arrays: dict[str, np.ndarray]
    batch: int
    format: str
    had_batch_dim: bool
    request_id: str | None = None  # KServe v2 "id"
    output_names: tuple[str, ...] | None = None  # v2 "outputs" or X-Output-Name; None: default
    binary_outputs: BinaryOutputs = NO_BINARY  # v2: outputs to answer as binary blobs


@dataclass(frozen=True)
class EncodedResponse:
    body: bytes | str | dict[str, Any] | list[Any]
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass(frozen=True)
class ResponseMeta:
    """What an answer names besides the tensors (KServe v2 echoes all three)."""

    model_name: str = ""
    model_version: str | None = None
    request_id: str | None = None


class Codec:
    """One body format: which requests are its own, how to decode them, how to answer them.

    A codec that only decodes (images, text) makes requests in another codec's ``format``,
    which answers them.
    """

    format = ""
    one_tensor = False  # raw and .npy bodies carry a single tensor each way

    def matches(self, request: BodyRequest) -> bool:
        raise NotImplementedError

    def decode(self, request: BodyRequest) -> DecodedRequest:
        raise NotImplementedError

    def encode(
        self, arrays: dict[str, np.ndarray], request: DecodedRequest, meta: ResponseMeta
    ) -> EncodedResponse:
        raise NotImplementedError

    def error(self, err: RequestError) -> EncodedResponse:
        """A client error as JSON (every format but KServe v2 answers errors this way)."""
        body = {
            "code": err.status,
            "type": _ERROR_TYPES.get(err.status, "RequestError"),
            "message": err.message,
        }
        return EncodedResponse(dumps(body), JSON_CONTENT_TYPE, {}, err.status)


def dumps(document: Any) -> str:
    return json.dumps(document, separators=(",", ":"), allow_nan=False)

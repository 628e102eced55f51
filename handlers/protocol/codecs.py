"""Request bodies in, validated numpy arrays out; model outputs back into response bodies.

Body formats (``DecodedRequest.format``), told apart by the body first and the content type next:
  "npz"       a .npz file (zip magic or application/x-npz): one member per input, named by it
              (``protocol/npz_codec.py``)
  "npy"       a .npy file (starts with the NumPy magic), whatever the content type
  "raw"       ``application/octet-stream``: little-endian tensor bytes, described by the headers
              X-Tensor-Shape, X-Tensor-Dtype and X-Tensor-Name (both: ``protocol/tensor_codecs.py``)
  "kservev2"  Open Inference Protocol JSON, or its binary tensor extension (``protocol/v2_codec.py``)
  "json"      {"input name": nested lists}, or a bare nested list (``protocol/json_codec.py``)
Responses mirror the request's format. An archive's processors add codecs of their own (images,
text, KServe v2 BYTES inputs: ``handlers/processors/codecs.py``) to the same list.

``RequestDecoder`` is the one decoder every request goes through: it reads the media type and
the body once (``protocol/body.py``), refuses empty, compressed and oversized bodies, picks the
first codec of its list whose ``matches`` takes the bytes (or, for the JSON family, the parsed
document), and checks the decoded tensors against the archive's dynamic dims. Only RequestError
leaves it for anything the client sent. Standard library + numpy only: this module runs inside
TorchServe workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from handlers.protocol.body import (
    JSON_CONTENT_TYPE,
    JSON_START,
    RAW_CONTENT_TYPE,
    body_bytes,
    empty_body_message,
    header,
    is_json_media,
    json_nesting_depth,
    media_type,
    on_kserve_route,
    parse_json,
    refuse_content_encoding,
)
from handlers.protocol.codec import (
    FORMAT_JSON,
    BodyRequest,
    Codec,
    DecodedRequest,
    EncodedResponse,
    ResponseMeta,
)
from handlers.protocol.dynamic_dims import DynamicDims, check_dynamic_dims
from handlers.protocol.json_codec import JsonCodec
from handlers.protocol.json_tensors import nested_to_array
from handlers.protocol.kserve_v2 import FORMAT_V2, NUMPY_TO_V2, V2_TO_NUMPY, is_v2_document
from handlers.protocol.npz_codec import FORMAT_NPZ, NPZ_CONTENT_TYPE, OUTPUT_HEADER, NpzCodec
from handlers.protocol.tensor_codecs import (
    FORMAT_NPY,
    FORMAT_RAW,
    NPY_CONTENT_TYPE,
    NPY_CONTENT_TYPES,
    NPY_MAGIC,
    NpyCodec,
    RawCodec,
)
from handlers.protocol.v2_codec import KServeV2Codec, split_v2_binary
from handlers.protocol.validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
    RequestLimits,
    name_list,
    quoted,
)

if TYPE_CHECKING:
    from handlers.artifact.manifest import TensorSpec

__all__ = [
    "CODECS",
    "FORMAT_JSON",
    "FORMAT_NPY",
    "FORMAT_NPZ",
    "FORMAT_RAW",
    "FORMAT_V2",
    "JSON_CONTENT_TYPE",
    "NPY_CONTENT_TYPE",
    "NPY_MAGIC",
    "NUMPY_TO_V2",
    "RAW_CONTENT_TYPE",
    "V2_TO_NUMPY",
    "BodyRequest",
    "Codec",
    "DecodedRequest",
    "EncodedResponse",
    "RequestDecoder",
    "RequestError",
    "RequestLimits",
    "ResponseMeta",
    "decode_request",
    "encode_error",
    "encode_response",
    "header",
    "json_nesting_depth",
    "nested_to_array",
    "on_kserve_route",
    "split_v2_binary",
]

JSON_CODEC = JsonCodec()
# In the order they are tried; the JSON family last, on the parsed document. The v2 binary
# extension goes first: its header is explicit, whatever the content type says.
CODECS: tuple[Codec, ...] = (KServeV2Codec(), NpzCodec(), NpyCodec(), RawCodec(), JSON_CODEC)
_BY_FORMAT = {codec.format: codec for codec in CODECS}


class RequestDecoder:
    """One model's decoder: its specs, limits, dynamic dims and codecs, fixed at load."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        limits: RequestLimits,
        outputs: Sequence[TensorSpec] | None = None,
        codecs: Sequence[Codec] = CODECS,
        dims: DynamicDims | None = None,
    ) -> None:
        if not inputs:
            raise ValueError("the model declares no inputs")
        self.inputs = tuple(inputs)
        self.limits = limits
        self.outputs = outputs
        self.codecs = tuple(codecs)
        self.dims = dims or DynamicDims()

    def decode(
        self,
        body: bytes | bytearray | memoryview | str | dict[str, Any] | list[Any] | None,
        content_type: str | None,
        headers: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> DecodedRequest:
        """Decode and validate one request; raises only ``RequestError`` for client mistakes.

        ``body`` is what TorchServe hands the handler: bytes, or an object/str it already decoded.
        ``content_type`` wins over a Content-Type in ``headers``; header names match in any case.
        A request that came in on TorchServe's KServe routes has its errors in KServe's form.
        """
        try:
            decoded = self._decode(body, content_type, headers, params or {})
        except RequestError as err:
            if on_kserve_route(headers):
                err.request_format = FORMAT_V2
            raise
        check_dynamic_dims(self.dims, decoded.arrays)
        return decoded

    def _decode(
        self, body: Any, content_type: str | None, headers: Mapping[str, Any] | None,
        params: Mapping[str, Any],
    ) -> DecodedRequest:
        media = media_type(content_type) or media_type(header(headers, "content-type"))
        body = body_bytes(body)
        if body is None or (isinstance(body, (bytes, bytearray)) and not body):
            raise RequestError(BAD_REQUEST, empty_body_message(media))
        refuse_content_encoding(body, media, headers)
        request = BodyRequest(body, media, headers, self.inputs, self.limits, self.outputs, params)
        if not request.is_bytes:
            return self._decode_document(request)  # decoded by TorchServe already
        if len(body) > self.limits.max_body_bytes:
            raise RequestError(
                PAYLOAD_TOO_LARGE,
                f"request body of {len(body)} bytes exceeds the limit of {self.limits.max_body_bytes}",
            )
        codec = next((c for c in self.codecs if c.matches(request)), None)
        if codec is not None:
            return codec.decode(request)
        if media in NPY_CONTENT_TYPES:
            raise RequestError(BAD_REQUEST, "body is not a .npy file (no NumPy magic at its start)")
        if is_json_media(media) or JSON_START.match(body):
            return self._decode_document(request.with_body(parse_json(body, self.limits)))
        shown = "none given" if media is None else quoted(media)
        raise RequestError(
            UNSUPPORTED_MEDIA_TYPE,
            f"unsupported content type ({shown}) for a non-JSON body; send application/json, "
            f"{RAW_CONTENT_TYPE} (raw tensor), {NPY_CONTENT_TYPE} or {NPZ_CONTENT_TYPE}",
        )

    def _decode_document(self, request: BodyRequest) -> DecodedRequest:
        """A parsed JSON document: the JSON-family codec whose shape it has decodes it."""
        value = request.body
        if isinstance(value, dict) and "inputs" in value and not is_v2_document(value) and not any(
            spec.name == "inputs" for spec in self.inputs
        ):
            # A v2 request gone wrong, not a plain one: answer in v2's form, naming the field.
            raise RequestError(
                BAD_REQUEST,
                'KServe v2 request: "inputs" must be a list of tensor objects '
                f'({{"name", "shape", "datatype", "data"}}), got {type(value["inputs"]).__name__}',
                FORMAT_V2,
            )
        codec = next(c for c in self.codecs if c.matches(request))
        return codec.decode(request)


def decode_request(
    body: bytes | bytearray | memoryview | str | dict[str, Any] | list[Any] | None,
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    inputs: Sequence[TensorSpec],
    limits: RequestLimits,
    *,
    outputs: Sequence[TensorSpec] | None = None,
) -> DecodedRequest:
    """``RequestDecoder.decode`` with the tensor codecs alone and no dynamic dims declared.

    ``outputs``, when given, lets requested output names be checked before inference.
    """
    return RequestDecoder(inputs, limits, outputs).decode(body, content_type, headers)


def encode_response(
    outputs: Mapping[str, np.ndarray],
    request: DecodedRequest,
    output_specs: Sequence[TensorSpec] | None = None,
    *,
    model_name: str = "",
    model_version: str | None = None,
    request_id: str | None = None,
) -> EncodedResponse:
    """This request's slice of the outputs (leading dim == ``request.batch``) in its format.

    ``request_id`` is the v2 response id when the request carried none (e.g. TorchServe's).
    Raises ``RequestError`` (400) for an unknown requested output, ``ValueError`` for outputs
    that do not match the request (a server bug, not the client's).
    """
    codec = _BY_FORMAT.get(request.format)
    if codec is None:
        raise ValueError(f"unknown request format {request.format!r}")
    names = _response_names(outputs, request, output_specs, codec)
    arrays = {name: _unbatched(name, outputs[name], request) for name in names}
    if request.request_id is not None:
        request_id = request.request_id
    return codec.encode(arrays, request, ResponseMeta(model_name, model_version, request_id))


def encode_error(err: RequestError, request_format: str | None = None) -> EncodedResponse:
    """A client error as JSON; KServe v2 requests get the protocol's ``{"error": message}``."""
    codec = _BY_FORMAT.get(request_format or err.request_format or "", JSON_CODEC)
    return codec.error(err)


def _response_names(
    outputs: Mapping[str, np.ndarray],
    request: DecodedRequest,
    output_specs: Sequence[TensorSpec] | None,
    codec: Codec,
) -> list[str]:
    if output_specs:
        available = [spec.name for spec in output_specs]
        missing = [name for name in available if name not in outputs]
        if missing:
            raise ValueError(f"model outputs {missing} are missing from the results")
    else:
        available = list(outputs)
    if request.output_names:
        for name in request.output_names:
            if name not in available:
                raise RequestError(
                    BAD_REQUEST,
                    f"unknown output {quoted(name)}; the model's outputs are {name_list(available)}",
                    request.format,
                )
        names = list(request.output_names)
    else:
        names = available
    if codec.one_tensor and len(names) != 1:
        raise RequestError(
            BAD_REQUEST,
            f"the {OUTPUT_HEADER} header is required: the model's outputs are {name_list(names)}",
            request.format,
        )
    return names


def _unbatched(name: str, array: np.ndarray, request: DecodedRequest) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 0 or array.shape[0] != request.batch:
        raise ValueError(
            f"output {name!r} has shape {array.shape}, expected a leading batch of {request.batch}"
        )
    if array.dtype.name not in NUMPY_TO_V2:
        raise ValueError(f"output {name!r} has unsupported dtype {array.dtype}")
    return array if request.had_batch_dim else array[0]

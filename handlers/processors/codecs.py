"""The processors' codecs: images and text in, as body formats of the one request decoder.

``processor_codecs(processors)`` is the codec list of a model whose archive declares
processors: an image codec (``image/*``, or a body that starts like a JPEG/PNG/GIF/WebP sent
without a content type or as octet-stream), a text codec (``text/plain``, and JSON texts:
``{"text": ...}``, a string or a list of strings) and a KServe v2 codec that takes BYTES inputs
(images as base64 or binary blobs, UTF-8 strings) before the tensor codecs' turn. A request
these make answers in the format its client asked for (``Processors.answer_format``).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from handlers.protocol.body import RAW_CONTENT_TYPE, header, is_json_media
from handlers.protocol.codec import BodyRequest, Codec, DecodedRequest
from handlers.protocol.codecs import CODECS
from handlers.protocol.kserve_v2 import FORMAT_V2, check_v2_shape
from handlers.protocol.v2_binary import BinaryOutputs, binary_outputs, binary_size, bytes_elements
from handlers.protocol.v2_codec import KServeV2Codec
from handlers.protocol.validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
    quoted,
)

if TYPE_CHECKING:
    from handlers.processors import Processors

# Leading bytes of the image formats Pillow reads: a body without a content type (curl -T)
# or sent as octet-stream is an image when it starts like one.
# Only signatures of 3+ bytes: a raw float tensor could start with a 2-byte one (BMP's "BM").
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")
_NO_TENSORS = "send tensors (JSON, .npy, .npz, raw)"


def processor_codecs(processors: Processors) -> tuple[Codec, ...]:
    """The tensor codecs with the processors' in front (their v2 codec replaces the plain one)."""
    tensors = tuple(c for c in CODECS if c.format != FORMAT_V2)
    return (BytesV2Codec(processors), ImageCodec(processors), TextCodec(processors), *tensors)


class ImageCodec(Codec):
    def __init__(self, processors: Processors) -> None:
        self.processors = processors

    def matches(self, request: BodyRequest) -> bool:
        if not request.is_bytes:
            return False
        media = request.media
        return (media is not None and media.startswith("image/")) or self._sniffed(request)

    def _sniffed(self, request: BodyRequest) -> bool:
        if (
            self.processors.image_input is None
            or request.media not in (None, RAW_CONTENT_TYPE)
            or header(request.headers, "X-Tensor-Shape") is not None
        ):
            return False
        start = bytes(request.body[:16])
        webp = start[:4] == b"RIFF" and start[8:12] == b"WEBP"
        return webp or start.startswith(_IMAGE_MAGIC)

    def decode(self, request: BodyRequest) -> DecodedRequest:
        if self.processors.image_input is None:
            raise RequestError(
                UNSUPPORTED_MEDIA_TYPE,
                f"this model takes no images ({quoted(request.media or 'image bytes')}): its "
                f"archive declares no image processor; {_NO_TENSORS}",
            )
        answer = self.processors.answer_format(request.headers, request.params)
        return self.processors.images([bytes(request.body)], answer, had_batch_dim=False)


class TextCodec(Codec):
    """``text/plain`` bodies, and JSON documents that hold texts rather than tensors."""

    def __init__(self, processors: Processors) -> None:
        self.processors = processors

    def matches(self, request: BodyRequest) -> bool:
        if request.is_bytes:
            return request.media == "text/plain"
        if not _json_or_none(request.media):
            return False
        if not isinstance(request.body, dict | list):  # a bare JSON string stays a tensor request
            return False
        value = self._unwrapped(request)
        return isinstance(value, str) or (isinstance(value, list) and bool(value) and isinstance(value[0], str))

    def _unwrapped(self, request: BodyRequest) -> Any:
        value = request.body
        inputs = {spec.name for spec in request.inputs}
        if isinstance(value, dict) and set(value) == {"text"} and "text" not in inputs:
            return value["text"]
        return value

    def decode(self, request: BodyRequest) -> DecodedRequest:
        if self.processors.text is None:
            what = " (text/plain)" if request.is_bytes else ""
            raise RequestError(
                UNSUPPORTED_MEDIA_TYPE,
                f"this model takes no text{what}: its archive declares no text processor; "
                + (_NO_TENSORS if request.is_bytes else "send tensors"),
            )
        answer = self.processors.answer_format(request.headers, request.params)
        if request.is_bytes:
            try:
                text = bytes(request.body).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(BAD_REQUEST, "text/plain body is not valid UTF-8") from None
            return self.processors.texts([text], answer, had_batch_dim=False)
        value = self._unwrapped(request)
        if isinstance(value, str):
            return self.processors.texts([value], answer, had_batch_dim=False)
        if not all(isinstance(v, str) for v in value):
            raise RequestError(BAD_REQUEST, "a list of texts must hold only strings")
        return self.processors.texts(list(value), answer, had_batch_dim=True)


class BytesV2Codec(KServeV2Codec):
    """KServe v2 with one BYTES input (images or strings) through the processors, v2 tensors
    out; a v2 request of numbers decodes as the plain v2 codec does.

    In JSON, images are base64 text; with the binary tensor extension, each element is the
    image's or the text's own bytes (4-byte length-prefixed, Triton's layout).
    """

    def __init__(self, processors: Processors) -> None:
        self.processors = processors

    def decode_document(
        self, request: BodyRequest, document: dict[str, Any], blobs: Mapping[str, memoryview] | None
    ) -> DecodedRequest:
        if not any(isinstance(e, dict) and e.get("datatype") == "BYTES" for e in document["inputs"]):
            return super().decode_document(request, document, blobs)
        if not request.is_bytes and not _json_or_none(request.media):  # JSON sent as something else
            return super().decode_document(request, document, blobs)
        try:
            return self._bytes(request, document, blobs)
        except RequestError as err:
            err.request_format = FORMAT_V2
            raise

    def _bytes(
        self, request: BodyRequest, document: dict[str, Any], blobs: Mapping[str, memoryview] | None
    ) -> DecodedRequest:
        entries = document["inputs"]
        if len(entries) != 1:
            raise RequestError(BAD_REQUEST, "send exactly one BYTES input (the images or the texts)")
        entry = entries[0]
        binary = binary_outputs(document)
        request_id = document.get("id") if isinstance(document.get("id"), str) else None
        if binary_size(entry) is not None and blobs is not None:
            shape = check_v2_shape(entry["name"], entry.get("shape"))
            count = math.prod(shape)  # Python ints: a huge claim is refused by bytes_elements
            if count == 0:
                raise RequestError(BAD_REQUEST, f"input {entry['name']!r}: BYTES input holds no elements")
            elements = bytes_elements(entry["name"], blobs[entry["name"]], count, request.limits.max_batch_per_request)
            return self._run(elements, request_id, binary, lambda item, _: item, _utf8_text)
        data = entry.get("data")
        if not isinstance(data, list) or not data:
            raise RequestError(BAD_REQUEST, "BYTES input: 'data' must be a non-empty list")
        if isinstance(data[0], list):
            data = [x for row in data for x in (row if isinstance(row, list) else [row])]
        shape = check_v2_shape(str(entry.get("name")), entry.get("shape"))
        if math.prod(shape) != len(data):
            raise RequestError(BAD_REQUEST, f"BYTES input: 'shape' {shape} must hold its {len(data)} elements")
        limit = request.limits.max_batch_per_request
        if len(data) > limit:
            raise RequestError(PAYLOAD_TOO_LARGE, f"{len(data)} items exceed the limit of {limit} per request")
        return self._run(data, request_id, binary, _b64, lambda item, _: item)

    def _run(
        self,
        items: list[Any],
        request_id: str | None,
        binary: BinaryOutputs,
        image_of: Callable[[Any, int], bytes],
        text_of: Callable[[Any, int], Any],
    ) -> DecodedRequest:
        """Each BYTES element as an image (``image_of``) or a text (``text_of``)."""
        processors = self.processors
        if processors.image_input is not None:
            images = [image_of(item, i) for i, item in enumerate(items)]
            return processors.images(images, FORMAT_V2, True, request_id, binary)
        if processors.text is not None:
            texts = [text_of(item, i) for i, item in enumerate(items)]
            return processors.texts(texts, FORMAT_V2, True, request_id, binary)
        raise RequestError(BAD_REQUEST, "BYTES inputs need an image or text processor in the archive; send numbers")


def _json_or_none(media: str | None) -> bool:
    """A parsed document the processors may read: sent as JSON, or with no content type."""
    return media is None or is_json_media(media)


def _utf8_text(element: bytes, index: int) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(BAD_REQUEST, f"text {index}: BYTES element is not valid UTF-8") from None


def _b64(item: Any, index: int) -> bytes:
    if isinstance(item, dict) and set(item) == {"b64"}:
        item = item["b64"]
    if not isinstance(item, str):
        raise RequestError(BAD_REQUEST, f"image {index}: BYTES data must be base64 text")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(BAD_REQUEST, f"image {index}: BYTES data is not valid base64") from None

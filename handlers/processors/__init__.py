"""Processors packed with the model: bytes in (images, text), labels out.

``Processors.load`` builds them once per worker from the ``hetserve.processors`` config and
the archive's verified files; per request, ``decode`` turns an image or text body into the
model's tensors (or returns None: not a processor body, the tensor codecs take it), ``pad_texts``
pads a batch's text requests to its longest sequence, and ``encode`` answers ``{"label": score}``
JSON unless the client asked for tensors: ``X-Hetserve-Raw: 1`` (JSON tensors), an Accept header
naming a tensor format (.npy, .npz, raw), or a ``raw=1`` form field. TorchServe 0.12 does not hand
a URL's query string (``?raw=1``) to the handler, so the header is the way on /predictions.
Everything here is a pure function of the request and the archive; no TorchServe types.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from handlers.artifact.manifest import Manifest, TensorSpec, resolve_inside
from handlers.protocol.codecs import (
    _JSON_START,
    FORMAT_JSON,
    FORMAT_NPY,
    FORMAT_RAW,
    JSON_CONTENT_TYPE,
    NPY_CONTENT_TYPE,
    RAW_CONTENT_TYPE,
    DecodedRequest,
    EncodedResponse,
    _media_type,
    _parse_json,
    decode_request,
    header,
    on_kserve_route,
    split_v2_binary,
)
from handlers.protocol.kserve_v2 import FORMAT_V2, V2_BINARY_HEADER, check_v2_shape, is_v2_document
from handlers.protocol.npz_codec import FORMAT_NPZ, NPZ_CONTENT_TYPE
from handlers.protocol.v2_binary import (
    NO_BINARY,
    BinaryOutputs,
    binary_outputs,
    binary_size,
    bytes_elements,
)
from handlers.protocol.validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
    RequestLimits,
    name_list,
    quoted,
)

from .config import ProcessorConfigError, ProcessorsConfig
from .image import decode_image
from .labels import read_labels, top_labels
from .length_batching import padded_lengths
from .text import TextProcessor

__all__ = ["FORMAT_LABELS", "ProcessedRequest", "Processors", "ProcessorConfigError", "ProcessorsConfig"]

FORMAT_LABELS = "labels"
RAW_PARAM = "raw"
RAW_HEADER = "X-Hetserve-Raw"
# Leading bytes of the image formats Pillow reads: a body without a content type (curl -T)
# or sent as octet-stream is an image when it starts like one.
# Only signatures of 3+ bytes: a raw float tensor could start with a 2-byte one (BMP's "BM").
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclasses.dataclass(frozen=True)
class ProcessedRequest(DecodedRequest):
    """A request a processor turned into tensors; ``kind`` is "image" or "text"."""

    kind: str = ""


class Processors:
    def __init__(
        self,
        config: ProcessorsConfig,
        manifest: Manifest,
        image_input: str | None,
        text: TextProcessor | None,
        label_output: str | None,
        label_names: Sequence[str],
    ) -> None:
        self.config = config
        self.manifest = manifest
        self.image_input = image_input
        self.text = text
        self.label_output = label_output
        self.label_names = tuple(label_names)

    @classmethod
    def load(
        cls, config: ProcessorsConfig, model_dir: str | os.PathLike[str], manifest: Manifest
    ) -> Processors | None:
        """None when the archive declares no processor (tensors in, tensors out)."""
        if not config.any:
            return None
        for name in config.files():
            if name not in manifest.files:
                raise ProcessorConfigError(
                    f"processor file {name!r} is not listed in the archive's manifest, so its "
                    "SHA-256 cannot be checked; pack it with hetserve archive"
                )
        image_input = _image_input(config, manifest) if config.image else None
        text = None
        if config.text is not None:
            path = resolve_inside(model_dir, config.text.tokenizer)
            text = TextProcessor(path, config.text, manifest.inputs)
        label_output: str | None = None
        names: tuple[str, ...] = ()
        if config.labels is not None:
            label_output = _pick(
                config.labels.output, manifest.outputs, "hetserve.processors.labels.output", "output"
            )
            if config.labels.labels is not None:
                names = read_labels(resolve_inside(model_dir, config.labels.labels))
        return cls(config, manifest, image_input, text, label_output, names)

    # -- requests in --
    def decode(
        self,
        body: Any,
        content_type: str | None,
        headers: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None,
        limits: RequestLimits,
    ) -> DecodedRequest | None:
        """This request's tensors if it is an image or text body (or JSON, parsed once here)."""
        try:
            return self._decode(body, content_type, headers, params or {}, limits)
        except RequestError as err:
            if on_kserve_route(headers):
                err.request_format = FORMAT_V2
            raise

    def _decode(
        self,
        body: Any,
        content_type: str | None,
        headers: Mapping[str, Any] | None,
        params: Mapping[str, Any],
        limits: RequestLimits,
    ) -> DecodedRequest | None:
        media = _media_type(content_type) or _media_type(header(headers, "content-type"))
        if isinstance(body, memoryview):
            body = body.tobytes()
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogatepass")
        if not isinstance(body, bytes | bytearray) or not body:
            return None  # the codecs answer empty and pre-decoded bodies
        body = bytes(body)  # no copy for bytes; the frontend may hand a bytearray
        answer = self._answer_format(headers, params)
        if header(headers, V2_BINARY_HEADER) is not None:  # explicit: whatever the content type
            return self._v2_binary(body, headers, limits)
        if media is not None and media.startswith("image/") or self._sniffed_image(body, media, headers):
            if self.image_input is None:
                raise RequestError(
                    UNSUPPORTED_MEDIA_TYPE,
                    f"this model takes no images ({quoted(media or 'image bytes')}): its archive "
                    "declares no image processor; send tensors (JSON, .npy, .npz, raw)",
                )
            return self._images([body], answer, had_batch_dim=False)
        if media == "text/plain":
            if self.text is None:
                raise RequestError(
                    UNSUPPORTED_MEDIA_TYPE,
                    "this model takes no text (text/plain): its archive declares no text "
                    "processor; send tensors (JSON, .npy, .npz, raw)",
                )
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(BAD_REQUEST, "text/plain body is not valid UTF-8") from None
            return self._texts([text], answer, had_batch_dim=False)
        if media not in (None, JSON_CONTENT_TYPE, "text/json") and not (media or "").endswith("+json"):
            return None
        if not _JSON_START.match(body) or len(body) > limits.max_body_bytes:
            return None
        value = _parse_json(body, limits)
        if is_v2_document(value) and _has_bytes_input(value):
            return self._v2_bytes(value, limits)
        texts, batched = _texts_in(value, self.manifest)
        if texts is not None:
            if self.text is None:
                raise RequestError(
                    UNSUPPORTED_MEDIA_TYPE,
                    "this model takes no text: its archive declares no text processor; send tensors",
                )
            return self._texts(texts, answer, had_batch_dim=batched)
        return decode_request(value, None, headers, self.manifest.inputs, limits, outputs=self.manifest.outputs)

    def _sniffed_image(
        self, body: bytes, media: str | None, headers: Mapping[str, Any] | None
    ) -> bool:
        if (
            self.image_input is None
            or media not in (None, RAW_CONTENT_TYPE)
            or header(headers, "X-Tensor-Shape") is not None
        ):
            return False
        start = bytes(body[:16])
        webp = start[:4] == b"RIFF" and start[8:12] == b"WEBP"
        return webp or start.startswith(_IMAGE_MAGIC)

    def _answer_format(self, headers: Mapping[str, Any] | None, params: Mapping[str, Any]) -> str:
        raw = params.get(RAW_PARAM, header(headers, RAW_HEADER))
        if isinstance(raw, bytes | bytearray):
            raw = raw.decode("latin-1")
        accept = (_media_type(header(headers, "accept")) or "").strip()
        if accept == NPY_CONTENT_TYPE:
            return FORMAT_NPY
        if accept == RAW_CONTENT_TYPE:
            return FORMAT_RAW
        if accept == NPZ_CONTENT_TYPE:
            return FORMAT_NPZ
        if (isinstance(raw, str) and raw.strip().lower() in _TRUE) or self.label_output is None:
            return FORMAT_JSON
        return FORMAT_LABELS

    def _v2_binary(
        self, body: bytes, headers: Mapping[str, Any] | None, limits: RequestLimits
    ) -> DecodedRequest | None:
        """A binary-extension v2 body with a BYTES input is ours; numeric ones go to the codecs."""
        if len(body) > limits.max_body_bytes:
            return None  # the codecs answer it with their 413
        try:
            document, blobs = split_v2_binary(body, headers, limits)
        except RequestError as err:
            err.request_format = FORMAT_V2
            raise
        if not _has_bytes_input(document):
            return None
        return self._v2_bytes(document, limits, blobs)

    def _images(
        self, blobs: Sequence[bytes], answer: str, had_batch_dim: bool, request_id: str | None = None,
        binary: BinaryOutputs = NO_BINARY,
    ) -> DecodedRequest:
        assert self.config.image is not None and self.image_input is not None
        label = "image" if len(blobs) == 1 else "image {}"
        pixels = [decode_image(b, self.config.image, label.format(i)) for i, b in enumerate(blobs)]
        spec = _spec(self.manifest.inputs, self.image_input)
        batch = np.stack(pixels).astype(spec.dtype, copy=False)
        return ProcessedRequest(
            {spec.name: batch}, len(blobs), answer, had_batch_dim, request_id,
            binary_outputs=binary, kind="image",
        )

    def _texts(
        self, texts: Sequence[str], answer: str, had_batch_dim: bool, request_id: str | None = None,
        binary: BinaryOutputs = NO_BINARY,
    ) -> DecodedRequest:
        assert self.text is not None
        arrays = self.text.encode(texts)
        return ProcessedRequest(
            arrays, len(texts), answer, had_batch_dim, request_id, binary_outputs=binary, kind="text"
        )

    def _v2_bytes(
        self,
        document: dict[str, Any],
        limits: RequestLimits,
        blobs: Mapping[str, memoryview] | None = None,
    ) -> DecodedRequest:
        """A v2 request whose one input is BYTES: images or strings; v2 tensors out.

        In JSON, images are base64 text; with the binary tensor extension (``blobs``), each
        element is the image's or the text's own bytes (4-byte length-prefixed, Triton's layout).
        """
        try:
            entries = document["inputs"]
            if len(entries) != 1:
                raise RequestError(BAD_REQUEST, "send exactly one BYTES input (the images or the texts)")
            entry = entries[0]
            shape = entry.get("shape")
            binary = binary_outputs(document)
            if binary_size(entry) is not None and blobs is not None:
                return self._v2_bytes_blob(entry, blobs[entry["name"]], document, limits, binary)
            data = entry.get("data")
            if not isinstance(data, list) or not data:
                raise RequestError(BAD_REQUEST, "BYTES input: 'data' must be a non-empty list")
            if isinstance(data[0], list):
                data = [x for row in data for x in (row if isinstance(row, list) else [row])]
            shape = check_v2_shape(str(entry.get("name")), shape)
            if math.prod(shape) != len(data):
                raise RequestError(
                    BAD_REQUEST, f"BYTES input: 'shape' {shape} must hold its {len(data)} elements"
                )
            if len(data) > limits.max_batch_per_request:
                raise RequestError(
                    PAYLOAD_TOO_LARGE,
                    f"{len(data)} items exceed the limit of {limits.max_batch_per_request} per request",
                )
            request_id = _request_id(document)
            if self.image_input is not None:
                return self._images([_b64(x, i) for i, x in enumerate(data)], FORMAT_V2, True, request_id, binary)
            if self.text is not None:
                return self._texts(data, FORMAT_V2, True, request_id, binary)
            raise _no_bytes_processor()
        except RequestError as err:
            err.request_format = FORMAT_V2
            raise

    def _v2_bytes_blob(
        self,
        entry: dict[str, Any],
        blob: memoryview,
        document: dict[str, Any],
        limits: RequestLimits,
        binary: BinaryOutputs,
    ) -> DecodedRequest:
        shape = check_v2_shape(entry["name"], entry.get("shape"))
        count = math.prod(shape)  # Python ints: a huge claim is refused by bytes_elements, not wrapped
        if count == 0:
            raise RequestError(BAD_REQUEST, f"input {entry['name']!r}: BYTES input holds no elements")
        elements = bytes_elements(entry["name"], blob, count, limits.max_batch_per_request)
        request_id = _request_id(document)
        if self.image_input is not None:
            return self._images(elements, FORMAT_V2, True, request_id, binary)
        if self.text is not None:
            return self._texts([_utf8_text(e, i) for i, e in enumerate(elements)], FORMAT_V2, True, request_id, binary)
        raise _no_bytes_processor()

    # -- a batch --
    def pad_texts(self, decoded: list[tuple[int, DecodedRequest]]) -> list[tuple[int, DecodedRequest]]:
        """Text requests padded to their length group's longest sequence: similar lengths share
        a run and a short text does not pay for a long one (``length_batching``); other
        requests unchanged."""
        if self.text is None or self.text.fixed_length is not None:
            return decoded
        texts = [k for k, (_, r) in enumerate(decoded) if isinstance(r, ProcessedRequest) and r.kind == "text"]
        if len(texts) < 2:
            return decoded
        first = self.text.input_names[0]
        lengths = padded_lengths([(decoded[k][1].batch, decoded[k][1].arrays[first].shape[1]) for k in texts])
        out = list(decoded)
        for k, length in zip(texts, lengths, strict=True):
            index, request = decoded[k]
            out[k] = (index, dataclasses.replace(request, arrays=self.text.pad_to(request.arrays, length)))
        return out

    # -- answers out --
    def encode(self, outputs: Mapping[str, np.ndarray], request: DecodedRequest) -> EncodedResponse | None:
        """The labels answer, or None: the tensor codecs answer this request."""
        if request.format != FORMAT_LABELS:
            return None
        assert self.config.labels is not None and self.label_output is not None
        rows = top_labels(np.asarray(outputs[self.label_output]), self.config.labels, self.label_names)
        body = rows if request.had_batch_dim else rows[0]
        return EncodedResponse(json.dumps(body, separators=(",", ":")), JSON_CONTENT_TYPE)


def _has_bytes_input(document: dict[str, Any]) -> bool:
    return any(isinstance(e, dict) and e.get("datatype") == "BYTES" for e in document["inputs"])


def _texts_in(value: Any, manifest: Manifest) -> tuple[list[str] | None, bool]:
    """Strings in ``{"text": ...}``, a bare string or a list of strings; (None, _) otherwise."""
    inputs = {spec.name for spec in manifest.inputs}
    if isinstance(value, dict) and set(value) == {"text"} and "text" not in inputs:
        value = value["text"]
    if isinstance(value, str):
        return [value], False
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value), True
    if isinstance(value, list) and value and isinstance(value[0], str):
        raise RequestError(BAD_REQUEST, "a list of texts must hold only strings")
    return None, False


def _request_id(document: dict[str, Any]) -> str | None:
    request_id = document.get("id")
    return request_id if isinstance(request_id, str) else None


def _no_bytes_processor() -> RequestError:
    return RequestError(
        BAD_REQUEST, "BYTES inputs need an image or text processor in the archive; send numbers"
    )


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


def _spec(specs: Sequence[TensorSpec], name: str) -> TensorSpec:
    return next(s for s in specs if s.name == name)


def _pick(name: str | None, specs: Sequence[TensorSpec], knob: str, what: str) -> str:
    names = [s.name for s in specs]
    if name is None:
        if len(names) != 1 and what == "input":
            raise ProcessorConfigError(f"{knob} must name one of the model's inputs {name_list(names)}")
        return names[0]
    if name not in names:
        raise ProcessorConfigError(f"{knob} {name!r} is not one of the model's {what}s {name_list(names)}")
    return name


def _image_input(config: ProcessorsConfig, manifest: Manifest) -> str:
    image = config.image
    assert image is not None
    name = _pick(image.input, manifest.inputs, "hetserve.processors.image.input", "input")
    spec = _spec(manifest.inputs, name)
    hw = image.output_hw
    channels = image.channel_count
    expected = (channels, *(hw or (None, None))) if image.layout == "CHW" else (*(hw or (None, None)), channels)
    got = spec.sample_shape
    if len(got) != 3 or any(e is not None and g is not None and e != g for e, g in zip(expected, got, strict=True)):
        raise ProcessorConfigError(
            f"the image processor makes {image.layout} samples of {list(expected)} but input "
            f"{name!r} takes {list(got)}; fix hetserve.processors.image (size, crop, layout, channels)"
        )
    if not spec.dtype.startswith("float"):
        raise ProcessorConfigError(f"the image processor fills float inputs; {name!r} is {spec.dtype}")
    return name


"""Processors packed with the model: bytes in (images, text), labels out.

``Processors.load`` builds them once per worker from the ``hetserve.processors`` config and
the archive's verified files. Per request, the processors' codecs (``processors/codecs.py``, in
the one request decoder's list) call ``images`` and ``texts`` to turn a body into the model's
tensors; ``pad_texts`` pads a batch's text requests per length group (similar token lengths
share a run, each padded to its group's longest: ``length_batching``), and ``encode`` answers
``{"label": score}`` JSON unless the client asked for tensors: ``X-Hetserve-Raw: 1`` (JSON tensors), an Accept header
naming a tensor format (.npy, .npz, raw), or a ``raw=1`` form field. TorchServe 0.12 does not hand
a URL's query string (``?raw=1``) to the handler, so the header is the way on /predictions.
Everything here is a pure function of the request and the archive; no TorchServe types.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from handlers.artifact.manifest import Manifest, TensorSpec, resolve_inside
from handlers.protocol.body import JSON_CONTENT_TYPE, RAW_CONTENT_TYPE, header, media_type
from handlers.protocol.codec import FORMAT_JSON, DecodedRequest, EncodedResponse
from handlers.protocol.npz_codec import FORMAT_NPZ, NPZ_CONTENT_TYPE
from handlers.protocol.tensor_codecs import FORMAT_NPY, FORMAT_RAW, NPY_CONTENT_TYPE
from handlers.protocol.v2_binary import NO_BINARY, BinaryOutputs
from handlers.protocol.validation import name_list

from .config import ProcessorConfigError, ProcessorsConfig
from .image import decode_image
from .labels import read_labels, top_labels
from .length_batching import padded_lengths
from .text import TextProcessor

__all__ = ["FORMAT_LABELS", "ProcessedRequest", "Processors", "ProcessorConfigError", "ProcessorsConfig"]

FORMAT_LABELS = "labels"
RAW_PARAM = "raw"
RAW_HEADER = "X-Hetserve-Raw"
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

    # -- requests in (through the codecs of ``processors/codecs.py``) --
    def answer_format(self, headers: Mapping[str, Any] | None, params: Mapping[str, Any]) -> str:
        raw = params.get(RAW_PARAM, header(headers, RAW_HEADER))
        if isinstance(raw, bytes | bytearray):
            raw = raw.decode("latin-1")
        accept = (media_type(header(headers, "accept")) or "").strip()
        if accept == NPY_CONTENT_TYPE:
            return FORMAT_NPY
        if accept == RAW_CONTENT_TYPE:
            return FORMAT_RAW
        if accept == NPZ_CONTENT_TYPE:
            return FORMAT_NPZ
        if (isinstance(raw, str) and raw.strip().lower() in _TRUE) or self.label_output is None:
            return FORMAT_JSON
        return FORMAT_LABELS

    def images(
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

    def texts(
        self, texts: Sequence[str], answer: str, had_batch_dim: bool, request_id: str | None = None,
        binary: BinaryOutputs = NO_BINARY,
    ) -> DecodedRequest:
        assert self.text is not None
        arrays = self.text.encode(texts)
        return ProcessedRequest(
            arrays, len(texts), answer, had_batch_dim, request_id, binary_outputs=binary, kind="text"
        )

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


"""The ``hetserve.processors`` section of model-config.yaml: typed, validated, unknown keys refused.

    hetserve:
      processors:
        image:  {size: 256, crop: 224, mean: [...], std: [...]}   # JPEG/PNG/WebP -> pixel tensor
        text:   {tokenizer: tokenizer.json, max_length: 128}       # strings -> token tensors
        labels: {labels: labels.json, top_k: 5}                     # logits -> {"name": score}

Files named here (tokenizer, labels) are archive-relative and must be listed in the manifest,
so their SHA-256 is checked before anything reads them. Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

RESAMPLE_CHOICES = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
CHANNEL_CHOICES = ("RGB", "BGR", "L")
LAYOUT_CHOICES = ("CHW", "HWC")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
ACTIVATION_CHOICES = ("softmax", "sigmoid", "none")
TOKEN_FIELDS = ("ids", "attention_mask", "type_ids")
# Model input name -> tokenizer field, used when the text processor names no inputs.
DEFAULT_TOKEN_INPUTS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
# The longest edge ``size`` or ``crop`` may ask for: well above any vision model's input
# (detection models resize to ~1333), far below what would let one request allocate gigabytes.
MAX_IMAGE_EDGE = 8192
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ProcessorConfigError(ValueError):
    """A processor knob is wrong; the message names it as hetserve.processors.<kind>.<knob>."""


def _fail(kind: str, knob: str, problem: str) -> ProcessorConfigError:
    return ProcessorConfigError(f"hetserve.processors.{kind}.{knob} {problem}")


def _positive_int(kind: str, knob: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(kind, knob, f"must be an integer >= 1, got {value!r}")
    return value


def _edge(kind: str, knob: str, value: Any) -> int:
    edge = _positive_int(kind, knob, value)
    if edge > MAX_IMAGE_EDGE:
        raise _fail(kind, knob, f"asks for an edge of {edge} pixels; at most {MAX_IMAGE_EDGE}")
    return edge


def _hw(kind: str, knob: str, value: Any) -> tuple[int, int]:
    """An int (square, or shortest edge for ``size``) or [height, width], each edge bounded."""
    if isinstance(value, list | tuple) and len(value) == 2:
        return (_edge(kind, knob, value[0]), _edge(kind, knob, value[1]))
    raise _fail(kind, knob, f"must be an integer or [height, width], got {value!r}")


def _choice(kind: str, knob: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _fail(kind, knob, f"must be one of {', '.join(choices)}, got {value!r}")
    chosen: str = value
    return chosen


def _floats(kind: str, knob: str, value: Any, count: int) -> tuple[float, ...]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != count
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise _fail(kind, knob, f"must be a list of {count} numbers, got {value!r}")
    # Every answer would be NaN (and labels not even valid JSON): refuse it when archiving.
    if not all(math.isfinite(v) for v in value):
        raise _fail(kind, knob, f"must hold finite numbers, got {list(value)!r}")
    return tuple(float(v) for v in value)


def _file(kind: str, knob: str, value: Any) -> str:
    if not isinstance(value, str) or not value or value.startswith(("/", "~")) or ".." in value.split("/"):
        raise _fail(kind, knob, f"must be a file inside the archive (relative path), got {value!r}")
    return value


@dataclass(frozen=True)
class ImageConfig:
    """Pillow decode (EXIF-upright, 8 bits) -> resize -> center crop -> rescale -> normalise ->
    layout; image.py documents each step."""

    input: str | None = None  # model input it fills; None: the model's only input
    # int: the shortest edge is resized to it, aspect kept; [h, w]: resized to exactly that
    size: int | tuple[int, int] = 256
    crop: tuple[int, int] | None = (224, 224)  # center crop; None: none
    resample: str = "bilinear"
    rescale: float = 1 / 255
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: str = "RGB"
    layout: str = "CHW"
    max_bytes: int = 16 * 2**20
    # Decoded pixels (width x height), checked from the header before any pixel is decoded:
    # a 50 KB PNG can claim gigapixels (decompression bomb).
    max_pixels: int = 40_000_000
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    # Decode JPEGs at the smallest DCT scale (and reduce other formats) that still leaves twice
    # the resize target; false: decode and resample every image at full size.
    fast_decode: bool = True

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ImageConfig:
        kind = "image"
        _check_known(kind, values, cls)
        out: dict[str, Any] = {}
        if values.get("input") is not None:
            out["input"] = str(values["input"])
        if "size" in values:
            size = values["size"]
            out["size"] = _edge(kind, "size", size) if isinstance(size, int) else _hw(kind, "size", size)
        if "crop" in values:
            crop = values["crop"]
            out["crop"] = None if crop is None else (
                (_edge(kind, "crop", crop),) * 2 if isinstance(crop, int) else _hw(kind, "crop", crop)
            )
        if "resample" in values:
            out["resample"] = _choice(kind, "resample", values["resample"], RESAMPLE_CHOICES)
        if "channels" in values:
            out["channels"] = _choice(kind, "channels", values["channels"], CHANNEL_CHOICES)
        if "layout" in values:
            out["layout"] = _choice(kind, "layout", values["layout"], LAYOUT_CHOICES)
        if "rescale" in values:
            value = values["rescale"]
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
                raise _fail(kind, "rescale", f"must be a finite number > 0, got {value!r}")
            out["rescale"] = float(value)
        channels = 1 if out.get("channels", cls.channels) == "L" else 3
        for knob in ("mean", "std"):
            if knob in values:
                out[knob] = _floats(kind, knob, values[knob], channels)
            elif channels == 1:
                out[knob] = (0.0,) if knob == "mean" else (1.0,)
        if any(s <= 0 for s in out.get("std", cls.std)):
            raise _fail(kind, "std", f"must hold numbers > 0 (it divides), got {list(out['std'])!r}")
        if "fast_decode" in values:
            if not isinstance(values["fast_decode"], bool):
                raise _fail(kind, "fast_decode", f"must be true or false, got {values['fast_decode']!r}")
            out["fast_decode"] = values["fast_decode"]
        for knob in ("max_bytes", "max_pixels"):
            if knob in values:
                out[knob] = _positive_int(kind, knob, values[knob])
        if "formats" in values:
            formats = values["formats"]
            if not isinstance(formats, list | tuple) or not formats:
                raise _fail(kind, "formats", f"must be a non-empty list, got {formats!r}")
            out["formats"] = tuple(_choice(kind, "formats", str(f).upper(), IMAGE_FORMATS) for f in formats)
        config = cls(**out)
        config.check_crop_fits()
        return config

    def check_crop_fits(self) -> None:
        hw = self.output_hw
        if hw is not None and hw[0] * hw[1] > self.max_pixels:
            raise _fail("image", "crop" if self.crop else "size",
                        f"{list(hw)} makes images over max_pixels ({self.max_pixels})")
        if self.crop is None:
            return
        smallest = (self.size, self.size) if isinstance(self.size, int) else self.size
        if self.crop[0] > smallest[0] or self.crop[1] > smallest[1]:
            raise _fail("image", "crop", f"{list(self.crop)} is larger than the resized image ({self.size})")

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """(height, width) of every processed image, or None when it follows the image's aspect."""
        if self.crop is not None:
            return self.crop
        return None if isinstance(self.size, int) else self.size

    @property
    def channel_count(self) -> int:
        return 1 if self.channels == "L" else 3


@dataclass(frozen=True)
class TextConfig:
    """``tokenizers`` encode -> truncate or refuse -> pad to the batch's longest."""

    tokenizer: str = "tokenizer.json"
    max_length: int = 128
    # false: a text over max_length tokens is a 413 naming its length; true: cut at max_length
    truncation: bool = False
    pad_token: str = "[PAD]"
    # model input -> tokenizer field (ids, attention_mask, type_ids); empty: by the inputs' names
    inputs: Mapping[str, str] = field(default_factory=dict)
    max_texts: int = 64  # strings in one request
    max_chars: int = 100_000  # characters in one string, checked before tokenizing
    # characters in all of one request's strings, checked before tokenizing: bounds the work
    # of texts whose head cannot decide their length (very long tokens)
    max_request_chars: int = 1_000_000

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TextConfig:
        kind = "text"
        _check_known(kind, values, cls)
        out: dict[str, Any] = {}
        if "tokenizer" in values:
            out["tokenizer"] = _file(kind, "tokenizer", values["tokenizer"])
        for knob in ("max_length", "max_texts", "max_chars", "max_request_chars"):
            if knob in values:
                out[knob] = _positive_int(kind, knob, values[knob])
        if "truncation" in values:
            if not isinstance(values["truncation"], bool):
                raise _fail(kind, "truncation", f"must be true or false, got {values['truncation']!r}")
            out["truncation"] = values["truncation"]
        if "pad_token" in values:
            if not isinstance(values["pad_token"], str) or not values["pad_token"]:
                raise _fail(kind, "pad_token", "must be a token string")
            out["pad_token"] = values["pad_token"]
        if "inputs" in values:
            inputs = values["inputs"]
            if not isinstance(inputs, Mapping) or not inputs:
                raise _fail(kind, "inputs", "must map model input names to ids, attention_mask or type_ids")
            for name, source in inputs.items():
                _choice(kind, f"inputs.{name}", source, TOKEN_FIELDS)
            out["inputs"] = {str(k): v for k, v in inputs.items()}
        return cls(**out)


@dataclass(frozen=True)
class LabelsConfig:
    """Scores -> activation -> top-k -> {"label": score} JSON."""

    output: str | None = None  # model output it reads; None: the model's only (or first) output
    activation: str = "softmax"
    top_k: int = 5
    labels: str | None = None  # labels.json (list, or {"index": "name"}) or a .txt, one per line

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LabelsConfig:
        kind = "labels"
        _check_known(kind, values, cls)
        out: dict[str, Any] = {}
        if values.get("output") is not None:
            out["output"] = str(values["output"])
        if "activation" in values:
            out["activation"] = _choice(kind, "activation", values["activation"], ACTIVATION_CHOICES)
        if "top_k" in values:
            out["top_k"] = _positive_int(kind, "top_k", values["top_k"])
        if values.get("labels") is not None:
            out["labels"] = _file(kind, "labels", values["labels"])
        return cls(**out)


@dataclass(frozen=True)
class ProcessorsConfig:
    image: ImageConfig | None = None
    text: TextConfig | None = None
    labels: LabelsConfig | None = None

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> ProcessorsConfig:
        if not values:
            return cls()
        if not isinstance(values, Mapping):
            raise ProcessorConfigError("hetserve.processors must be a mapping of image, text, labels")
        unknown = sorted(set(values) - {"image", "text", "labels"})
        if unknown:
            raise ProcessorConfigError(
                f"unknown processor(s) {', '.join(map(str, unknown))}; known: image, text, labels"
            )
        parsed: dict[str, Any] = {}
        for name, kind in (("image", ImageConfig), ("text", TextConfig), ("labels", LabelsConfig)):
            section = values.get(name)
            if section is None:
                continue
            if not isinstance(section, Mapping):
                raise ProcessorConfigError(f"hetserve.processors.{name} must be a mapping")
            parsed[name] = kind.from_mapping(section)
        if "image" in parsed and "text" in parsed:
            raise ProcessorConfigError("hetserve.processors: declare image or text, not both")
        return cls(**parsed)

    def files(self) -> tuple[str, ...]:
        """Archive files the processors read (each must be in the manifest)."""
        names = []
        if self.text is not None:
            names.append(self.text.tokenizer)
        if self.labels is not None and self.labels.labels is not None:
            names.append(self.labels.labels)
        return tuple(names)


def _check_known(kind: str, values: Mapping[str, Any], cls: type) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(map(str, values)) - known)
    if unknown:
        raise ProcessorConfigError(
            f"unknown hetserve.processors.{kind} option(s): {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )

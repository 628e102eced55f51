"""Encoded image bytes -> one normalised pixel array, as the archive's ImageConfig declares.

Pure function of (bytes, config); every client mistake is a ``RequestError`` naming it:
too many bytes (413), a format the archive does not accept (415), a header claiming more pixels
than allowed, checked before any pixel is decoded (413: decompression bomb), and bytes Pillow
cannot decode (400).

What a phone or a camera sends is taken as a person looking at it would see it:

* **EXIF orientation first.** A photo stored sideways with ``Orientation`` 2-8 is processed as
  ``PIL.ImageOps.exif_transpose`` (and transformers' ``load_image``) would show it upright: the
  resize target, the crop and every bound below are computed on the upright size. The pixels
  are resampled in the stored orientation and the small result is transposed, which is the
  same picture up to rounding.
* **More than 8 bits: scaled, never clipped.** 16-bit greyscale (``I;16``, ``I;16B``, and
  ``I`` read as 0..65535) keeps its high byte, as Pillow already does for 16-bit RGB; float
  (``F``) is read as 0.0..1.0 (outside is clipped; NaN or infinity is a 400). The same picture
  in 16 and in 8 bits gives the same pixels.
* **Transparency composited onto white** (RGBA, LA, PA, P or L/RGB with a transparent colour),
  as transformers' ``convert_to_rgb`` does, then converted to RGB or L; CMYK and other modes
  go through Pillow's conversion.
* **Crop, then resize.** With a center crop, only the source region that becomes the crop is
  resampled (Pillow's ``resize(box=...)``), which gives the pixels of resize-then-crop without
  ever allocating the resized image: a 1x40000 PNG resized on its shortest edge would be
  256x10240000. Without a crop the resized image is the answer, so one over ``max_pixels`` is
  a 413 naming the size the resize would produce.
* **Decoded at the size the model needs** (``fast_decode``, default on): a JPEG is decoded by
  libjpeg's DCT scaling (1/2..1/8, ``Image.draft``) at the smallest scale that still leaves
  the resized image's edges ``DECODE_GAP`` times over, and other formats are reduced by an
  integer box filter down to the same margin (``resize(reducing_gap=...)``) before the resize.
  On real photos at 12 MP this changes normalised pixels by about 0.004 on average; off, every
  image is decoded and resampled at full size.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from handlers.protocol.validation import (
    BAD_REQUEST,
    PAYLOAD_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    RequestError,
    clip,
)

from .config import ImageConfig

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# EXIF Orientation -> the transposition that shows the stored pixels upright (ImageOps' table).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
# The decoder keeps at least this many source pixels per output pixel on each axis. Measured
# against a full decode (one run, 2-core machine): at 1.0 (just the resize target) a 512x600
# photo decoded at half size differs by 0.04 on average and up to 1.2 after normalisation; at
# 2.0 (Pillow's thumbnail default) 12 MP photos differ by about 0.004 on average, and their
# decode + resize took 23-32 ms against 17-25 ms at 1.0 and 160-210 ms at full size.
DECODE_GAP = 2.0
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_image(data: bytes, config: ImageConfig, label: str = "image") -> np.ndarray:
    """``data`` as float32 pixels in the configured layout (CHW or HWC), without a batch dim."""
    if len(data) > config.max_bytes:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"{label} of {len(data)} bytes exceeds the limit of {config.max_bytes} bytes",
        )
    if not data:
        raise RequestError(BAD_REQUEST, f"{label} is empty")
    with _opened(data, config, label) as image:
        width, height = image.size
        if width * height > config.max_pixels:
            raise RequestError(
                PAYLOAD_TOO_LARGE,
                f"{label} is {width}x{height} pixels, over the limit of {config.max_pixels} "
                "pixels (decompression bomb guard)",
            )
        try:
            image.seek(0)  # animated GIF/WebP/PNG: the first frame
            plan = plan_resize(image.size, _orientation(image), config.size, config.crop)
            _check_resized(plan, config, label)
            box = plan.box
            if config.fast_decode:
                drafted = image.draft(None, draft_request(plan.resized_stored, DECODE_GAP))
                if drafted is not None:  # JPEG: decoded at 1/scale; the box follows
                    fx, fy = drafted[1][2] / width, drafted[1][3] / height
                    box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
            converted = _as_8bit(image, "L" if config.channels == "L" else "RGB", label)
            resized = converted.resize(
                plan.output_stored, _RESAMPLE[config.resample], box=_inside(box, converted.size),
                reducing_gap=DECODE_GAP if config.fast_decode else None,
            )
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestError(
                BAD_REQUEST, f"{label} could not be decoded as {image.format}: {clip(str(exc))}"
            ) from None
    if plan.transpose is not None:
        resized = resized.transpose(plan.transpose)
    return normalise(resized, config)


def normalise(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """Resized RGB/L pixels -> rescaled, normalised float32 in the configured layout."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if config.channels == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(config.mean, np.float32)
    scale = np.asarray([config.rescale / s for s in config.std], np.float32)
    pixels = (pixels * scale - mean / np.asarray(config.std, np.float32)).astype(np.float32)
    if config.layout == "CHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


@dataclass(frozen=True)
class ResizePlan:
    """Where the resize reads and what it writes.

    ``resized``: (width, height) of the whole upright image after the resize, before any crop;
    ``output``: (width, height) of the upright answer (the crop, or ``resized``); ``box``: the
    source region that becomes the answer, in stored coordinates; ``swap``: the stored image's
    axes are the upright one's swapped; ``transpose``: makes the stored-orientation result
    upright (None: stored upright).
    """

    resized: tuple[int, int]
    output: tuple[int, int]
    box: tuple[float, float, float, float]
    swap: bool
    transpose: Image.Transpose | None

    @property
    def resized_stored(self) -> tuple[int, int]:
        return (self.resized[1], self.resized[0]) if self.swap else self.resized

    @property
    def output_stored(self) -> tuple[int, int]:
        return (self.output[1], self.output[0]) if self.swap else self.output


def plan_resize(
    stored: tuple[int, int],
    orientation: int,
    size: int | tuple[int, int],
    crop: tuple[int, int] | None,
) -> ResizePlan:
    """The resize of an image stored as ``stored`` (width, height) with EXIF ``orientation``.

    ``size``: shortest edge (aspect kept) or [height, width]; ``crop``: [height, width] from the
    center of the resized image, or None. Pure arithmetic: nothing is decoded.
    """
    if orientation not in _UPRIGHT:
        orientation = 1
    swap = orientation in _SWAPS_AXES
    upright = (stored[1], stored[0]) if swap else stored
    resized = resized_size(upright, size)
    if crop is None:
        box: tuple[float, float, float, float] = (0.0, 0.0, float(upright[0]), float(upright[1]))
        out = resized
    else:
        height, width = crop
        left = int(round((resized[0] - width) / 2.0))
        top = int(round((resized[1] - height) / 2.0))
        sx, sy = upright[0] / resized[0], upright[1] / resized[1]
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        out = (width, height)
    return ResizePlan(resized, out, _stored_box(box, stored, orientation), swap, _UPRIGHT.get(orientation))


def draft_request(resized_stored: tuple[int, int], gap: float = DECODE_GAP) -> tuple[int, int]:
    """The size to ask the JPEG decoder for (``Image.draft``), in stored orientation.

    libjpeg picks the largest scale 1/s (s in 1, 2, 4, 8) whose image is still at least this
    big on both axes, so every axis keeps ``gap`` source pixels per resized pixel.
    """
    return (max(1, math.ceil(resized_stored[0] * gap)), max(1, math.ceil(resized_stored[1] * gap)))


def resized_size(size: tuple[int, int], target: int | tuple[int, int]) -> tuple[int, int]:
    """Pillow (width, height): shortest edge to ``target`` (aspect kept), or exactly [h, w]."""
    width, height = size
    if not isinstance(target, int):
        return (target[1], target[0])
    if width <= height:
        return (target, max(1, int(target * height / width)))
    return (max(1, int(target * width / height)), target)


def _stored_box(
    box: tuple[float, float, float, float], stored: tuple[int, int], orientation: int
) -> tuple[float, float, float, float]:
    """An upright-image region as the same region of the stored image."""
    w, h = stored

    def to_stored(u: float, v: float) -> tuple[float, float]:
        return {
            1: (u, v), 2: (w - u, v), 3: (w - u, h - v), 4: (u, h - v),
            5: (v, u), 6: (v, h - u), 7: (w - v, h - u), 8: (w - v, u),
        }[orientation]

    (x0, y0), (x1, y1) = to_stored(box[0], box[1]), to_stored(box[2], box[3])
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def _inside(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` with float rounding kept inside the image (Pillow refuses a box past its edge)."""
    return (max(0.0, box[0]), max(0.0, box[1]), min(float(size[0]), box[2]), min(float(size[1]), box[3]))


def _check_resized(plan: ResizePlan, config: ImageConfig, label: str) -> None:
    """Without a crop the whole resized image is the answer: bound it before it is made."""
    width, height = plan.output
    if width * height > config.max_pixels:
        raise RequestError(
            PAYLOAD_TOO_LARGE,
            f"{label} would be resized to {width}x{height} pixels, over the limit of "
            f"{config.max_pixels} pixels (this archive resizes without a crop, aspect kept); "
            "send a less elongated image",
        )


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is common and says nothing about the pixels
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _as_8bit(image: Image.Image, target: str, label: str) -> Image.Image:
    """The image in ``target`` mode (RGB or L): deep modes scaled, transparency on white."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        pixels = np.asarray(image)
        if mode == "I":
            pixels = np.clip(pixels, 0, 65535)
        image = Image.fromarray((pixels >> 8).astype(np.uint8), "L")
    elif mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        if not np.isfinite(pixels).all():
            raise RequestError(BAD_REQUEST, f"{label} has NaN or infinite pixel values")
        image = Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    elif "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == target else image.convert(target)


class _opened:
    """Image.open with the archive's formats, Pillow's failures turned into RequestErrors."""

    def __init__(self, data: bytes, config: ImageConfig, label: str) -> None:
        self.data, self.config, self.label = data, config, label
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        try:
            with warnings.catch_warnings():
                # Our own pixel limit is checked right after opening; Pillow's warning is noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.image = Image.open(io.BytesIO(self.data), formats=list(self.config.formats))
        except Image.DecompressionBombError as exc:
            raise RequestError(PAYLOAD_TOO_LARGE, f"{self.label}: {clip(str(exc), 160)}") from None
        except UnidentifiedImageError:
            raise RequestError(
                UNSUPPORTED_MEDIA_TYPE,
                f"{self.label} is not an image in an accepted format "
                f"({', '.join(self.config.formats)})",
            ) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise RequestError(
                BAD_REQUEST, f"{self.label} could not be read: {clip(str(exc))}"
            ) from None
        return self.image

    def __exit__(self, *exc: object) -> None:
        if self.image is not None:
            self.image.close()

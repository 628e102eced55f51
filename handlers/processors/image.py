"""Encoded image bytes -> one normalised pixel array, as the archive's ImageConfig declares.

Pure function of (bytes, config); every client mistake is a ``RequestError`` naming it:
too many bytes (413), a format the archive does not accept (415), a header claiming more pixels
than allowed, checked before any pixel is decoded (413: decompression bomb), and bytes Pillow
cannot decode (400).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

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
            converted = image.convert(config.channels if config.channels != "BGR" else "RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestError(
                BAD_REQUEST, f"{label} could not be decoded as {image.format}: {clip(str(exc))}"
            ) from None
    return preprocess(converted, config)


def preprocess(image: Image.Image, config: ImageConfig) -> np.ndarray:
    """A decoded RGB/L image -> resized, cropped, normalised float32 pixels."""
    image = image.resize(_resized_size(image.size, config.size), _RESAMPLE[config.resample])
    if config.crop is not None:
        image = center_crop(image, config.crop)
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


def _resized_size(size: tuple[int, int], target: int | tuple[int, int]) -> tuple[int, int]:
    """Pillow (width, height): shortest edge to ``target`` (aspect kept), or exactly [h, w]."""
    width, height = size
    if not isinstance(target, int):
        return (target[1], target[0])
    if width <= height:
        return (target, max(1, int(target * height / width)))
    return (max(1, int(target * width / height)), target)


def center_crop(image: Image.Image, crop: tuple[int, int]) -> Image.Image:
    height, width = crop
    left = int(round((image.width - width) / 2.0))
    top = int(round((image.height - height) / 2.0))
    return image.crop((left, top, left + width, top + height))


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

"""Pictures as phones, cameras and scanners make them, from photos that ship in packages.

Real photos (matplotlib's grace_hopper.jpg, scikit-image's astronaut/chelsea/coffee; no
downloads), upscaled to a 12 MP phone size, stored sideways with an EXIF Orientation tag, in
16-bit or float modes, with transparency, or absurdly elongated: each as encoded bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

PHONE_SIZE = (4032, 3024)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee")
# Transposition that undoes each EXIF orientation's (the tag says how to make it upright).
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def sample_photo(name: str) -> Image.Image:
    """A real RGB photo: "grace_hopper" (matplotlib) or one of ``SKIMAGE_PHOTOS``."""
    if name == "grace_hopper":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        with Image.open(path) as image:
            return image.convert("RGB")
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def encoded(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def phone_jpeg(name: str, size: tuple[int, int] = PHONE_SIZE, quality: int = 90) -> bytes:
    """The photo upscaled to a phone camera's size and re-encoded as its JPEG."""
    return encoded(sample_photo(name).resize(size, Image.Resampling.BICUBIC), "JPEG", quality=quality)


def stored_sideways(upright: Image.Image, orientation: int, fmt: str = "PNG") -> bytes:
    """``upright`` stored as a camera held otherwise would store it, with the EXIF tag that
    tells a viewer how to show it upright again."""
    stored = upright.transpose(_STORE[orientation]) if orientation in _STORE else upright
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encoded(stored, fmt, exif=exif.tobytes())


def grey(width: int = 96, height: int = 80, seed: int = 0) -> np.ndarray:
    """8-bit greyscale pixels with structure (gradients and noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 200 / width + y * 55 / height)
    return np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)


def sixteen_bit_png(pixels8: np.ndarray) -> bytes:
    """The same greyscale picture in 16 bits (each 8-bit value v as v * 257), mode I;16."""
    return encoded(Image.fromarray(pixels8.astype(np.uint16) * 257), "PNG")


def elongated_png(width: int = 1, height: int = 40_000, value: tuple[int, int, int] = (200, 60, 20)) -> bytes:
    """A few hundred bytes of solid-colour PNG with an absurd aspect ratio."""
    return encoded(Image.new("RGB", (width, height), value), "PNG", optimize=True)

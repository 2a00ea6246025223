"""Decode and validate pedestrian crops, and resize them to an encoder's input size.

The same function prepares images for enrolment (orchestrator) and for offline evaluation,
so both paths feed the encoder identical pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # a pedestrian crop is far smaller; this stops image bombs
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})


class ImageRejected(ValueError):
    """The bytes are not a usable crop; the message says why, in one line."""


def decode_crop(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Bytes of a JPEG/PNG/WebP/BMP crop -> uint8 RGB array [H, W, 3] at `size` (H, W)."""
    if not data:
        raise ImageRejected("empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRejected(f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise ImageRejected(f"unsupported image format {img.format}")
            width, height = img.size
            if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
                raise ImageRejected(f"image size {width}x{height} is out of range")
            img.load()
    except ImageRejected:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"not a decodable image: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(f"corrupt image: {exc}") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Flatten transparency onto grey rather than black so crops keep their contrast.
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (128, 128, 128))
        img.paste(rgba, mask=rgba.getchannel("A"))
    height, width = size
    rgb = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()

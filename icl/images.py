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
# At most 2048x2048 pixels (4.2 MP) per crop, read from the header before any pixel is
# decoded. A full-height person in a 4K frame is about 1000x2160 (2.2 MP) and the encoders
# see 384x128; bigger images are no crops, and decoding a few bytes into a 30000x30000 canvas
# (an image bomb) or 16 MP per item would spend seconds of CPU per batch.
MAX_IMAGE_PIXELS = 2048 * 2048
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP"})


class ImageRejected(ValueError):
    """The bytes are not a usable crop; the message says why, in one line."""


def decode_crop(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Bytes of a JPEG/PNG/WebP/BMP crop -> uint8 RGB array [H, W, 3] at `size` (H, W).

    Every way the bytes can fail is an ImageRejected, never another exception: enrolment
    rejects that one item and keeps the rest of its batch.
    """
    if not data:
        raise ImageRejected("empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageRejected(f"image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, size)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow refused the header's size on its own (far above ours) before we could look.
        raise ImageRejected(
            f"image size is over {Image.MAX_IMAGE_PIXELS} pixels; "
            f"a crop may have at most {MAX_IMAGE_PIXELS}"
        ) from None
    except UnidentifiedImageError as exc:
        raise ImageRejected(f"not a decodable image: {exc}") from None
    except Exception as exc:
        # Pillow's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error,
        # ... on hostile bytes: each means a corrupt crop.
        raise ImageRejected(f"corrupt image: {type(exc).__name__}: {exc}") from None


def _decode(data: bytes, size: tuple[int, int]) -> np.ndarray:
    img = Image.open(io.BytesIO(data))  # reads the header only
    if img.format not in ALLOWED_FORMATS:
        raise ImageRejected(f"unsupported image format {img.format}")
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected(f"image size {width}x{height} is out of range")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageRejected(
            f"image size {width}x{height} is {width * height} pixels; "
            f"a crop may have at most {MAX_IMAGE_PIXELS}"
        )
    img.load()
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


class EncodedImage(np.ndarray):
    """RGB pixels that keep the bytes they were decoded from (`encoded`), read-only.

    A transport that sends encoded images (Triton's `mllm` model takes PNG/JPEG bytes) passes
    `encoded` on as it is instead of encoding the pixels again: a stored crop reaches the MLLM
    without a decode-encode round trip. Views and copies are plain arrays without `encoded`
    (their pixels may differ), and the pixels cannot be changed in place.
    """

    encoded: bytes | None

    @classmethod
    def decode(cls, data: bytes) -> EncodedImage:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.asarray(img.convert("RGB"))
        out = pixels.view(cls)
        out.encoded = data
        out.flags.writeable = False
        return out

    def __array_finalize__(self, obj: object) -> None:
        self.encoded = None


def encoded_bytes(image: np.ndarray) -> bytes | None:
    """The bytes `image` was decoded from, when it is an EncodedImage that still has them."""
    return image.encoded if isinstance(image, EncodedImage) else None

"""Decoding image files into RGB PIL images: the one place that decides what is readable.

Shared by the datasets, the zip writer (which checks headers only) and tools/predict.py.
"""
import struct
import warnings
import zlib
from typing import BinaryIO

import numpy as np
from PIL import Image

# What decoding a damaged file raises: PIL's UnidentifiedImageError is an OSError; truncated or
# malformed data surfaces as OSError, ValueError, SyntaxError, EOFError or struct.error, a damaged
# deflated zip member as zlib.error. An image of more than Image.MAX_IMAGE_PIXELS pixels (a decompression
# bomb, by PIL's limit) is refused from its header by open_image: DecompressionBombWarning up to twice the
# limit (made an error there), DecompressionBombError above.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                     Image.DecompressionBombError, Image.DecompressionBombWarning)

# Modes with more than 8 bits per pixel that hold 16-bit values: PNG, TIFF and PGM decoders give I;16* or,
# for some files (16-bit PGM), I. PIL's convert("RGB") clips them at 255, which turns a 16-bit image into an
# almost white one, so decode_image scales them to 8 bits itself.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def open_image(stream: BinaryIO) -> Image.Image:
    """Opens an image lazily: reads its header, checks its pixel count and decodes nothing.

    Raises:
        One of :data:`UNREADABLE_ERRORS`: not an image file, or more pixels than ``Image.MAX_IMAGE_PIXELS``.
    """
    with warnings.catch_warnings():
        # PIL only warns between the limit and twice the limit; decoding such an image can take gigabytes.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(stream)


def decode_image(stream: BinaryIO) -> Image.Image:
    """Decodes an image fully into an RGB PIL image (all decoding errors surface here, not later).

    The pixel count is checked from the header before anything is decoded. 16-bit images are scaled to
    8 bits (value * 255 / 65535).

    Raises:
        One of :data:`UNREADABLE_ERRORS`: a damaged file, more pixels than ``Image.MAX_IMAGE_PIXELS``, or
        pixels without a known range (32-bit float, or 32-bit integers outside 0..65535).
    """
    image = open_image(stream)
    if image.mode == "RGB":
        image.load()  # convert() would make a copy that RGB images do not need
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _sixteen_bit_to_rgb(image)
    return image.convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """A single-channel image of 16-bit values as 8-bit RGB; other ranges are refused (ValueError)."""
    if image.mode == "F":
        raise ValueError("32-bit floating-point pixels (mode F) have no standard range; save the image with 8 or "
                         "16 bits per channel")
    pixels = np.asarray(image)
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise ValueError(f"32-bit integer pixels (mode {image.mode}) range over {low}..{high}, outside the 16-bit "
                         "range 0..65535; save the image with 8 or 16 bits per channel")
    scaled = (pixels.astype(np.uint32) * 255 + 32767) // 65535  # rounded to the nearest 8-bit value
    return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")

"""Decoding images: into RGB PIL images on the CPU (the one place that decides what is readable), and JPEGs in
batches on the training device for the device pipeline.

Shared by the datasets, the zip writer (which checks headers only), tools/predict.py and data.pipelines.
"""
import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO, List, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

# What decoding a damaged file raises: PIL's UnidentifiedImageError is an OSError; truncated or
# malformed data surfaces as OSError, ValueError, SyntaxError, EOFError or struct.error, a damaged
# deflated zip member as zlib.error. An image of more than Image.MAX_IMAGE_PIXELS pixels (a decompression
# bomb, by PIL's limit) is refused from its header by open_image: DecompressionBombWarning up to twice the
# limit (made an error there), DecompressionBombError above.
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                     Image.DecompressionBombError, Image.DecompressionBombWarning)

# Modes with more than 8 bits per pixel. PNG and TIFF decoders give I;16* for 16-bit images, PGM gives I for them
# (its header declares a range above 255); PIL's convert("RGB") clips them at 255, which turns a 16-bit image into an
# almost white one, so decode_image scales them to 8 bits itself. Mode I is also PIL's 32-bit integer mode (TIFF),
# which declares no range: its values decide (see _high_bit_depth_to_rgb).
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Formats whose mode I images are 16-bit by their header.
_SIXTEEN_BIT_FORMATS = ("PPM",)


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
    8 bits (value * 255 / 65535). A 32-bit integer image (mode I, e.g. a TIFF) declares no range: when its values
    all lie in 0..255 they are taken as 8-bit values, in 0..65535 as 16-bit ones.

    Raises:
        One of :data:`UNREADABLE_ERRORS`: a damaged file, more pixels than ``Image.MAX_IMAGE_PIXELS``, or
        pixels without a known range (32-bit float, or 32-bit integers outside 0..65535).
    """
    image = open_image(stream)
    if image.mode == "RGB":
        image.load()  # convert() would make a copy that RGB images do not need
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_rgb(image)
    return image.convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits as 8-bit RGB; values without a known range are refused
    (ValueError)."""
    if image.mode == "F":
        raise ValueError("32-bit floating-point pixels (mode F) have no standard range; save the image with 8 or "
                         "16 bits per channel")
    pixels = np.asarray(image)
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise ValueError(f"32-bit integer pixels (mode {image.mode}) range over {low}..{high}, outside the 16-bit "
                         "range 0..65535; save the image with 8 or 16 bits per channel")
    if image.mode == "I" and image.format not in _SIXTEEN_BIT_FORMATS and high <= 255:
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")  # 8-bit values in a 32-bit container
    scaled = (pixels.astype(np.uint32) * 255 + 32767) // 65535  # rounded to the nearest 8-bit value
    return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")


@dataclass
class JpegHeader:
    """What the frame header of a JPEG says, and whether the device decoder is asked to decode it.

    Attributes:
        height, width: the image size in pixels (0 when the header was not found).
        cpu_reason: why the image is decoded on the CPU instead (``""``: the device decodes it).
    """
    height: int
    width: int
    cpu_reason: str = ""


# Start-of-frame markers: 0xC0 baseline and 0xC1 extended sequential Huffman JPEGs (8-bit, 1 or 3 components)
# go to the device decoder. Progressive (0xC2) ones would be decoded one by one with a host sync each by nvJPEG's
# hybrid path, so, like lossless and arithmetic-coded ones (rare), they are decoded on the CPU.
_DEVICE_FRAMES = (0xC0, 0xC1)
_OTHER_FRAMES = {0xC2: "progressive JPEG", 0xC3: "lossless JPEG", 0xC5: "hierarchical JPEG", 0xC6: "hierarchical JPEG",
                 0xC7: "hierarchical JPEG", 0xC9: "arithmetic-coded JPEG", 0xCA: "arithmetic-coded JPEG",
                 0xCB: "arithmetic-coded JPEG", 0xCD: "arithmetic-coded JPEG", 0xCE: "arithmetic-coded JPEG",
                 0xCF: "arithmetic-coded JPEG"}
# Markers without a length field.
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}


def jpeg_header(data: bytes) -> JpegHeader:
    """Reads the markers of an encoded image up to its frame header, decoding nothing.

    Anything but a plain 8-bit grayscale or YCbCr JPEG within ``Image.MAX_IMAGE_PIXELS`` gets a ``cpu_reason``
    (not a JPEG, progressive, CMYK, 12-bit, Adobe RGB, too many pixels, a damaged header): :func:`decode_image`
    then decides on the CPU whether and how it is read, so that what is readable is decided in one place.
    """
    if data[:2] != b"\xff\xd8":
        return JpegHeader(0, 0, "not a JPEG")
    position, adobe_rgb = 2, False
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return JpegHeader(0, 0, "damaged JPEG header")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        segment = data[position + 4:position + 2 + length]
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_rgb = segment[11] == 0  # colour transform 0: RGB or CMYK, not YCbCr
        if marker in _DEVICE_FRAMES or marker in _OTHER_FRAMES:
            if len(segment) < 6:
                return JpegHeader(0, 0, "damaged JPEG header")
            precision, height, width, components = segment[0], int.from_bytes(segment[1:3], "big"), \
                int.from_bytes(segment[3:5], "big"), segment[5]
            reason = _OTHER_FRAMES.get(marker, "")
            if not reason:
                if precision != 8:
                    reason = f"{precision}-bit JPEG"
                elif components == 4:
                    reason = "CMYK JPEG"
                elif components not in (1, 3) or (components == 3 and adobe_rgb):
                    reason = "unusual colour JPEG"
                elif height == 0 or width == 0 or height * width > (Image.MAX_IMAGE_PIXELS or math.inf):
                    reason = "JPEG size out of range"
            return JpegHeader(height, width, reason)
        if marker == 0xDA:  # scan data before any frame header
            break
        position += 2 + length
    return JpegHeader(0, 0, "damaged JPEG header")


def decode_jpegs(encoded: List[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    """Decodes JPEGs on ``device`` in one batch: the seam where another decoder (torchcodec) can replace
    torchvision's.

    Args:
        encoded: the encoded bytes of each image, uint8 CPU tensors.
        device: where to decode (nvJPEG on CUDA, libjpeg-turbo on the CPU) and put the results.

    Returns:
        Each image as uint8 (3, H, W) on ``device``, or None for one the decoder refused (damaged data).
    """
    if not encoded:
        return []
    with warnings.catch_warnings():
        # torchvision 0.29 announces that torchcodec will take its decoders over; this call is the seam for that.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one damaged image fails the whole batch: find it
            decoded: List[Optional[torch.Tensor]] = []
            for data in encoded:
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded

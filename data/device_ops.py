"""Image operations on batches of tensors, written to give what PIL gives for the same parameters.

The device pipeline (``data.device_transforms``) runs timm's training transform on the training device with
these. Images are float32 tensors ``(N, 3, H, W)`` holding whole numbers 0..255 (the values of PIL's 8-bit
images); each operation rounds or truncates where PIL's C code does, so that a chain of operations stays on
the same value lattice as PIL's. Parameters are per sample: tensors of length N (or a matrix per sample).

Where the result can differ from PIL's (the resampling of the resized crop, which PIL computes in fixed point
with an 8-bit intermediate between its two passes), the tests state the tolerance.
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

# PIL's RGB -> L weights, in 16-bit fixed point (libImaging/Convert.c), so that grayscale values match exactly.
_LUMA_WEIGHTS = (19595, 38470, 7471)


def as_column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values shaped to broadcast against ``like`` (N, C, H, W)."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def resized_crop(image: torch.Tensor, top: int, left: int, height: int, width: int, size: Sequence[int],
                 mode: str) -> torch.Tensor:
    """One image's crop resized to ``size`` (h, w) as PIL resizes it: (3, H, W) -> (3, h, w), values 0..255.

    ``mode`` is ``bicubic`` or ``bilinear``: torch's antialiased kernels are PIL's filters. Like PIL, the width
    is resampled first and rounded to whole values, then the height; a side already of the output size is
    left alone.
    """
    crop = image[None, :, top:top + height, left:left + width].float()
    if width != size[1]:
        crop = F.interpolate(crop, size=(height, size[1]), mode=mode, align_corners=False, antialias=True)
        crop = crop.round_().clamp_(0, 255)
    if height != size[0]:
        crop = F.interpolate(crop, size=tuple(size), mode=mode, align_corners=False, antialias=True)
        crop = crop.round_().clamp_(0, 255)
    return crop[0]


def apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Maps every value through a per-sample, per-channel table: images (N, C, H, W), lut (N, C, 256)."""
    n, c, h, w = images.shape
    indices = images.reshape(n, c, h * w).long()
    return lut.to(images.dtype).gather(2, indices).reshape(n, c, h, w)


def _levels(images: torch.Tensor) -> torch.Tensor:
    """The 256 levels as a (1, 1, 256) table, to build lookup tables from."""
    return torch.arange(256, device=images.device, dtype=torch.float64).reshape(1, 1, 256)


def invert(images: torch.Tensor) -> torch.Tensor:
    return 255.0 - images


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keeps the ``bits`` high bits of each value; 8 or more leaves the image, 0 or less makes it black (as
    ``data.transforms._posterize``)."""
    bits = bits.to(images.device, torch.int64).clamp(0, 8)
    mask = (0xFF << (8 - bits)) & 0xFF  # 0 bits: mask 0, a black image
    return (images.long() & as_column(mask, images).long()).to(images.dtype)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Values at or above ``threshold`` are inverted (ImageOps.solarize)."""
    return torch.where(images < as_column(threshold, images), images, 255.0 - images)


def solarize_add(images: torch.Tensor, add: torch.Tensor, threshold: float = 128) -> torch.Tensor:
    """Adds ``add`` to values below ``threshold``, capped at 255 (timm's solarize_add)."""
    return torch.where(images < threshold, (images + as_column(add, images)).clamp(max=255.0), images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretches each channel from its lowest to its highest value over 0..255 (ImageOps.autocontrast).

    The table is computed in float64 and truncated, as PIL computes it in Python.
    """
    low = images.amin(dim=(2, 3), keepdim=True).double()[..., 0]  # (N, C, 1)
    high = images.amax(dim=(2, 3), keepdim=True).double()[..., 0]
    scale = 255.0 / (high - low).clamp(min=1)
    offset = -low * scale
    lut = (_levels(images) * scale + offset).trunc().clamp(0, 255)
    lut = torch.where(high > low, lut, _levels(images).expand_as(lut))
    return apply_lut(images, lut)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Equalizes each channel's histogram (ImageOps.equalize, its integer arithmetic exactly)."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).long()
    histogram = torch.zeros(n * c, 256, dtype=torch.int64, device=images.device)
    histogram.scatter_add_(1, flat, torch.ones_like(flat))
    levels = torch.arange(256, device=images.device)
    last_used = torch.where(histogram > 0, levels, -1).amax(dim=1, keepdim=True)  # the highest value present
    last_count = histogram.gather(1, last_used.clamp(min=0))
    step = (histogram.sum(dim=1, keepdim=True) - last_count) // 255
    before = histogram.cumsum(dim=1) - histogram  # pixels below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)
    # One value present, or too few pixels below the top value: PIL leaves the channel as it is.
    keep = ((histogram > 0).sum(dim=1, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(keep, levels.expand_as(lut), lut)
    return apply_lut(images, lut.reshape(n, c, 256))


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``degenerate + factor * (images - degenerate)``, truncated and clipped to 0..255 (Image.blend, which
    ImageEnhance's Color, Contrast, Brightness and Sharpness use)."""
    factor = as_column(factor, images)
    return (degenerate + factor * (images - degenerate)).clamp_(0, 255).floor_()


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (rounded 16-bit fixed point), (N, 1, H, W)."""
    r, g, b = images.long().unbind(1)
    luma = (r * _LUMA_WEIGHTS[0] + g * _LUMA_WEIGHTS[1] + b * _LUMA_WEIGHTS[2] + 0x8000) >> 16
    return luma.to(images.dtype)[:, None]


def adjust_color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blends with the grayscale image."""
    return blend(grayscale(images).expand_as(images), images, factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blends with a flat image of the (rounded) mean gray level."""
    mean = (grayscale(images).mean(dim=(1, 2, 3), dtype=torch.float64) + 0.5).floor()
    return blend(as_column(mean, images).expand_as(images), images, factor)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blends with black."""
    return blend(torch.zeros_like(images), images, factor)


def adjust_sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blends with the image smoothed by PIL's SMOOTH kernel (border pixels kept)."""
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=images.device) / 13.0
    channels = images.shape[1]
    smooth = F.conv2d(images, kernel.expand(channels, 1, 3, 3).to(images.dtype), groups=channels)
    degenerate = images.clone()
    degenerate[:, :, 1:-1, 1:-1] = (smooth + 0.5).floor_().clamp_(0, 255)
    return blend(degenerate, images, factor)


def rotation_matrix(degrees: float, width: int, height: int) -> Tuple[float, ...]:
    """The inverse affine matrix PIL's ``Image.rotate(degrees)`` samples with (about the centre, no expand)."""
    angle = -math.radians(degrees)
    a, b, d, e = round(math.cos(angle), 15), round(math.sin(angle), 15), round(-math.sin(angle), 15), \
        round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy


def _cubic_weights(t: torch.Tensor) -> List[torch.Tensor]:
    """PIL's transform filter, Keys' cubic with a = -1, for the 4 taps around a sample at fraction ``t``."""
    return [-t + 2 * t ** 2 - t ** 3, 1 - 2 * t ** 2 + t ** 3, t + t ** 2 - t ** 3, -(t ** 2) + t ** 3]


def affine(images: torch.Tensor, matrices: torch.Tensor, bicubic: torch.Tensor, fill: Sequence[float]) -> torch.Tensor:
    """``Image.transform(size, AFFINE, matrix, resample, fillcolor)`` for each image (libImaging/Geometry.c).

    Output pixel (x, y) samples the input at ``(a*(x+.5) + b*(y+.5) + c, d*(x+.5) + e*(y+.5) + f)``; a point
    outside the image takes ``fill``; inside, bicubic (a = -1) or bilinear interpolation over edge-clamped
    neighbours, truncated to an integer and clipped to 0..255, as PIL does.

    Args:
        images: (N, C, H, W).
        matrices: (N, 6) float64 inverse matrices.
        bicubic: (N,) bool, True for bicubic, False for bilinear.
        fill: the fill value of each channel.
    """
    n, c, h, w = images.shape
    device = images.device
    a = matrices.to(device, torch.float64)
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64) + 0.5,
                            torch.arange(w, device=device, dtype=torch.float64) + 0.5, indexing="ij")
    x_in = a[:, 0, None, None] * xs + a[:, 1, None, None] * ys + a[:, 2, None, None]
    y_in = a[:, 3, None, None] * xs + a[:, 4, None, None] * ys + a[:, 5, None, None]
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = x_in.floor(), y_in.floor()
    tx, ty = x_in - x0, y_in - y0
    x0, y0 = x0.long(), y0.long()
    cubic = bicubic.to(device).reshape(n, 1, 1)
    # Bilinear is the cubic scheme with taps -1 and +2 weighted zero.
    wx = [torch.where(cubic, cw, lw) for cw, lw in zip(_cubic_weights(tx), (0 * tx, 1 - tx, tx, 0 * tx))]
    wy = [torch.where(cubic, cw, lw) for cw, lw in zip(_cubic_weights(ty), (0 * ty, 1 - ty, ty, 0 * ty))]
    flat = images.reshape(n, c, h * w)
    result = torch.zeros(n, c, h, w, device=device, dtype=torch.float64)
    for row in range(4):
        yy = (y0 + row - 1).clamp(0, h - 1)
        row_sum = torch.zeros_like(result)
        for column in range(4):
            xx = (x0 + column - 1).clamp(0, w - 1)
            index = (yy * w + xx).reshape(n, 1, h * w).expand(n, c, h * w)
            row_sum += flat.gather(2, index).reshape(n, c, h, w).double() * wx[column][:, None]
        result += row_sum * wy[row][:, None]
    result = result.clamp_(0, 255).trunc_().to(images.dtype)
    fill_value = torch.tensor(list(fill), device=device, dtype=images.dtype).reshape(1, c, 1, 1)
    return torch.where(inside[:, None], result, fill_value)


def normal_noise(seeds: torch.Tensor, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Standard normal values (N, *shape), each sample's a function of its seed alone, the same on every device.

    A counter-based generator: each value hashes (seed, position) with 32-bit integer mixing rounds (kept
    below 2^63 in int64 arithmetic), and pairs of uniforms become normals by the Box-Muller transform. The
    result depends on nothing but the seed and the position, not on the batch, the device or a global stream.
    """
    count = math.prod(shape)
    seeds = seeds.to(device, torch.int64).reshape(-1, 1)
    positions = torch.arange(count, device=device, dtype=torch.int64).reshape(1, -1)
    key_low, key_high = seeds & 0xFFFFFFFF, (seeds >> 32) & 0x7FFFFFFF

    def uniform(stream: int) -> torch.Tensor:
        value = (positions * 2 + stream) ^ key_low
        for key in (key_high, key_low, key_high):
            value = (((value >> 16) ^ value) * 0x45D9F3B) & 0xFFFFFFFF
            value = (((value >> 16) ^ value) * 0x45D9F3B) & 0xFFFFFFFF
            value = ((value >> 16) ^ value ^ key) & 0xFFFFFFFF
        return ((value >> 8).double() + 0.5) / 2 ** 24  # in (0, 1), never 0

    radius = torch.sqrt(-2.0 * torch.log(uniform(0)))
    return (radius * torch.cos(2 * math.pi * uniform(1))).float().reshape(-1, *shape)

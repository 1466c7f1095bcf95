"""Fused cyclic shift + window partition (and its inverse) for shifted-window Swin blocks.

Usage::

    from kernels.window_process import is_available, roll_and_window_partition, window_merge_and_roll

    if is_available(x.device):
        windows = roll_and_window_partition(x, shift, window)  # x: (B, H, W, C)
        x = window_merge_and_roll(windows, B, H, W, shift, window)
"""

from kernels.window_process.ops import is_available, roll_and_window_partition, window_merge_and_roll
from kernels.window_process.reference import (
    reference_roll_and_window_partition,
    reference_window_merge_and_roll,
)

__all__ = [
    "is_available",
    "reference_roll_and_window_partition",
    "reference_window_merge_and_roll",
    "roll_and_window_partition",
    "window_merge_and_roll",
]

"""Pure-PyTorch reference of the fused window-process ops: the ground truth of the tests and the fallback path."""

import torch


def reference_roll_and_window_partition(x: torch.Tensor, shift: int, window: int) -> torch.Tensor:
    """Cyclically shifts an image by ``-shift`` along H and W, then cuts it into non-overlapping windows.

    Args:
        x: Image of shape (B, H, W, C); H and W must be multiples of ``window``.
        shift: Cyclic shift in pixels; 0 gives the plain window partition.
        window: Window size.

    Returns:
        Windows of shape (B * nW, window, window, C), ordered (batch, row of windows, column of windows).
    """
    batch, height, width, channels = x.shape
    if shift != 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)


def reference_window_merge_and_roll(
    windows: torch.Tensor, batch: int, height: int, width: int, shift: int, window: int
) -> torch.Tensor:
    """Inverse of :func:`reference_roll_and_window_partition`: merges windows and shifts the image back by ``+shift``.

    Args:
        windows: Windows of shape (B * nW, window, window, C).
        batch: Batch size B of the image.
        height: Image height H, a multiple of ``window``.
        width: Image width W, a multiple of ``window``.
        shift: Cyclic shift in pixels that was applied before the partition.
        window: Window size.

    Returns:
        Image of shape (B, H, W, C).
    """
    channels = windows.shape[-1]
    x = windows.reshape(batch, height // window, width // window, window, window, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)
    if shift != 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x

"""Swin-MLP: V1's skeleton with window attention replaced by a spatial MLP over each window's tokens.

Only the token mixing and its shifted-window padding are here; blocks, stages, patch merging, the trunk and FLOPs
are the shared parts of :mod:`models.swin_transformer`. Parameter names are those of the released checkpoints.
"""
import logging
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.swin_transformer import PatchMerging, WindowBlock, WindowTransformer, window_partition, window_reverse

logger = logging.getLogger(__name__)


class SwinMLPBlock(WindowBlock):
    """Norm -> spatial MLP in (shifted) windows -> residual, norm -> MLP -> residual.

    The spatial MLP is a grouped 1x1 Conv1d: per head (C / heads channels), each output token of a window is a
    learned combination of the window's tokens. Shifted blocks zero-pad the map by (window - shift) before and
    by shift after on each axis, instead of rolling it, so no window mixes far-apart regions and no mask is
    needed: zero tokens contribute nothing to the combination (padding to other input sizes is exact the same way).

    Args:
        dim: channels.
        num_heads: groups of the spatial MLP.
        window_size: window side (already clamped to the stage resolution by the stage).
        shift_size: shift of the windows; 0 for unshifted blocks.
        mlp_ratio: MLP hidden size over ``dim``.
        drop_path: stochastic depth rate of this block.
        fused_window_process: unshifted blocks partition with the fused kernel where it is available (shifted
            ones pad instead of rolling, which the kernel does not do).
    """

    masked_windows = False

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, mlp_ratio: float = 4.0,
                 drop: float = 0.0, drop_path: float = 0.0, fused_window_process: bool = False):
        super().__init__(dim, window_size, shift_size, mlp_ratio, fused_window_process)
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        tokens = num_heads * window_size ** 2
        self.spatial_mlp = nn.Conv1d(tokens, tokens, kernel_size=1, groups=num_heads)
        self._add_ffn(drop, drop_path)

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        if not self.shift_size:
            return super()._partition(x)
        before, after = self.window_size - self.shift_size, self.shift_size
        return window_partition(F.pad(x, (0, 0, before, after, before, after)), self.window_size)

    def _merge(self, windows: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        if not self.shift_size:
            return super()._merge(windows, B, H, W)
        ws, before = self.window_size, self.window_size - self.shift_size
        x = window_reverse(windows, ws, H + ws, W + ws)
        return x[:, before:before + H, before:before + W, :]

    def mix_tokens(self, windows: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B * nW, N, C) -> (B * nW, N, C): per head, each token a learned combination of the window's tokens."""
        BnW, N, C = windows.shape
        nH = self.num_heads
        heads = windows.reshape(BnW, N, nH, C // nH).transpose(1, 2).reshape(BnW, nH * N, C // nH)
        mixed = self.spatial_mlp(heads)
        return mixed.reshape(BnW, nH, N, C // nH).transpose(1, 2).reshape(BnW, N, C)

    def mixing_flops(self, H: int, W: int) -> float:
        ws = self.window_size
        # The reference counts the padded map's windows for shifted blocks.
        windows = (H / ws + 1) * (W / ws + 1) if self.shift_size else H * W / ws / ws
        return windows * self.dim * ws ** 2 * ws ** 2


class SwinMLP(WindowTransformer):
    """Swin-MLP classifier; argument names are those of the reference constructor.

    Args:
        img_size: configured input size; fixes the stage resolutions, windows and position embedding.
        patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size, mlp_ratio, drop_rate,
        drop_path_rate, ape, patch_norm, use_checkpoint: as the reference.
        fused_window_process: unshifted blocks use the fused partition kernel where it is available.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 fused_window_process: bool = False):
        super().__init__()

        def make_block(stage: int, window: int, shift: int, drop_path: float) -> SwinMLPBlock:
            return SwinMLPBlock(int(embed_dim * 2 ** stage), num_heads[stage], window, shift, mlp_ratio, drop_rate,
                                drop_path, fused_window_process)

        self._build_trunk(img_size, patch_size, in_chans, num_classes, embed_dim, depths, window_size, drop_rate,
                          drop_path_rate, ape, patch_norm, use_checkpoint, make_block, PatchMerging)
        self.apply(self._init_weights)

"""Swin Transformer V2 (Liu et al., CVPR 2022), with the parameter names of the released checkpoints.

Only what differs from V1 is here (scaled cosine attention, the continuous position bias, residual post-norm,
patch merging that normalises after the reduction); padding, windows, masks, stages, the trunk and FLOPs are the
shared parts of :mod:`models.swin_transformer`.
"""
import logging
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.swin_transformer import (PatchMerging, WindowAttentionBase, WindowBlock, WindowTransformer,
                                     relative_position_index)

logger = logging.getLogger(__name__)

# Upper bound of the learned log-temperature: attention logits are at most 100 x the cosine. A Python float, not a
# tensor: a CPU tensor fails against CUDA parameters, and reading one back with .item() breaks torch.compile graphs.
LOGIT_SCALE_MAX = math.log(100.0)
# Hidden width of the continuous position bias MLP, and the bound of its output (16 * sigmoid).
CPB_HIDDEN = 512
CPB_BOUND = 16.0
# F.normalize's default: the smallest norm divided by.
NORMALIZE_EPS = 1e-12


def relative_coords_table(window_size: int, pretrained_window_size: int = 0) -> torch.Tensor:
    """Log-spaced relative coordinates of a window, the input of the continuous position bias MLP.

    Offsets in [-(W-1), W-1] per axis are divided by (pretrained window - 1), or (W - 1) when no pretrained
    window is given, so a model fine-tuned to a larger window extrapolates from the range it was trained on;
    then scaled to [-8, 8] and mapped through sign(x) * log2(|x| + 1) / log2(8).

    Returns:
        (1, 2W-1, 2W-1, 2) float32.
    """
    span = pretrained_window_size if pretrained_window_size > 0 else window_size
    offsets = torch.arange(-(window_size - 1), window_size, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).unsqueeze(0)
    table = table / max(span - 1, 1) * 8  # a window of 1 has the single offset 0; avoid 0 / 0
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)


class WindowAttentionV2(WindowAttentionBase):
    """Scaled cosine attention inside windows with a continuous (MLP-generated) relative position bias.

    Every attention path of :class:`WindowAttentionBase` serves it: q and k are L2-normalised and the clamped
    per-head temperature is folded into q, so attention runs with ``scale`` 1.

    Args:
        dim: channels.
        window_size: side of the square window.
        num_heads: attention heads.
        qkv_bias: learn ``q_bias`` and ``v_bias`` (the key has none).
        attn_drop, proj_drop: dropout rates.
        attn_impl: one of ``ATTN_IMPLS`` (see :class:`WindowAttentionBase`).
        pretrained_window_size: window the position bias was pretrained with (0: this window).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_impl: str = "auto", pretrained_window_size: int = 0):
        super().__init__()
        self.check_attn_impl(attn_impl, attn_drop)
        self.dim = dim
        self.window_size = window_size
        self.pretrained_window_size = pretrained_window_size
        self.num_heads = num_heads
        self.scale = 1.0
        self.attn_impl = attn_impl
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, CPB_HIDDEN, bias=True), nn.ReLU(inplace=True),
                                     nn.Linear(CPB_HIDDEN, num_heads, bias=False))
        self.register_buffer("relative_coords_table", relative_coords_table(window_size, pretrained_window_size),
                             persistent=False)
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias_table(self) -> torch.Tensor:
        """((2 ws - 1)^2, num_heads): the MLP's bias for each offset, bounded by 16 * sigmoid. The reference bounds
        the gathered (N, N) bias; bounding the table first gives the same values for (2 ws - 1)^2 rows, not N^2."""
        return CPB_BOUND * torch.sigmoid(self.cpb_mlp(self.relative_coords_table).reshape(-1, self.num_heads))

    def temperature(self) -> torch.Tensor:
        """(num_heads, 1, 1) multiplier of the cosine similarities, exp of the clamped learned log-temperature."""
        return torch.clamp(self.logit_scale, max=LOGIT_SCALE_MAX).exp()

    def query_key_value(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        BnW, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(BnW, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # cos(q, k) * t == (t * q / |q|) . (k / |k|): the temperature rides on q, attention scale is 1.
        # F.normalize's default eps (1e-12) is 0 in float16, where a zero query (a padding token with no q_bias)
        # would become 0 / 0; the smallest normal number of the dtype keeps it 0 and changes nothing else.
        eps = max(NORMALIZE_EPS, torch.finfo(q.dtype).tiny)
        return F.normalize(q, dim=-1, eps=eps) * self.temperature(), F.normalize(k, dim=-1, eps=eps), v


class SwinTransformerV2Block(WindowBlock):
    """(Shifted) window cosine attention -> norm -> residual, MLP -> norm -> residual (residual post-norm).

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window side (already clamped to the stage resolution by the stage).
        shift_size: cyclic shift; 0 for unshifted blocks.
        mlp_ratio: MLP hidden size over ``dim``.
        drop_path: stochastic depth rate of this block.
        pretrained_window_size: window the position bias was pretrained with (0: this window).
        fused_window_process: roll + partition with the fused kernel where it is available.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 pretrained_window_size: int = 0, attn_impl: str = "auto", fused_window_process: bool = False):
        super().__init__(dim, window_size, shift_size, mlp_ratio, fused_window_process)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttentionV2(dim, window_size, num_heads, qkv_bias, attn_drop, drop, attn_impl,
                                      pretrained_window_size)
        self._add_ffn(drop, drop_path)

    def mix_tokens(self, windows: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.attn(windows, mask)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C); ``mask`` as for :class:`models.swin_transformer.SwinTransformerBlock`."""
        x = x + self.drop_path(self.norm1(self.window_mix(x, mask)))
        return x + self.drop_path(self.norm2(self.mlp(x)))

    def mixing_flops(self, H: int, W: int) -> float:
        return H * W / self.window_size / self.window_size * self.attn.flops(self.window_size ** 2)


class PatchMergingV2(PatchMerging):
    """Concatenates each 2x2 neighbourhood, projects 4C -> 2C, then normalises the 2C channels."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.norm = nn.LayerNorm(2 * dim)  # replaces V1's LayerNorm(4C) in place, keeping the parameter order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        return self.norm(self.reduction(self.gather(x)))

    def flops(self, H: int, W: int) -> int:
        return (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim + H * W * self.dim // 2


class SwinTransformerV2(WindowTransformer):
    """Swin Transformer V2 classifier; argument names are those of the reference constructor.

    Args:
        img_size: configured input size; fixes the stage resolutions, windows and position embedding.
        patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias,
        drop_rate, attn_drop_rate, drop_path_rate, ape, patch_norm, use_checkpoint: as the reference.
        pretrained_window_sizes: per stage, the window its position bias was pretrained with (0: its own).
        attn_impl: attention path, one of ``ATTN_IMPLS`` (see WindowAttentionBase).
        fused_window_process: use the fused roll + partition kernel where it is available.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
                 attn_impl: str = "auto", fused_window_process: bool = False):
        super().__init__()
        # As the reference, entries beyond the last stage are ignored (the default lists four).
        if len(pretrained_window_sizes) < len(depths):
            raise ValueError(f"pretrained_window_sizes {list(pretrained_window_sizes)} needs one entry per stage "
                             f"({len(depths)} stages)")
        self.pretrained_window_sizes = tuple(pretrained_window_sizes[:len(depths)])

        def make_block(stage: int, window: int, shift: int, drop_path: float) -> SwinTransformerV2Block:
            return SwinTransformerV2Block(int(embed_dim * 2 ** stage), num_heads[stage], window, shift, mlp_ratio,
                                          qkv_bias, drop_rate, attn_drop_rate, drop_path,
                                          pretrained_window_sizes[stage], attn_impl, fused_window_process)

        self._build_trunk(img_size, patch_size, in_chans, num_classes, embed_dim, depths, window_size, drop_rate,
                          drop_path_rate, ape, patch_norm, use_checkpoint, make_block, PatchMergingV2)
        self.apply(self._init_weights)
        # Post-norm blocks start as identities: each residual branch's norm begins at zero (the reference's init).
        for layer in self.layers:
            for block in layer.blocks:
                for norm in (block.norm1, block.norm2):
                    nn.init.zeros_(norm.weight)
                    nn.init.zeros_(norm.bias)

    def no_weight_decay_keywords(self) -> set:
        """Name fragments whose parameters are exempt from weight decay (the reference's V2 set)."""
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

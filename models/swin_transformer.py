"""Swin Transformer V1 (Liu et al., ICCV 2021), with the parameter names of the released checkpoints.

Feature maps travel between modules as (B, H, W, C). Any input size works: each block pads its map to a
multiple of its window and crops back, with attention masks built for the actual size and cached.
"""
import functools
import logging
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from models import window_flex

logger = logging.getLogger(__name__)

# Added to the attention logits of token pairs that must not attend to each other. The reference uses
# -100 rather than -inf: exp(-100) is 0 in every float format, and a fully masked row stays finite.
MASK_VALUE = -100.0
# Attention paths (see WindowAttentionBase); the FlexAttention ones need torch.nn.attention.flex_attention.
ATTN_IMPLS = ("auto", "sdpa", "explicit", "flex", "flex_grid")
FLEX_IMPLS = ("flex", "flex_grid")
# Alignment, in elements, of the rows of an SDPA mask that CUDA's memory-efficient kernel reads without copying.
SDPA_MASK_ALIGNMENT = 8
# Masks kept per stage for input sizes other than the configured one, least recently used dropped first, so
# a stream of varying sizes (detection, multi-scale evaluation) cannot grow memory without bound.
MASK_CACHE_SIZE = 8
# Layouts of the maps that forward_intermediates returns (timm's names).
OUTPUT_FORMATS = ("NCHW", "NHWC")


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cuts a map into non-overlapping windows.

    Args:
        x: (B, H, W, C), H and W multiples of ``window_size``.

    Returns:
        (B * nW, window_size, window_size, C), windows ordered by image, then row, then column.
    """
    B, H, W, C = x.shape
    x = x.reshape(B, H // window_size, window_size, W // window_size, window_size, C)
    return copy_if_symbolic(x.permute(0, 1, 3, 2, 4, 5)).reshape(-1, window_size, window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.reshape(-1, H // window_size, W // window_size, window_size, window_size, C)
    return copy_if_symbolic(x.permute(0, 1, 3, 2, 4, 5)).reshape(-1, H, W, C)


def relative_position_index(window_size: int) -> torch.Tensor:
    """For each pair of tokens of a window, the row of the relative position bias table: (N, N), N = ws*ws."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2), range -(ws-1)..ws-1
    relative = relative + (window_size - 1)
    return relative[:, :, 0] * (2 * window_size - 1) + relative[:, :, 1]


def is_symbolic(*sizes) -> bool:
    """Whether any of ``sizes`` is a symbol rather than a number: torch.export with a dynamic image size, or
    torch.compile once it has made a size dynamic. Code must then compute with the size instead of branching on it
    (a branch would bind the traced graph to the sizes that take it)."""
    return any(isinstance(size, torch.SymInt) for size in sizes)


def is_exporting() -> bool:
    """Whether torch.export traces the model (its default, non-strict tracing). torch.compile is excluded by name:
    in some releases ``torch.compiler.is_exporting()`` is also True under it (pytorch/pytorch issue 176347)."""
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()


def copy_if_symbolic(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or a contiguous copy of it when its sizes are symbolic.

    ``reshape`` views a tensor when its strides allow and copies it otherwise; with symbolic sizes, deciding that
    makes the tracer assume whether each size is 1 (one window per row, a batch of one), which would bind the
    exported graph to the traced sizes. After an unconditional copy the reshape is always a view.
    """
    return torch.clone(x, memory_format=torch.contiguous_format) if is_symbolic(*x.shape) else x


def shifted_window_mask(height: int, width: int, window_size: int, shift_size: int, valid_height: int,
                        valid_width: int, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """The additive attention mask of one stage's windows, or None when nothing needs masking.

    After the cyclic shift a window can hold tokens from up to four regions of the original map that are
    not neighbours; pairs from different regions get ``MASK_VALUE``. Tokens added by padding
    (rows >= valid_height or columns >= valid_width before the shift) are masked as keys.

    Args:
        height, width: size of the padded map, multiples of ``window_size``.
        valid_height, valid_width: size of the map before padding.

    Returns:
        (nW, N, N) float32 mask on ``device``, or None when there is no shift and no padding.
    """
    if shift_size == 0 and valid_height == height and valid_width == width:
        return None
    return window_mask(height, width, window_size, shift_size, valid_height, valid_width, device)


def window_mask(height: int, width: int, window_size: int, shift_size: int, valid_height: int, valid_width: int,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """The mask of :func:`shifted_window_mask`, always built (all zeros when nothing needs masking).

    Built from comparisons with the sizes, without branching on them, so the sizes may be symbolic: an exported
    model with a dynamic image size computes its masks in the graph for the size it is given.

    Returns:
        (nW, N, N) float32 mask on ``device``.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    padded = (rows >= valid_height)[:, None] | (cols >= valid_width)[None, :]
    padded = window_partition(torch.roll(padded, shifts=(-shift_size, -shift_size), dims=(0, 1))[None, :, :, None],
                              window_size).flatten(1)  # (nW, N)
    num_tokens = window_size * window_size
    masked = padded[:, None, :].expand(-1, num_tokens, -1)
    if shift_size > 0:
        # Regions along each axis: before the last window (0), the last window up to the shift (1), the last
        # shift_size tokens, which the cyclic shift brought from the other side of the map (2).
        row_region = (rows >= height - window_size).long() + (rows >= height - shift_size).long()
        col_region = (cols >= width - window_size).long() + (cols >= width - shift_size).long()
        region = row_region[:, None] * 3 + col_region[None, :]
        region = window_partition(region[None, :, :, None], window_size).flatten(1)
        masked = masked | (region[:, :, None] != region[:, None, :])
    return torch.zeros(masked.shape, device=device).masked_fill(masked, MASK_VALUE)


class WindowAttentionBase(nn.Module):
    """Multi-head attention inside windows with an additive per-head relative position bias: the computation paths
    every attention family shares.

    A subclass sets ``dim``, ``window_size``, ``num_heads``, ``scale`` (multiplies q k^T), ``attn_impl``,
    ``attn_drop``, ``proj``, ``proj_drop`` and the ``relative_position_index`` buffer, and implements
    :meth:`query_key_value` and :meth:`position_bias_table`.

    ``attn_impl`` (all give the same outputs and gradients; which is fastest depends on the device, README Performance):

    - "explicit": q k^T, bias and mask added in one pass, softmax, times v. Batched matmuls over 49-token windows;
      the fastest on the CPU in training and reduced precision, and the reference's and timm's default path.
    - "sdpa": ``scaled_dot_product_attention`` with bias and mask as one additive mask. A fused kernel where the
      backend has one for an additive mask (CUDA's memory-efficient kernel, the CPU's flash kernel in inference).
    - "flex": FlexAttention on the partitioned windows; the bias is looked up from the table inside the kernel
      instead of being materialised (see :mod:`models.window_flex`).
    - "flex_grid": FlexAttention on the whole map with a block mask that keeps each token to its (shifted) window:
      no padding, roll, partition or merge copies (the block calls :meth:`forward_grid`).
    - "auto": sdpa, except on the CPU when training or in reduced precision (autocast or a half/bfloat16 model),
      where the explicit path measured faster. On the CPU, PyTorch's fused attention kernel has no gradient for an
      additive mask, so training falls back to its generic path; in bfloat16 its flash kernel is slower than batched
      matmuls over 49-token windows.
    """

    dim: int
    window_size: int
    num_heads: int
    scale: float
    attn_impl: str

    @staticmethod
    def check_attn_impl(attn_impl: str, attn_drop: float = 0.0) -> None:
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}; got {attn_impl!r}")
        if attn_impl in FLEX_IMPLS:
            window_flex.check_flex_available(attn_impl)
            if attn_drop > 0:
                raise ValueError(f"attn_impl {attn_impl!r} has no attention dropout (FlexAttention applies none); "
                                 f"got attn_drop {attn_drop}: use sdpa or explicit")

    def query_key_value(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B', L, C) tokens -> q, k, v, each (B', nH, L, head_dim); attention multiplies q k^T by ``self.scale``.
        B' is windows x images and L the window's tokens, or images and the whole map's tokens (``flex_grid``)."""
        raise NotImplementedError

    def position_bias_table(self) -> torch.Tensor:
        """((2 ws - 1)^2, nH): the additive bias of each relative offset (dy, dx) = query - key, at row
        (dy + ws - 1) * (2 ws - 1) + dx + ws - 1 (the convention of :func:`relative_position_index`)."""
        raise NotImplementedError

    def relative_position_bias(self) -> torch.Tensor:
        """(num_heads, N, N) additive bias of each window's logits, gathered from :meth:`position_bias_table`."""
        N = self.window_size ** 2
        bias = self.position_bias_table()[self.relative_position_index.reshape(-1)]
        return bias.reshape(N, N, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention within each window.

        Args:
            x: (B * nW, N, C) tokens of each window.
            mask: (nW, N, N) additive mask shared by all images, or None.

        Returns:
            (B * nW, N, C).
        """
        BnW, N, C = x.shape
        q, k, v = self.query_key_value(x)
        impl = self._resolved_impl(x)
        if impl in FLEX_IMPLS:
            score_mod = window_flex.window_score_mod(self.position_bias_table(), self.relative_position_index, mask)
            x = window_flex.run_flex(q, k, v, score_mod, None, self.scale)
        elif impl == "sdpa":
            x = self._sdpa(q, k, v, self.relative_position_bias(), mask)
        else:
            x = self._explicit(q, k, v, self.relative_position_bias(), mask)
        x = x.transpose(1, 2).reshape(BnW, N, C)
        return self.proj_drop(self.proj(x))

    def forward_grid(self, x: torch.Tensor, shift_size: int) -> torch.Tensor:
        """Attention of each token to the tokens of its (shifted) window, on the un-partitioned map (``flex_grid``).

        Args:
            x: (B, H, W, C), any H and W (no padding: border windows are smaller).
            shift_size: the block's shift; 0 for unshifted blocks.

        Returns:
            (B, H, W, C), equal to padding, rolling, partitioning, window attention, merging, rolling back and cropping.
        """
        B, H, W, C = x.shape
        ws = self.window_size
        q, k, v = self.query_key_value(x.reshape(B, H * W, C))
        score_mod = window_flex.grid_score_mod(self.position_bias_table(), W, ws)
        block_mask = window_flex.grid_block_mask(H, W, ws, shift_size, x.device)
        x = window_flex.run_flex(q, k, v, score_mod, block_mask, self.scale)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))

    def _resolved_impl(self, x: torch.Tensor) -> str:
        """The path this call takes: ``attn_impl``, with "auto" resolved for the device, precision and grad mode."""
        if self.attn_impl != "auto":
            return self.attn_impl
        if x.device.type != "cpu":
            return "sdpa"
        reduced_precision = x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
        return "explicit" if torch.is_grad_enabled() or reduced_precision else "sdpa"

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
              mask: Optional[torch.Tensor]) -> torch.Tensor:
        dropout = self.attn_drop.p if self.training else 0.0
        if mask is None:
            attn_mask = bias.unsqueeze(0).to(q.dtype)  # (1, nH, N, N), broadcast over every window of every image
        else:
            attn_mask = self._window_batch_mask(self._bias_and_mask(bias, mask), q.shape[0], q.dtype)
        # q, k, v stay the strided views of the qkv projection: the kernels take any strides, and copying them
        # (as folding windows into heads would need) costs more than the per-window mask.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=self.scale)
        # CUDA's flash and memory-efficient kernels return (B, M, H, K) memory transposed to (B, H, M, K); callers
        # reshape, never view.
        return x

    @staticmethod
    def _window_batch_mask(bias_and_mask: torch.Tensor, BnW: int, dtype: torch.dtype) -> torch.Tensor:
        """(nW, nH, N, N) -> (B * nW, nH, N, N) in ``dtype``: window b of the batch is window b % nW of its image, which
        no stride can express, so the mask is written out once per call (a few bytes per token and head).

        Its rows start at multiples of 8 elements: CUDA's memory-efficient kernel needs that alignment and would
        otherwise copy the whole mask again to pad it (49-token windows are not a multiple of 8).
        """
        nW, nH, N, _ = bias_and_mask.shape
        expanded = bias_and_mask.to(dtype).unsqueeze(0).expand(BnW // nW, nW, nH, N, N)
        pad = -N % SDPA_MASK_ALIGNMENT
        if not pad:
            return expanded.reshape(BnW, nH, N, N)  # one copy
        # Padding writes the expanded mask once, into rows of the aligned length (its gradient is a view back); the
        # slice and the reshape are views: the batch and window axes merge.
        return F.pad(expanded, (0, pad))[..., :N].reshape(BnW, nH, N, N)

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                  mask: Optional[torch.Tensor]) -> torch.Tensor:
        BnW, nH, N, _ = q.shape
        if self.scale != 1.0:
            q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        if mask is None:
            attn = attn + bias.unsqueeze(0)
        else:
            # One pass over the logits adds bias and mask together (they are small; the logits are not).
            nW = mask.shape[0]
            attn = attn.reshape(BnW // nW, nW, nH, N, N) + self._bias_and_mask(bias, mask).unsqueeze(0)
            attn = attn.reshape(BnW, nH, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    @staticmethod
    def _bias_and_mask(bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(nH, N, N) position bias + (nW, N, N) mask -> (nW, nH, N, N) additive term of each window's logits."""
        return bias.unsqueeze(0) + mask.unsqueeze(1)

    def flops(self, N: int) -> int:
        """Multiply-accumulates for one window of ``N`` tokens (reference convention)."""
        head_dim = self.dim // self.num_heads
        return (N * self.dim * 3 * self.dim + 2 * self.num_heads * N * head_dim * N + N * self.dim * self.dim)


class WindowAttention(WindowAttentionBase):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Args:
        dim: channels.
        window_size: side of the square window.
        num_heads: attention heads.
        qkv_bias: learn a bias for query, key and value.
        qk_scale: logit scale; None means head_dim ** -0.5.
        attn_drop, proj_drop: dropout rates.
        attn_impl: one of :data:`ATTN_IMPLS` (see :class:`WindowAttentionBase`).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_impl: str = "auto"):
        super().__init__()
        self.check_attn_impl(attn_impl, attn_drop)
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_impl = attn_impl
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def position_bias_table(self) -> torch.Tensor:
        """The learned table itself: ((2 ws - 1)^2, num_heads)."""
        return self.relative_position_bias_table

    def query_key_value(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        BnW, N, C = x.shape
        qkv = self.qkv(x).reshape(BnW, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)


class WindowBlock(nn.Module):
    """What every window block shares: token mixing inside (shifted) windows of a padded map, and the MLP.

    A family's block creates ``norm1`` and its token mixer, then calls :meth:`_add_ffn` (so parameters keep the
    reference's order), implements :meth:`mix_tokens` and its own ``forward`` (pre- or post-norm) around
    :meth:`window_mix`.

    Args:
        dim: channels.
        window_size: window side (already clamped to the stage resolution by the stage).
        shift_size: shift of the windows; 0 for unshifted blocks.
        mlp_ratio: MLP hidden size over ``dim``.
        fused_window_process: roll + partition with the fused kernel where it is available, in eager mode.
    """

    # Whether the family's windowed token mixing takes the additive mask (Swin-MLP's zero padding does not).
    masked_windows = True

    def __init__(self, dim: int, window_size: int, shift_size: int, mlp_ratio: float,
                 fused_window_process: bool = False):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.dim = dim
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        self.fused_window_process = fused_window_process

    def _add_ffn(self, drop: float, drop_path: float) -> None:
        """Creates ``drop_path``, ``norm2`` and ``mlp``, in the reference's order."""
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(self.dim)
        self.mlp = Mlp(in_features=self.dim, hidden_features=int(self.dim * self.mlp_ratio), act_layer=nn.GELU,
                       drop=drop)

    @property
    def needs_mask(self) -> bool:
        """Whether mix_tokens needs the additive shifted-window / padding mask of BasicLayer.masks now. Attention on
        the un-partitioned map masks with its own block mask; its ``attn_impl`` can change after construction (export
        switches every path to explicit), so this is asked on every call."""
        return self.masked_windows and self._grid_attention() is None

    def _grid_attention(self) -> Optional[WindowAttentionBase]:
        """The block's window attention if it runs on the un-partitioned map (``attn_impl`` "flex_grid"), else None."""
        attn = getattr(self, "attn", None)
        return attn if isinstance(attn, WindowAttentionBase) and attn.attn_impl == "flex_grid" else None

    def mix_tokens(self, windows: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B * nW, N, C) tokens of each window -> the same shape, mixed within each window."""
        raise NotImplementedError

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Hp, Wp, C) -> shifted windows (B * nW, ws, ws, C)."""
        if self._use_fused(x, x.shape[2]):
            from kernels.window_process import roll_and_window_partition
            return roll_and_window_partition(x, self.shift_size, self.window_size)
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        return window_partition(x, self.window_size)

    def _merge(self, windows: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """Inverse of :meth:`_partition`."""
        if self._use_fused(windows, W):
            from kernels.window_process import window_merge_and_roll
            return window_merge_and_roll(windows, B, H, W, self.shift_size, self.window_size)
        x = window_reverse(windows, self.window_size, H, W)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x

    def _use_fused(self, x: torch.Tensor, width: int) -> bool:
        """Whether to move ``x`` with the fused kernel; ``width``: the padded map's width."""
        # Under torch.compile the plain roll and permutes are left to inductor, which fuses them with the norm,
        # padding and residual around them; the opaque fused op would prevent that, and measured no faster in a
        # compiled model (README, Performance).
        if not self.fused_window_process or torch.compiler.is_compiling():
            return False
        # Unshifted, a map one window wide (Swin-T's last stage: 7x7, window 7) is partitioned and merged by views,
        # which copy nothing; the fused op would copy it.
        if not self.shift_size and width == self.window_size:
            return False
        from kernels.window_process import is_available
        return is_available(x.device)

    def window_mix(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): pads to the window, mixes tokens in (shifted) windows, crops back; or, for
        attention on the un-partitioned map, all of that in one masked attention over the map."""
        grid_attention = self._grid_attention()
        if grid_attention is not None:
            return grid_attention.forward_grid(x, self.shift_size)
        B, H, W, C = x.shape
        ws = self.window_size
        # Ceiling divisions keep symbolic sizes simple through the stages (torch.export with a dynamic size).
        Hp, Wp = (H + ws - 1) // ws * ws, (W + ws - 1) // ws * ws
        symbolic = is_symbolic(H, W)
        padding = symbolic or Hp != H or Wp != W  # a symbolic size may need padding: always pad (maybe by 0)
        if padding:
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        # The fused op and attention kernels choose their output layouts: reshape, never view.
        windows = self._partition(x).reshape(-1, ws * ws, C)
        windows = self.mix_tokens(windows, mask).reshape(-1, ws, ws, C)
        x = self._merge(windows, B, Hp, Wp)
        if symbolic:
            x = x.narrow_copy(1, 0, H).narrow_copy(2, 0, W)  # slicing would make the tracer prove H <= Hp
        elif padding:
            x = x[:, :H, :W, :].contiguous()
        return x

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pre-norm residual blocks (V1, Swin-MLP): norm -> window mixing -> residual, norm -> MLP -> residual.

        Args:
            x: (B, H, W, C).
            mask: (nW, N, N) mask of the padded, shifted map (see :func:`shifted_window_mask`), or None.

        Returns:
            (B, H, W, C).
        """
        x = x + self.drop_path(self.window_mix(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def mixing_flops(self, H: int, W: int) -> float:
        """Multiply-accumulates of the token mixing at map size H x W."""
        raise NotImplementedError

    def flops(self, H: int, W: int) -> float:
        """Multiply-accumulates at map size H x W (reference convention: LayerNorm counts 1 per element)."""
        return 2 * self.dim * H * W + self.mixing_flops(H, W) + 2 * H * W * self.dim * self.dim * self.mlp_ratio


class SwinTransformerBlock(WindowBlock):
    """Norm -> (shifted) window attention -> residual, norm -> MLP -> residual.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window side (already clamped to the stage resolution by the stage).
        shift_size: cyclic shift; 0 for W-MSA blocks.
        mlp_ratio: MLP hidden size over ``dim``.
        drop_path: stochastic depth rate of this block.
        fused_window_process: roll + partition with the fused kernel where it is available.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, attn_impl: str = "auto",
                 fused_window_process: bool = False):
        super().__init__(dim, window_size, shift_size, mlp_ratio, fused_window_process)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop, attn_impl)
        self._add_ffn(drop, drop_path)

    def mix_tokens(self, windows: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.attn(windows, mask)

    def mixing_flops(self, H: int, W: int) -> float:
        return H * W / self.window_size / self.window_size * self.attn.flops(self.window_size ** 2)


class PatchMerging(nn.Module):
    """Concatenates each 2x2 neighbourhood and projects 4C -> 2C, halving H and W (odd sizes are padded)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        return self.reduction(self.norm(self.gather(x)))

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C): each 2x2 neighbourhood concatenated."""
        B, H, W, C = x.shape
        Ho, Wo = (H + 1) // 2, (W + 1) // 2
        if is_symbolic(H, W) or 2 * Ho != H or 2 * Wo != W:
            x = F.pad(x, (0, 0, 0, 2 * Wo - W, 0, 2 * Ho - H))
        # The released weights of `reduction` expect the channel blocks ordered (row 0, col 0), (row 1, col 0),
        # (row 0, col 1), (row 1, col 1) of each 2x2 patch: column offset outer, row offset inner. A reshape
        # gives that order with one copy (strided slicing plus cat costs four, and four more in backward).
        return copy_if_symbolic(x.reshape(B, Ho, 2, Wo, 2, C).permute(0, 1, 3, 4, 2, 5)).reshape(B, Ho, Wo, 4 * C)

    def flops(self, H: int, W: int) -> int:
        return H * W * self.dim + (H // 2) * (W // 2) * 4 * self.dim * 2 * self.dim


class BasicLayer(nn.Module):
    """One stage of any family: ``depth`` blocks alternating unshifted and shifted windows, then optional merging.

    Args:
        dim: channels.
        input_resolution: (H, W) of the map at the configured image size; fixes the window and shift.
        depth: blocks.
        window_size: configured window; clamped to the map where the map is not larger.
        make_block: ``make_block(window_size, shift_size, drop_path)`` -> a :class:`WindowBlock` of the family.
        drop_path: stochastic depth rate of each block.
        downsample: ``downsample(dim)`` -> the patch merging that ends the stage, or None.
        use_checkpoint: gradient checkpointing per block.
    """

    def __init__(self, dim: int, input_resolution: Tuple[int, int], depth: int, window_size: int,
                 make_block: Callable[[int, int, float], "WindowBlock"], drop_path: Sequence[float] = (),
                 downsample: Optional[Callable[[int], nn.Module]] = None, use_checkpoint: bool = False):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.use_checkpoint = use_checkpoint
        # A window larger than the map would only attend to padding: shrink it and do not shift.
        if min(self.input_resolution) <= window_size:
            window_size = min(self.input_resolution)
            shift_size = 0
        else:
            shift_size = window_size // 2
        self.window_size = window_size
        self.shift_size = shift_size
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList([make_block(window_size, 0 if i % 2 == 0 else shift_size, drop_path[i])
                                     for i in range(depth)])
        self.downsample = downsample(dim) if downsample is not None else None
        H, W = self.input_resolution
        masked = any(block.masked_windows for block in self.blocks)
        mask = self._build_mask(H, W, shift_size) if masked else None
        self.register_buffer("attn_mask", mask, persistent=False)
        self._mask_cache: "OrderedDict[tuple, Optional[torch.Tensor]]" = OrderedDict()

    def _build_mask(self, H: int, W: int, shift_size: int, device: Optional[torch.device] = None
                    ) -> Optional[torch.Tensor]:
        """The float32 mask of a map of H x W; with symbolic sizes always one (zeros where nothing is masked):
        whether the map needs padding is only known when the exported model runs."""
        ws = self.window_size
        Hp, Wp = (H + ws - 1) // ws * ws, (W + ws - 1) // ws * ws
        if is_symbolic(H, W):
            return window_mask(Hp, Wp, ws, shift_size, H, W, device)
        return shifted_window_mask(Hp, Wp, ws, shift_size, H, W, device)

    @property
    def needs_mask(self) -> bool:
        """Whether any block needs the additive masks of :meth:`masks` (asked per call, see WindowBlock.needs_mask)."""
        return any(block.needs_mask for block in self.blocks)

    def masks(self, H: int, W: int, device: torch.device,
              dtype: torch.dtype = torch.float32) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Masks of the unshifted and the shifted blocks for a map of H x W, on ``device`` in ``dtype`` (that of
        the feature map: float32 under autocast, half after ``model.half()``).

        The configured size uses the ``attn_mask`` buffer, which ``model.to()`` moves and casts. Other sizes are
        built once and kept in a small least-recently-used cache keyed by size, device and dtype.
        """
        ws = self.window_size
        if not self.needs_mask:
            return None, None
        if is_symbolic(H, W) or is_exporting():
            # Built in the exported graph, never cached: a cached tensor would hold the tracer's fake data, and one
            # built for the traced size must not serve another.
            masks = (self._build_mask(H, W, shift, device) for shift in (0, self.shift_size))
            return tuple(None if mask is None else mask.to(dtype) for mask in masks)
        if (H, W) == self.input_resolution and H % ws == 0 and W % ws == 0:
            mask = self.attn_mask
            return None, None if mask is None else mask.to(device=device, dtype=dtype)
        return self._cached_mask(H, W, 0, device, dtype), self._cached_mask(H, W, self.shift_size, device, dtype)

    def _cached_mask(self, H: int, W: int, shift: int, device: torch.device,
                     dtype: torch.dtype) -> Optional[torch.Tensor]:
        key = (H, W, shift, device, dtype)
        if key in self._mask_cache:
            self._mask_cache.move_to_end(key)
            return self._mask_cache[key]
        mask = self._build_mask(H, W, shift, device)
        mask = None if mask is None else mask.to(dtype)
        self._mask_cache[key] = mask
        while len(self._mask_cache) > MASK_CACHE_SIZE:
            self._mask_cache.popitem(last=False)
        return mask

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C) through the blocks, without patch merging."""
        _, H, W, _ = x.shape
        unshifted_mask, shifted_mask = self.masks(H, W, x.device, x.dtype)
        for block in self.blocks:
            mask = shifted_mask if block.shift_size else unshifted_mask
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H', W', C'), halved and doubled when the stage downsamples."""
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)

    def flops(self) -> float:
        H, W = self.input_resolution
        flops = sum(block.flops(H, W) for block in self.blocks)
        return flops + (self.downsample.flops(H, W) if self.downsample is not None else 0)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, C_in, H, W) -> (B, H/p, W/p, embed_dim), padding H, W up to p."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96,
                 patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, H, W = x.shape
        p = self.patch_size
        if H < p or W < p:
            raise ValueError(f"input of {H}x{W} pixels is smaller than one {p}x{p} patch")
        Hp, Wp = (H + p - 1) // p * p, (W + p - 1) // p * p
        if is_symbolic(H, W) or Hp != H or Wp != W:
            x = F.pad(x, (0, Wp - W, 0, Hp - H))
        x = self.proj(x).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)

    def flops(self) -> int:
        Ho, Wo = self.patches_resolution
        flops = Ho * Wo * self.embed_dim * self.in_chans * self.patch_size ** 2
        return flops + (Ho * Wo * self.embed_dim if self.norm is not None else 0)


def stage_indices(num_stages: int, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
    """timm's selection of feature maps as absolute stage indices: None for all stages, an int n for the last n,
    a sequence for those stages (negative indices count from the end).

    Raises:
        ValueError: an index or a count out of range.
    """
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"cannot take the last {indices} stages of a model with {num_stages}")
        return list(range(num_stages - indices, num_stages))
    take = [num_stages + i if i < 0 else i for i in indices]
    if not take or any(not 0 <= i < num_stages for i in take):
        raise ValueError(f"stage indices {list(indices)} are not within 0..{num_stages - 1} (or -{num_stages}..-1)")
    return take


def drop_path_rates(depths: Sequence[int], drop_path_rate: float) -> List[List[float]]:
    """Stochastic depth per block, growing linearly from 0 to ``drop_path_rate`` over all blocks; one list a stage."""
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    return [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


class WindowTransformer(nn.Module):
    """The trunk every family shares: patch embedding, optional absolute position embedding, stages of window
    blocks with patch merging between them, final norm and linear head; features, heads, FLOPs, and the backbone
    API of dense tasks (:meth:`forward_intermediates`, :meth:`prune_intermediate_layers`, :meth:`as_backbone`).

    A family's constructor calls ``super().__init__()``, then :meth:`_build_trunk` with its block factory and
    patch merging, then its own initialisation.
    """

    def _build_trunk(self, img_size: int, patch_size: int, in_chans: int, num_classes: int, embed_dim: int,
                     depths: Sequence[int], window_size: int, drop_rate: float, drop_path_rate: float, ape: bool,
                     patch_norm: bool, use_checkpoint: bool,
                     make_block: Callable[[int, int, int, float], WindowBlock],
                     downsample: Callable[[int], nn.Module]) -> None:
        """Creates the modules, in the reference's order.

        Args:
            make_block: ``make_block(stage, window_size, shift_size, drop_path)`` -> a block of stage ``stage``.
            downsample: ``downsample(dim)`` -> the patch merging that ends every stage but the last.
        """
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_norm)
        res = self.patch_embed.patches_resolution
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, res[0] * res[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        rates = drop_path_rates(depths, drop_path_rate)
        self.layers = nn.ModuleList([
            BasicLayer(int(embed_dim * 2 ** i), (res[0] // 2 ** i, res[1] // 2 ** i), depth, window_size,
                       functools.partial(make_block, i), rates[i],
                       downsample if i < self.num_layers - 1 else None, use_checkpoint)
            for i, depth in enumerate(depths)])
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        # Each stage's output map, taken before its patch merging (the output of its last block), as timm lists it.
        self.feature_info = [dict(num_chs=int(embed_dim * 2 ** i), reduction=patch_size * 2 ** i,
                                  module=f"layers.{i}.blocks.{depth - 1}", index=i) for i, depth in enumerate(depths)]
        self.feature_indices: Optional[List[int]] = None  # the stages forward returns, set by as_backbone
        self.feature_norm = False
        self.output_fmt = "NCHW"
        self.pruned_prefixes: Tuple[str, ...] = ()  # state-dict key prefixes of what prune_intermediate_layers removed

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Conv1d: Swin-MLP's spatial MLP, which the reference initialises like the linear layers.
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set:
        """Parameter names exempt from weight decay."""
        return {"absolute_pos_embed"}

    def no_weight_decay_keywords(self) -> set:
        """Name fragments whose parameters are exempt from weight decay."""
        return {"relative_position_bias_table"}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H/p, W/p, C) tokens with the position embedding added."""
        x = self.patch_embed(x)
        if self.ape:
            x = x + self._position_embedding(x.shape[1], x.shape[2])
        return self.pos_drop(x)

    def _position_embedding(self, H: int, W: int) -> torch.Tensor:
        """The absolute position embedding as (1, H, W, C), resized bicubically for other input sizes."""
        h0, w0 = self.patch_embed.patches_resolution
        pos = self.absolute_pos_embed.reshape(1, h0, w0, -1)
        if not is_symbolic(H, W) and (H, W) == (h0, w0):
            return pos
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(H, W), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, H', W', num_features) normalised last-stage map."""
        x = self._embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H', W', C) -> (B, num_classes) logits, or the pooled (B, C) features with ``pre_logits``."""
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """(B, C_in, H, W) images -> (B, num_classes) logits; after :meth:`as_backbone`, the list of stage maps."""
        if self.feature_indices is not None:
            return self.forward_intermediates(x, self.feature_indices, norm=self.feature_norm,
                                              output_fmt=self.output_fmt, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The output maps of some stages, with timm's meaning of every argument.

        Stage i's map is the output of its last block, before the patch merging that ends it here (and starts the
        next stage in timm's layout): (B, C_i, H_i, W_i) with C_i and the stride H / H_i in ``feature_info[i]``.
        Any input size works; each map is ceil(H / stride) x ceil(W / stride).

        Args:
            x: (B, C_in, H, W) images.
            indices: stages to return: None for all, an int n for the last n, or a sequence of indices
                (negative ones count from the end).
            norm: apply the final norm to the last stage's map, if it is taken (the norm is sized for it alone).
            stop_early: run no stage after the last one taken.
            output_fmt: "NCHW" or "NHWC" maps.
            intermediates_only: return only the maps.

        Returns:
            The list of maps, or (final features, maps): the final features are the last run stage's
            (B, H', W', C) map, normalised when that is the model's last stage (as :meth:`forward_features`).
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {', '.join(OUTPUT_FORMATS)}; got {output_fmt!r}")
        take = stage_indices(len(self.layers), indices)
        num_run = max(take) + 1 if stop_early or intermediates_only else len(self.layers)
        x = self._embed(x)
        intermediates = []
        for i, layer in enumerate(self.layers[:num_run]):
            if i > 0:
                x = self.layers[i - 1].downsample(x)
            x = layer.forward_blocks(x)
            if i in take:
                feature = self.norm(x) if norm and i == len(self.layers) - 1 else x
                if output_fmt == "NCHW":
                    feature = copy_if_symbolic(feature.permute(0, 3, 1, 2)).contiguous()
                intermediates.append(feature)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if num_run == len(self.layers) else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Removes what the maps of stages ``indices`` do not need, as timm does: the stages after the last one
        taken (and its patch merging), the final norm when the last stage goes or with ``prune_norm``, the head
        when anything goes or with ``prune_head``.

        The removed parameters' key prefixes are added to ``pruned_prefixes``, which the checked loaders of
        :mod:`models.state_dict` drop from a full checkpoint, so a released classifier still loads in one call.

        Returns:
            The absolute indices of the stages taken.
        """
        take = stage_indices(len(self.layers), indices)
        last = max(take)
        pruned = []
        prune_end = last < len(self.layers) - 1
        if prune_end:
            pruned += [f"layers.{last}.downsample."] + [f"layers.{i}." for i in range(last + 1, len(self.layers))]
            self.layers = self.layers[:last + 1]
            self.layers[last].downsample = None
            self.num_layers = last + 1
            self.num_features = self.feature_info[last]["num_chs"]
            self.feature_info = self.feature_info[:last + 1]
        if (prune_norm or prune_end) and not isinstance(self.norm, nn.Identity):
            self.norm = nn.Identity()  # sized for the last stage only
            pruned.append("norm.")
        if (prune_head or prune_end) and not isinstance(self.head, nn.Identity):
            self.head = nn.Identity()
            self.num_classes = 0
            pruned.append("head.")
        self.pruned_prefixes = self.pruned_prefixes + tuple(pruned)
        return take

    def as_backbone(self, out_indices: Optional[Union[int, Sequence[int]]] = None, norm: bool = False,
                    output_fmt: str = "NCHW") -> "WindowTransformer":
        """Turns this model into a feature extractor (timm's ``features_only``), in place: ``forward(images)``
        returns the list of the stage maps ``out_indices`` (as ``indices`` of :meth:`forward_intermediates`; all
        stages by default: strides 4, 8, 16, 32 for the published models), and ``feature_info`` describes them.
        Head, unused stages and (without ``norm``) the final norm are removed by :meth:`prune_intermediate_layers`;
        parameter names stay the classifier's.

        Returns:
            The model itself.
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {', '.join(OUTPUT_FORMATS)}; got {output_fmt!r}")
        if self.feature_indices is not None:
            raise ValueError("this model is a backbone already; build a new model to choose other stages")
        take = stage_indices(len(self.layers), out_indices)
        self.prune_intermediate_layers(take, prune_norm=not norm, prune_head=True)
        self.feature_indices = take
        self.feature_norm = norm
        self.output_fmt = output_fmt
        self.feature_info = [self.feature_info[i] for i in take]
        return self

    def flops(self) -> float:
        """Multiply-accumulates at the configured size, in the reference convention."""
        H, W = self.patch_embed.patches_resolution
        flops = self.patch_embed.flops() + sum(layer.flops() for layer in self.layers)
        if not isinstance(self.norm, nn.Identity):
            # The reference counts the final norm over H*W / 2**num_layers tokens; kept so figures match.
            flops += self.num_features * H * W // (2 ** self.num_layers)
        return flops + self.num_features * self.num_classes


class SwinTransformer(WindowTransformer):
    """Swin Transformer V1 classifier; argument names are those of the reference constructor.

    Args:
        img_size: configured input size; fixes the stage resolutions, windows and position embedding.
        patch_size, in_chans, num_classes, embed_dim, depths, num_heads, window_size, mlp_ratio, qkv_bias,
        qk_scale, drop_rate, attn_drop_rate, drop_path_rate, ape, patch_norm, use_checkpoint: as the reference.
        attn_impl: attention path, one of :data:`ATTN_IMPLS` (see :class:`WindowAttentionBase`).
        fused_window_process: use the fused roll + partition kernel where it is available.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, attn_impl: str = "auto", fused_window_process: bool = False):
        super().__init__()

        def make_block(stage: int, window: int, shift: int, drop_path: float) -> SwinTransformerBlock:
            return SwinTransformerBlock(int(embed_dim * 2 ** stage), num_heads[stage], window, shift, mlp_ratio,
                                        qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path, attn_impl,
                                        fused_window_process)

        self._build_trunk(img_size, patch_size, in_chans, num_classes, embed_dim, depths, window_size, drop_rate,
                          drop_path_rate, ape, patch_norm, use_checkpoint, make_block, PatchMerging)
        self.apply(self._init_weights)

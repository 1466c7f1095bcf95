"""FlexAttention for window attention: the relative position bias as a score modification, the shifted-window mask
as a mask, on the partitioned windows (``attn_impl`` "flex") or on the whole un-partitioned map ("flex_grid").

Why these exist next to SDPA and the explicit path: SDPA can take the position bias only as a materialised additive
mask (CUDA's flash kernel takes none, so SDPA falls back to the memory-efficient kernel, which reads a mask tensor
per window batch), and the explicit path writes the logits out. FlexAttention generates one fused kernel that looks
the bias up from the (2 ws - 1)^2 x heads table inside the kernel, so neither the bias nor the logits are ever
materialised. On the grid it also makes the roll, partition and merge copies unnecessary: each token attends only to
the tokens of its (shifted) window, which a block mask expresses directly on the (B, H * W) token sequence.

Which of them is fastest is a GPU measurement (``benchmarks/bench_model.py --device cuda``); FlexAttention is reported
slower than SDPA without block sparsity, and its blocks (128 tokens by default) are larger than a 49-token window.

torch's FlexAttention has no backward pass on the CPU: there the "flex" paths run inference only (torch's unfused
reference implementation), and training stops with a message that names the attention settings that train on the CPU.
"""
from collections import OrderedDict
from typing import Callable, Optional

import torch

try:  # torch >= 2.5; the model builds without it and only these paths are unavailable
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch versions this project does not pin
    BlockMask = create_block_mask = flex_attention = None

# Devices whose FlexAttention has no backward pass (torch raises NotImplementedError for them).
NO_FLEX_BACKWARD = ("cpu", "mps")
# Token block of the grid's block mask: FlexAttention's default tile; a query block of 128 row-major tokens spans
# about two image rows, so it meets the keys of its window band in a few key blocks and skips the others.
GRID_BLOCK_SIZE = 128
# Devices where an eager model compiles flex_attention on its own, and the backend it uses.
EAGER_FLEX_COMPILED_ON = ("cuda", "xpu")
EAGER_FLEX_BACKEND = "inductor"
# Compiled variants of flex_attention allowed in an eager model (4 stages x shifted or not x training or not x dtype).
EAGER_FLEX_COMPILE_LIMIT = 64
# Block masks kept for map sizes and shifts seen, least recently used dropped first (as the additive masks' cache).
BLOCK_MASK_CACHE_SIZE = 16

_block_masks: "OrderedDict[tuple, BlockMask]" = OrderedDict()
_compiled_flex: Optional[Callable] = None


def flex_available() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention``."""
    return flex_attention is not None


def check_flex_available(attn_impl: str) -> None:
    """Raises a one-line error when ``attn_impl`` needs FlexAttention and this torch has none."""
    if not flex_available():
        raise ValueError(f"attn_impl {attn_impl!r} needs torch.nn.attention.flex_attention (torch >= 2.5), which "
                         f"torch {torch.__version__} lacks; use sdpa, explicit or auto")


def run_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Callable,
             block_mask: Optional["BlockMask"], scale: float) -> torch.Tensor:
    """``flex_attention`` over (B, heads, L, head_dim) inputs, fused wherever torch can fuse it.

    Inside a compiled model the call becomes part of the graph. In an eager model on a GPU it is compiled on its own
    (once per shape): called eagerly, torch runs an unfused reference that materialises every score. On the CPU the
    unfused reference runs as is (the CPU paths exist to check the GPU ones, not for speed).
    """
    if torch.is_grad_enabled() and query.device.type in NO_FLEX_BACKWARD and (
            query.requires_grad or key.requires_grad or value.requires_grad):
        raise NotImplementedError(f"FlexAttention (attn_impl flex or flex_grid) has no backward pass on "
                                  f"{query.device.type} in torch {torch.__version__}: train there with attn_impl "
                                  "auto, sdpa or explicit")
    if torch.compiler.is_compiling() or query.device.type not in EAGER_FLEX_COMPILED_ON:
        return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, backend=EAGER_FLEX_BACKEND, dynamic=False)
    # One compiled kernel per stage shape, mask, grad mode and dtype: more than dynamo's default of 8 recompiles of
    # one function, past which it would silently run the unfused reference.
    # (torch renamed cache_size_limit to recompile_limit, keeping the old name as an alias for a while.)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: EAGER_FLEX_COMPILE_LIMIT}):
        return _compiled_flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale)


def window_score_mod(table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor]) -> Callable:
    """Score modification of attention inside partitioned windows (batch = image x window).

    Args:
        table: ((2 ws - 1)^2, heads) position bias of each relative offset.
        index: (N, N) row of ``table`` for each query/key pair of a window.
        mask: (nW, N, N) additive shifted-window / padding mask of the windows of one image, or None. It is the same
            tensor the other paths add, so "flex" gives their results exactly; a block mask could not skip anything
            inside a 49-token window, and would have to be built per batch (window b of the batch is window b % nW of
            its image).
    """
    if mask is None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], h]
    else:
        num_windows = mask.shape[0]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[index[q_idx, kv_idx], h] + mask[b % num_windows, q_idx, kv_idx]
    return score_mod


def grid_score_mod(table: torch.Tensor, width: int, window: int) -> Callable:
    """Score modification of attention on the whole (H, W) map, tokens in row-major order: adds the position bias of
    the pair's offset (dy, dx) = (query - key) in map coordinates.

    Within one shifted window (region) the cyclic shift moves both tokens alike, so the offset is that of the
    rolled-and-partitioned window. Pairs from different windows are masked by the block mask; their offsets are
    clamped only so that their (unused) table rows stay inside the table.
    """
    reach = window - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        dy = (q_idx // width - kv_idx // width).clamp(-reach, reach)
        dx = (q_idx % width - kv_idx % width).clamp(-reach, reach)
        return score + table[(dy + reach) * (2 * window - 1) + dx + reach, h]
    return score_mod


def grid_mask_mod(width: int, window: int, shift: int) -> Callable:
    """Whether query and key tokens of a row-major (H, W) map share a window of a block shifted by ``shift``.

    Rolling the map by -shift, cutting windows and masking pairs of different regions (the reference's scheme) is the
    same as cutting the unrolled map at rows and columns shift, shift + ws, shift + 2 ws, ...: the wrapped window of
    the rolled map is exactly the two border pieces that its mask keeps apart. Group of row r: (r + ws - shift) // ws.
    Padding is not needed: a border window is simply smaller, as the padded paths' masked padding keys make it.
    """
    offset = window - shift

    def mask_mod(b, h, q_idx, kv_idx):
        same_rows = (q_idx // width + offset) // window == (kv_idx // width + offset) // window
        same_cols = (q_idx % width + offset) // window == (kv_idx % width + offset) // window
        return same_rows & same_cols
    return mask_mod


def grid_block_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> "BlockMask":
    """The block mask of :func:`grid_mask_mod` for an H x W map, built once per size, shift and device and kept.

    Under torch.compile it is built inside the graph instead (a few fused kernels a call): a lookup in the Python
    cache would make the compiled graph guard on the cache's contents and compile the whole model a second time once
    the first call has filled it.
    """
    if torch.compiler.is_compiling():
        return _build_grid_block_mask(height, width, window, shift, device)
    key = (height, width, window, shift, str(device))
    if key in _block_masks:
        _block_masks.move_to_end(key)
        return _block_masks[key]
    block_mask = _build_grid_block_mask(height, width, window, shift, device)
    _block_masks[key] = block_mask
    while len(_block_masks) > BLOCK_MASK_CACHE_SIZE:
        _block_masks.popitem(last=False)
    return block_mask


def _build_grid_block_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> "BlockMask":
    tokens = height * width
    return create_block_mask(grid_mask_mod(width, window, shift), None, None, tokens, tokens, device=device,
                             BLOCK_SIZE=GRID_BLOCK_SIZE)

"""GPU-only behaviour emulated on the CPU: the memory layouts CUDA kernels return, non-contiguous inputs,
half-precision autocast and half-precision models at sizes other than the configured one.

The CPU's attention kernel returns a contiguous tensor, CUDA's flash and memory-efficient kernels return
(B, M, H, K) memory seen as (B, H, M, K); code that calls ``.view`` on the result works on one and crashes on
the other. These tests make the CPU return the CUDA layouts, so such code fails here first.

Every model family is listed in ``FAMILIES`` (config overrides of a micro model with a shifted stage and an
unshifted one); a new family adds its entry and gets every test.
"""
import pytest
import torch
import torch.nn.functional as F

from config import load_config
from models import build_model
from models.swin_transformer import MASK_CACHE_SIZE

IMG = 32
FAMILIES = {
    "swin": ["MODEL.TYPE", "swin", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]",
             "MODEL.SWIN.NUM_HEADS", "[2, 4]", "MODEL.SWIN.WINDOW_SIZE", "4"],
    "swinv2": ["MODEL.TYPE", "swinv2", "MODEL.SWINV2.EMBED_DIM", "16", "MODEL.SWINV2.DEPTHS", "[2, 2]",
               "MODEL.SWINV2.NUM_HEADS", "[2, 4]", "MODEL.SWINV2.WINDOW_SIZE", "4"],
    "swin_mlp": ["MODEL.TYPE", "swin_mlp", "MODEL.SWIN_MLP.EMBED_DIM", "16", "MODEL.SWIN_MLP.DEPTHS", "[2, 2]",
                 "MODEL.SWIN_MLP.NUM_HEADS", "[2, 4]", "MODEL.SWIN_MLP.WINDOW_SIZE", "4"],
}
ATTN_OPTS = {"swin": "MODEL.SWIN.ATTN_IMPL", "swinv2": "MODEL.SWINV2.ATTN_IMPL"}
ATTN_IMPLS = ("sdpa", "explicit")


def micro_model(family: str, attn_impl: str = "sdpa", fused: bool = False, seed: int = 0) -> torch.nn.Module:
    """A 2-stage model at 32 px (stage 0: 8x8 map, window 4, shift 2; stage 1: 4x4, one window)."""
    opts = FAMILIES[family] + ["DATA.IMG_SIZE", str(IMG), "MODEL.NUM_CLASSES", "10", "MODEL.DROP_PATH_RATE", "0.0",
                               "FUSED_WINDOW_PROCESS", str(fused)]
    if family in ATTN_OPTS:
        opts += [ATTN_OPTS[family], attn_impl]
    torch.manual_seed(seed)
    model = build_model(load_config(None, opts=opts))
    with torch.no_grad():  # V2 starts its post-norms at zero, which would hide attention from every check
        for name, p in model.named_parameters() if family == "swinv2" else ():
            if ".norm1." in name or ".norm2." in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    return model


def attn_impls_of(family: str):
    """Both attention paths for families with attention, one run for the others (their results do not depend on it)."""
    return ATTN_IMPLS if family in ATTN_OPTS else ATTN_IMPLS[:1]


def family_and_impl():
    return [(family, impl) for family in FAMILIES for impl in attn_impls_of(family)]


def cuda_layout_sdpa(real):
    """SDPA whose result has the memory layout of CUDA's fused kernels: (B, M, H, K) transposed to (B, H, M, K)."""
    def sdpa(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return sdpa


@pytest.fixture
def cuda_layouts(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout_sdpa(F.scaled_dot_product_attention))


def forward_backward(model: torch.nn.Module, images: torch.Tensor):
    """Logits and the gradient of every parameter for a fixed loss."""
    model.zero_grad(set_to_none=True)
    logits = model(images)
    logits.float().square().mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


def assert_grads_close(grads, expected, atol=1e-5, rtol=1e-4):
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family,attn_impl", family_and_impl())
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("size", [IMG, 44], ids=["configured", "padded"])
def test_cuda_attention_layout(family, attn_impl, fused, size, monkeypatch):
    """Forward and backward, training and evaluation, give the same results when SDPA returns CUDA's layout."""
    model = micro_model(family, attn_impl, fused)
    images = torch.randn(3, 3, size, size)
    expected_logits, expected_grads = forward_backward(model, images)
    model.eval()
    with torch.no_grad():
        expected_eval = model(images)
    model.train()
    monkeypatch.setattr(F, "scaled_dot_product_attention", cuda_layout_sdpa(F.scaled_dot_product_attention))
    logits, grads = forward_backward(model, images)
    torch.testing.assert_close(logits, expected_logits)
    assert_grads_close(grads, expected_grads)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected_eval)


@pytest.mark.parametrize("family,attn_impl", family_and_impl())
def test_non_contiguous_inputs(family, attn_impl, cuda_layouts):
    """channels_last batches, NHWC data seen as NCHW, and strided crops give the contiguous batch's results."""
    model = micro_model(family, attn_impl)
    images = torch.randn(2, 3, IMG, IMG)
    expected_logits, expected_grads = forward_backward(model, images)
    wide = torch.randn(2, 3, IMG, 2 * IMG)
    wide[..., ::2] = images
    variants = {
        "channels_last": images.to(memory_format=torch.channels_last),
        "nhwc_permuted": images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "strided": wide[..., ::2],
    }
    for name, batch in variants.items():
        assert not batch.is_contiguous(), name
        logits, grads = forward_backward(model, batch)
        torch.testing.assert_close(logits, expected_logits, msg=lambda m: f"{name}: {m}")
        assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize("family,attn_impl", family_and_impl())
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast(family, attn_impl, fused, dtype, cuda_layouts):
    """float16 and bfloat16 autocast: forward and backward run, logits near float32's, gradients finite."""
    model = micro_model(family, attn_impl, fused)
    images = torch.randn(2, 3, 44, 44)  # padded blocks: the cached masks meet half-precision logits
    with torch.no_grad():
        reference = model(images)
    with torch.autocast("cpu", dtype=dtype):
        logits = model(images)
    logits.float().square().mean().backward()
    # Half precision keeps 8 (bf16) or 11 (fp16) bits of mantissa; logits of this random model are O(1).
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("family,attn_impl", family_and_impl())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bf16"])
def test_half_model_at_other_sizes(family, attn_impl, dtype, cuda_layouts):
    """A model converted with .half() / .to(bfloat16) runs at sizes other than the configured one: the masks built
    for those sizes follow the model's dtype (a float32 mask would promote the logits to float32)."""
    model = micro_model(family, attn_impl)
    images = torch.randn(2, 3, 44, 44)
    with torch.no_grad():
        reference = model(images)
    model.to(dtype)
    for size in (IMG, 44):  # the configured size uses the buffer, 44 the per-size cache
        logits, _ = forward_backward(model, images[..., :size, :size].to(dtype))
        assert logits.dtype == dtype
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_cache_is_bounded(family):
    """Inputs of ever new sizes do not grow the per-size mask cache without bound."""
    model = micro_model(family).eval()
    if not any(layer.needs_mask for layer in model.layers):
        pytest.skip(f"{family} mixes tokens without attention masks (zero padding), so it caches none")
    with torch.no_grad():
        for size in range(33, 33 + 3 * MASK_CACHE_SIZE):
            model(torch.randn(1, 3, size, size))
    caches = [layer._mask_cache for layer in model.layers if hasattr(layer, "_mask_cache")]
    assert caches, "the model has no per-size mask cache to check"
    for cache in caches:
        assert 0 < len(cache) <= MASK_CACHE_SIZE

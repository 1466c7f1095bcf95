"""Every attention path (sdpa, flex, flex_grid) against the explicit float32 path, for V1 and V2: outputs and the
gradients of every parameter, shifted and unshifted blocks, configured and padded sizes; eager and compiled."""
import pytest
import torch
import torch.nn.functional as F

from models import SwinTransformer, SwinTransformerV2, window_flex
from models.swin_transformer import SDPA_MASK_ALIGNMENT, shifted_window_mask, window_partition

FAMILIES = {"swin": SwinTransformer, "swinv2": SwinTransformerV2}
PATHS = ("sdpa", "flex", "flex_grid")
# Configured (32: stage 0 has 16x16 tokens, window 4, shift 2), padded (44 -> 22x22 and 11x11), non-square and
# odd-sized (37x29), and smaller than a window at the shifted stage (6 -> 3x3).
SIZES = [(32, 32), (44, 44), (37, 29), (6, 6)]
# The criterion: every path equals the explicit float32 path within 1e-5.
TOLERANCE = dict(atol=1e-5, rtol=1e-5)

needs_flex = pytest.mark.skipif(not window_flex.flex_available(), reason="this torch has no FlexAttention")


def micro_model(family: str, attn_impl: str, embed_dim: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family](img_size=32, patch_size=2, embed_dim=embed_dim, depths=(2, 2), num_heads=(2, 4),
                             window_size=4, num_classes=5, drop_path_rate=0.0, attn_impl=attn_impl)
    with torch.no_grad():  # V2 starts its post-norms at zero, which would hide attention from every check
        for name, p in model.named_parameters() if family == "swinv2" else ():
            if ".norm1." in name or ".norm2." in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    return model


def forward_backward(model: torch.nn.Module, images: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(images)
    logits.square().sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture
def flex_cpu_backward(monkeypatch):
    """Lets FlexAttention run backward on the CPU. torch refuses it up front (its CPU kernel has no backward), but
    its autograd formula is the same dense implementation it runs eagerly on every device; these tests use it to
    check the gradients through our score and mask modifications. The fused GPU kernel is checked by the gpu test."""
    import torch.nn.attention.flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    monkeypatch.setattr(window_flex, "NO_FLEX_BACKWARD", ())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_impl", PATHS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_path_equals_explicit_float32(family, attn_impl, size, flex_cpu_backward):
    if attn_impl in ("flex", "flex_grid") and not window_flex.flex_available():
        pytest.skip("this torch has no FlexAttention")
    explicit = micro_model(family, "explicit")
    other = micro_model(family, attn_impl)
    other.load_state_dict(explicit.state_dict())
    images = torch.randn(3, 3, *size)
    expected_logits, expected_grads = forward_backward(explicit, images)
    logits, grads = forward_backward(other, images)
    torch.testing.assert_close(logits, expected_logits, **TOLERANCE)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **TOLERANCE, msg=lambda m: f"{name}: {m}")


@needs_flex
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn_impl", ["flex", "flex_grid"])
def test_flex_inference_runs_on_the_cpu_and_training_says_what_to_use(family, attn_impl):
    explicit, flex = micro_model(family, "explicit").eval(), micro_model(family, attn_impl).eval()
    flex.load_state_dict(explicit.state_dict())
    images = torch.randn(2, 3, 44, 44)
    with torch.no_grad():
        torch.testing.assert_close(flex(images), explicit(images), **TOLERANCE)
    with pytest.raises(NotImplementedError, match="no backward pass on cpu.*attn_impl auto, sdpa or explicit"):
        flex.train()(images)


@needs_flex
@pytest.mark.parametrize("attn_impl", ["flex", "flex_grid"])
def test_flex_under_bfloat16_autocast(attn_impl):
    explicit, flex = micro_model("swin", "explicit").eval(), micro_model("swin", attn_impl).eval()
    flex.load_state_dict(explicit.state_dict())
    images = torch.randn(2, 3, 44, 44)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = explicit(images), flex(images)
    # Both round q, k, v to bfloat16 (8 bits of mantissa); the logits of this random model are O(1).
    torch.testing.assert_close(actual.float(), expected.float(), atol=0.05, rtol=0.05)


@needs_flex
@pytest.mark.parametrize("attn_impl", ["flex", "flex_grid"])
def test_flex_paths_compile_in_one_graph_without_recompiling(attn_impl):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = micro_model("swin", attn_impl).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(images), model(images))
    # The score modifications are new closures every call, and flex_grid's block masks are cached in eager mode:
    # neither may make the compiled model recompile (a Swin-T compile takes about a minute on a GPU).
    assert counter.frame_count == 1


@needs_flex
@pytest.mark.parametrize("attn_impl", ["flex", "flex_grid"])
def test_eager_model_compiles_flex_once_per_shape_not_per_call(attn_impl, monkeypatch):
    """In an eager model on a GPU, flex_attention is compiled on its own; new score closures, tables and cached block
    masks every call must not recompile it (past dynamo's limit it would fall back to the unfused reference). Run
    here on the CPU with a counting backend in place of inductor."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(window_flex, "EAGER_FLEX_COMPILED_ON", ("cpu",))
    monkeypatch.setattr(window_flex, "EAGER_FLEX_BACKEND", counter)
    monkeypatch.setattr(window_flex, "_compiled_flex", None)
    model = micro_model("swin", attn_impl).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(images)
        frames = counter.frame_count
        for _ in range(2):
            torch.testing.assert_close(model(images), first)
    assert 0 < frames == counter.frame_count


@pytest.mark.slow
@needs_flex
def test_flex_grid_block_compiles_with_inductor_on_the_cpu():
    # Inductor's CPU FlexAttention template (C++), about 30 s on a 2-core CPU.
    torch._dynamo.reset()
    block = micro_model("swin", "flex_grid").eval().layers[0].blocks[1]
    assert block.shift_size > 0
    explicit_stage = micro_model("swin", "explicit").eval().layers[0]
    x = torch.randn(2, 11, 13, 16)  # needs padding on the other paths
    _, shifted_mask = explicit_stage.masks(11, 13, x.device)  # a flex_grid stage builds none
    with torch.no_grad():
        expected = explicit_stage.blocks[1](x, shifted_mask)
        torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), expected, **TOLERANCE)


@needs_flex
@pytest.mark.parametrize("height,width,window,shift", [(8, 8, 4, 2), (6, 8, 4, 0), (7, 5, 4, 2), (3, 3, 4, 2),
                                                        (14, 14, 7, 3), (13, 9, 7, 3)])
def test_grid_mask_keeps_exactly_the_pairs_the_shifted_windows_attend(height, width, window, shift):
    """The block mask on the un-partitioned map allows a pair of tokens exactly when the padded, rolled and
    partitioned path puts both in one window with mask 0 (same region, key not padding)."""
    Hp, Wp = -(-height // window) * window, -(-width // window) * window
    mask = shifted_window_mask(Hp, Wp, window, shift, height, width)
    # Token number of each window position: pad, roll like the block does, partition.
    token = torch.full((Hp, Wp), -1)
    token[:height, :width] = torch.arange(height * width).reshape(height, width)
    token = torch.roll(token, shifts=(-shift, -shift), dims=(0, 1))
    windows = window_partition(token[None, :, :, None], window).flatten(1)  # (nW, N)
    expected = torch.zeros(height * width, height * width, dtype=torch.bool)
    for w, ids in enumerate(windows):
        allowed = torch.ones(len(ids), len(ids), dtype=torch.bool) if mask is None else mask[w] == 0
        for i, q in enumerate(ids.tolist()):
            for j, k in enumerate(ids.tolist()):
                if q >= 0 and k >= 0 and allowed[i, j]:
                    expected[q, k] = True
    mask_mod = window_flex.grid_mask_mod(width, window, shift)
    q_idx, kv_idx = torch.meshgrid(torch.arange(height * width), torch.arange(height * width), indexing="ij")
    assert torch.equal(mask_mod(0, 0, q_idx, kv_idx), expected)


@needs_flex
def test_a_flex_grid_model_switched_to_explicit_keeps_its_masks():
    """A flex_grid stage needs no additive masks, but torch.export switches every path to explicit
    (models/export.py): the stage must then build them, at the configured size and at others."""
    explicit = micro_model("swin", "explicit").eval()
    switched = micro_model("swin", "flex_grid").eval()
    for module in switched.modules():
        if hasattr(module, "attn_impl"):
            module.attn_impl = "explicit"
    with torch.no_grad():
        for size in (32, 44):
            images = torch.randn(2, 3, size, size)
            torch.testing.assert_close(switched(images), explicit(images), **TOLERANCE)


def test_shifted_sdpa_takes_qkv_views_and_an_aligned_per_window_mask(monkeypatch):
    """Shifted blocks give SDPA the projection's q, k, v views and a (B * nW, nH, N, N) mask whose rows are aligned
    for CUDA's memory-efficient kernel. Folding windows into heads instead, as before, copied q, k, v and the output
    in every shifted block (and the kernel padded the unaligned mask again)."""
    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((q, attn_mask))
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = micro_model("swin", "sdpa").eval()
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    shifted = [(q, m) for q, m in calls if m.shape[0] > 1]
    assert shifted, "shifted blocks must pass a (B * nW, nH, N, N) mask"
    # Stage 0: 16x16 tokens, 16 windows an image, 2 heads; stage 1: 8x8 tokens, 4 windows, 4 heads.
    assert sorted(tuple(q.shape) for q, _ in shifted) == [(3 * 4, 4, 16, 8), (3 * 16, 2, 16, 8)]
    for q, attn_mask in shifted:
        assert not q.is_contiguous(), "q must be the strided view of the qkv projection, not a copy"
        assert attn_mask.shape == (q.shape[0], q.shape[1], 16, 16)
        assert all(stride % SDPA_MASK_ALIGNMENT == 0 for stride in attn_mask.stride()[:-1])


def test_fused_window_op_is_not_used_where_partition_is_a_view(monkeypatch):
    """An unshifted map one window wide (Swin-T's 7x7 last stage) is partitioned by views; the fused op would copy."""
    from kernels import window_process
    if not window_process.is_available(torch.device("cpu")):
        pytest.skip("the fused window kernel could not be built here")
    calls = []
    real = window_process.roll_and_window_partition
    monkeypatch.setattr(window_process, "roll_and_window_partition",
                        lambda x, shift, window: calls.append((tuple(x.shape), shift)) or real(x, shift, window))
    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=8,
                            num_classes=5, fused_window_process=True).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # Stage 0: 16x16, window 8, both blocks fused; stage 1: 8x8 = one window, not shifted: views only.
    assert calls and all(shape[1:3] == (16, 16) for shape, _ in calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_flex
# Each flex case compiles its kernels (forward and backward, per stage shape and mask): V2 only on the grid path.
@pytest.mark.parametrize("family, attn_impl", [("swin", "sdpa"), ("swin", "flex"), ("swin", "flex_grid"),
                                               ("swinv2", "flex_grid")])
def test_cuda_path_equals_explicit_float32(family, attn_impl, monkeypatch):
    # TF32 off: the check is of the attention paths, not of the matmul precision.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    # FlexAttention's GPU kernel needs heads of at least 16 channels: 32 channels, 2 and 4 heads.
    explicit = micro_model(family, "explicit", embed_dim=32).cuda()
    other = micro_model(family, attn_impl, embed_dim=32).cuda()
    other.load_state_dict(explicit.state_dict())
    images = torch.randn(3, 3, 44, 44, device="cuda")
    expected_logits, expected_grads = forward_backward(explicit, images)
    logits, grads = forward_backward(other, images)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")

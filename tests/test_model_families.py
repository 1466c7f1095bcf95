"""Swin V2 and Swin-MLP: released-weight reproduction, published sizes, attention paths, the shared trunk."""
import glob
import json
import math
import os

import pytest
import torch

import config as cfg_lib
from models import SwinMLP, SwinTransformer, SwinTransformerV2, build_model
from models.state_dict import load_state_dict_checked
from models.swin_transformer_v2 import LOGIT_SCALE_MAX, WindowAttentionV2, relative_coords_table

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"swinv2": SwinTransformerV2, "swin_mlp": SwinMLP}
V2_FIXTURES = ["swinv2_micro_w4_64", "swinv2_micro_w8_from_w4_64"]
DERIVED = ("relative_position_index", "relative_coords_table", "attn_mask")


def fixture(name: str):
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        meta = json.load(f)
    state = torch.load(os.path.join(FIXTURES, name + ".pth"), weights_only=True)["model"]
    io = torch.load(os.path.join(FIXTURES, name + "_io.pt"), weights_only=True)
    return meta, state, io


@pytest.mark.parametrize("name,cls,options", [
    (name, SwinTransformerV2, dict(attn_impl=impl, fused_window_process=fused))
    for name in V2_FIXTURES for impl in ("sdpa", "explicit") for fused in (False, True)
] + [("swin_mlp_micro_w4_64", SwinMLP, dict(fused_window_process=fused)) for fused in (False, True)])
def test_reproduces_released_logits_flops_and_params(name, cls, options):
    meta, state, io = fixture(name)
    model = cls(**meta["constructor"], **options).eval()
    report = load_state_dict_checked(model, state)
    assert not report.missing and not report.unexpected
    with torch.no_grad():
        logits = model(io["input"])
    assert (logits - io["logits"]).abs().max().item() < 1e-5
    assert model.flops() == meta["flops"]
    assert sum(p.numel() for p in model.parameters()) == meta["params"]


@pytest.mark.parametrize("name", V2_FIXTURES)
def test_v2_derived_buffers_are_rebuilt_exactly_and_not_saved(name):
    """The released files carry the coordinate tables, indices and masks; ours are rebuilt bit for bit (the w8
    fixture's tables were built for a pretrained window of 4) and left out of state_dict()."""
    meta, state, _ = fixture(name)
    model = SwinTransformerV2(**meta["constructor"])
    buffers = dict(model.named_buffers())
    released = [k for k in state if k.endswith(DERIVED)]
    assert any(k.endswith("relative_coords_table") for k in released)
    for key in released:
        if key.endswith("attn_mask"):  # the reference keeps a copy per shifted block, we keep one per stage
            stage = key.split(".")[1]
            assert torch.equal(buffers[f"layers.{stage}.attn_mask"], state[key]), key
        else:
            assert torch.equal(buffers[key], state[key]), key
    learned = {k: tuple(v.shape) for k, v in state.items() if not k.endswith(DERIVED)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == learned
    assert load_state_dict_checked(model, state).dropped_derived == released


def test_mlp_parameter_names_and_shapes_are_the_released_ones():
    meta, state, _ = fixture("swin_mlp_micro_w4_64")
    model = SwinMLP(**meta["constructor"])
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}


# Published parameter counts and FLOPs (reference convention) of every config (SWIN_FAMILIES.md).
PUBLISHED = {
    "swinv2_tiny_patch4_window8_256": (28347154, 5925697536),
    "swinv2_tiny_patch4_window16_256": (28347154, 6605174784),
    "swinv2_small_patch4_window8_256": (49728418, 11514869760),
    "swinv2_small_patch4_window16_256": (49728418, 12647331840),
    "swinv2_base_patch4_window8_256": (87918816, 20285661184),
    "swinv2_base_patch4_window16_256": (87918816, 21795610624),
    "swinv2_base_patch4_window12_192_22k": (109280841, 11782239232),
    "swinv2_base_patch4_window12to16_192to256_22kto1k_ft": (87918816, 21795610624),
    "swinv2_base_patch4_window12to24_192to384_22kto1k_ft": (87918816, 54748340224),
    "swinv2_large_patch4_window12_192_22k": (228772549, 25996955136),
    "swinv2_large_patch4_window12to16_192to256_22kto1k_ft": (196739932, 47490920448),
    "swinv2_large_patch4_window12to24_192to384_22kto1k_ft": (196739932, 115416895488),
    "swin_mlp_tiny_c24_patch4_window8_256": (20386632, 4031920128),
    "swin_mlp_tiny_c12_patch4_window8_256": (21152072, 4031920128),
    "swin_mlp_tiny_c6_patch4_window8_256": (22682952, 4031920128),
    "swin_mlp_base_patch4_window7_224": (60659416, 10419612544),
}


def test_every_published_config_is_shipped():
    shipped = {os.path.basename(p)[:-5] for d in ("swinv2", "swinmlp")
               for p in glob.glob(os.path.join(REPO, "configs", d, "*.yaml"))}
    assert shipped == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_every_config_builds_the_published_model(name):
    folder = "swinv2" if name.startswith("swinv2") else "swinmlp"
    config = cfg_lib.load_config(os.path.join(REPO, "configs", folder, name + ".yaml"))
    with torch.device("meta"):
        model = build_model(config)
    assert isinstance(model, CLASSES[config.MODEL.TYPE])
    assert (sum(p.numel() for p in model.parameters()), model.flops()) == PUBLISHED[name]


def tiny(family: str, **kwargs):
    args = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                num_classes=5, drop_path_rate=0.0)
    args.update(kwargs)
    return CLASSES[family](**args)


def randomise_norms(model: torch.nn.Module) -> None:
    """V2 starts its post-norms at zero, which would hide the attention from outputs and gradients."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm1." in name or ".norm2." in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)


@pytest.mark.parametrize("size", [32, 30])
def test_v2_sdpa_and_explicit_agree_in_outputs_and_gradients(size):
    torch.manual_seed(0)
    sdpa, explicit = tiny("swinv2", attn_impl="sdpa"), tiny("swinv2", attn_impl="explicit")
    randomise_norms(sdpa)
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(3, 3, size, size)
    out_a, out_b = sdpa(x), explicit(x)
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, a), (_, b) in zip(sdpa.named_parameters(), explicit.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_v2_temperature_is_clamped_at_log_100():
    attn = WindowAttentionV2(dim=8, window_size=2, num_heads=2)
    with torch.no_grad():
        attn.logit_scale.copy_(torch.tensor([10.0, 1.0]).reshape(2, 1, 1))
    torch.testing.assert_close(attn.temperature().flatten(), torch.tensor([100.0, math.e]))
    attn.temperature().sum().backward()
    assert attn.logit_scale.grad.flatten()[0] == 0 and attn.logit_scale.grad.flatten()[1] > 0
    assert LOGIT_SCALE_MAX == pytest.approx(math.log(100.0))


def test_v2_block_compiles_with_fullgraph():
    """The clamp bound is a Python float: no host read (.item()) and no CPU tensor, so no graph break."""
    torch.manual_seed(0)
    model = tiny("swinv2")
    randomise_norms(model)
    stage = model.layers[0]
    block = stage.blocks[1]
    assert block.shift_size > 0
    _, mask = stage.masks(16, 16, torch.device("cpu"))
    x = torch.randn(2, 16, 16, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), block(x, mask))
    compiled(x, mask).sum().backward()
    assert block.attn.logit_scale.grad is not None and block.attn.cpb_mlp[0].weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_v2_runs_on_cuda_like_on_cpu():
    torch.manual_seed(0)
    model = tiny("swinv2")
    randomise_norms(model)
    x = torch.randn(2, 3, 32, 32)
    expected = model.eval()(x)
    torch.testing.assert_close(model.cuda()(x.cuda()).cpu(), expected, atol=1e-4, rtol=1e-4)


def test_relative_coords_table_follows_the_pretrained_window():
    table = relative_coords_table(16, 12)
    assert table.shape == (1, 31, 31, 2)
    # The largest offset, 15, is divided by the pretrained window's 11, scaled by 8 and log-spaced.
    assert table.max().item() == pytest.approx(math.log2(15 / 11 * 8 + 1) / 3)
    assert relative_coords_table(8).max().item() == pytest.approx(math.log2(9) / 3)  # own window: 7 / 7 * 8
    assert torch.isfinite(relative_coords_table(1)).all()


@pytest.mark.parametrize("family", CLASSES)
@pytest.mark.parametrize("size", [(32, 32), (37, 29), (20, 44), (2, 2)])
def test_any_input_size(family, size):
    model = tiny(family, ape=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", CLASSES)
def test_fused_window_kernel_gives_the_same_results(family):
    torch.manual_seed(0)
    plain, fused = tiny(family), tiny(family, fused_window_process=True)
    randomise_norms(plain)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out_a, out_b = plain(x), fused(x)
    torch.testing.assert_close(out_a, out_b)
    out_a.sum().backward()
    out_b.sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("family", CLASSES)
def test_gradient_checkpointing_and_gradients_reach_every_parameter(family):
    torch.manual_seed(0)
    plain, ckpt = tiny(family, ape=True), tiny(family, ape=True, use_checkpoint=True)
    randomise_norms(plain)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("family", CLASSES)
def test_stage_features_head_split_and_drop_path_schedule(family):
    model = tiny(family).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in maps] == [(2, 16, 16, 16), (2, 32, 8, 8)]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
    model = tiny(family, drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for layer in model.layers for b in layer.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 4))


def test_v2_post_norm_starts_at_zero_and_merging_normalises_after_reduction():
    model = tiny("swinv2")
    for layer in model.layers:
        for block in layer.blocks:
            assert not block.norm1.weight.any() and not block.norm2.weight.any()
    merging = model.layers[0].downsample
    assert merging.norm.normalized_shape == (32,) and merging.reduction.in_features == 64


def test_no_weight_decay_sets_are_the_references():
    assert tiny("swinv2").no_weight_decay_keywords() == {"cpb_mlp", "logit_scale", "relative_position_bias_table"}
    assert tiny("swin_mlp").no_weight_decay_keywords() == {"relative_position_bias_table"}
    for family in CLASSES:
        assert tiny(family).no_weight_decay() == {"absolute_pos_embed"}


def test_families_share_one_implementation_of_each_part():
    """A fix in the shared parts is a fix in all: every family's blocks, stages and trunk are the same classes."""
    from models.swin_transformer import BasicLayer, PatchEmbed, WindowBlock, WindowTransformer
    for model in (tiny("swinv2"), tiny("swin_mlp"), SwinTransformer(img_size=32, depths=(2, 2), num_heads=(2, 4),
                                                                     embed_dim=16, window_size=4)):
        assert isinstance(model, WindowTransformer) and type(model.patch_embed) is PatchEmbed
        assert all(type(layer) is BasicLayer for layer in model.layers)
        assert all(isinstance(block, WindowBlock) for layer in model.layers for block in layer.blocks)

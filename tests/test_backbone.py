"""The backbone API of every family: forward_intermediates, prune_intermediate_layers, as_backbone / build_backbone,
checked against timm's features_only Swin V1 and V2 on the same released-format weights."""
import importlib.util
import json
import logging
import os

import pytest
import timm
import torch

from config import MODEL_SECTIONS, load_config
from models import build_backbone, build_model
from models.state_dict import load_state_dict_checked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
# One released-format micro model per family (3 stages, 64 px, windows of 4; the last stage is one window).
FAMILY_FIXTURES = {"swin": "swin_micro_w4_64", "swinv2": "swinv2_micro_w4_64", "swin_mlp": "swin_mlp_micro_w4_64"}
# timm's model of each family that has one (Swin-MLP has none), built with the fixture's sizes.
TIMM_MODELS = {"swin": "swin_tiny_patch4_window7_224", "swinv2": "swinv2_tiny_window8_256"}


def fixture_opts(name: str, family: str, **overrides) -> list:
    """``--opts`` pairs that build the released fixture ``name`` (tests/fixtures) of ``family`` from a config."""
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        constructor = json.load(f)["constructor"]
    values = {"MODEL.TYPE": family, "DATA.IMG_SIZE": constructor.pop("img_size"),
              "MODEL.NUM_CLASSES": constructor.pop("num_classes"), "MODEL.DROP_PATH_RATE": 0.0}
    section = MODEL_SECTIONS[family]
    values.update({f"MODEL.{section}.{key.upper()}": value for key, value in constructor.items()})
    values.update(overrides)
    return [item for key, value in values.items() for item in (key, str(value))]


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name + ".pth")


def released_classifier(family: str):
    """The family's fixture as a classifier with its released weights, in eval mode."""
    name = FAMILY_FIXTURES[family]
    model = build_model(load_config(None, fixture_opts(name, family))).eval()
    load_state_dict_checked(model, torch.load(fixture_path(name), weights_only=True)["model"])
    return model


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timm_features_only(family: str, tmp_path):
    """timm's features_only model of the family with the fixture's weights, converted by our tool."""
    name = FAMILY_FIXTURES[family]
    with open(os.path.join(FIXTURES, name + ".json")) as f:
        constructor = json.load(f)["constructor"]
    converted = str(tmp_path / "timm.pth")
    assert load_tool("convert_checkpoint").main(["--to", "timm", fixture_path(name), converted]) == 0
    kwargs = {key: constructor[key] for key in ("img_size", "patch_size", "embed_dim", "depths", "num_heads",
                                                "window_size", "mlp_ratio", "qkv_bias", "num_classes")}
    if family == "swinv2":
        kwargs["pretrained_window_sizes"] = constructor["pretrained_window_sizes"]
    # strict_img_size=False: timm then builds masks per input size, so it runs at 128 px as well.
    return timm.create_model(TIMM_MODELS[family], features_only=True, strict_img_size=False, pretrained=True,
                             pretrained_cfg_overlay=dict(file=converted), **kwargs).eval()


@pytest.mark.parametrize("family", TIMM_MODELS)
def test_stage_maps_equal_timm_features_only(family, tmp_path):
    """Same weights, same maps. At 64 px (the configured size) and 128 px every stage is a whole number of windows;
    at other sizes the maps differ by design: timm attends to the zero padding, we mask it as the reference does."""
    theirs = timm_features_only(family, tmp_path)
    ours = released_classifier(family).as_backbone()
    assert [info["num_chs"] for info in ours.feature_info] == theirs.feature_info.channels()
    assert [info["reduction"] for info in ours.feature_info] == theirs.feature_info.reduction() == [4, 8, 16]
    torch.manual_seed(0)
    for height, width in ((64, 64), (128, 128), (64, 128)):
        images = torch.randn(2, 3, height, width)
        with torch.no_grad():
            expected = [m.permute(0, 3, 1, 2) for m in theirs(images)]  # timm's Swin maps are NHWC
            actual = ours(images)
        assert len(actual) == len(expected) == 3
        for ours_map, timm_map in zip(actual, expected):
            torch.testing.assert_close(ours_map, timm_map, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_forward_intermediates_has_timms_meaning(family):
    model = released_classifier(family)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(images)
        torch.testing.assert_close(final, model.forward_features(images))
        torch.testing.assert_close(model.forward_head(final), model(images))
        assert [tuple(m.shape) for m in maps] == [(2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
                                                  for info in model.feature_info]
        assert all(m.is_contiguous() for m in maps)
        nhwc = model.forward_intermediates(images, output_fmt="NHWC", intermediates_only=True)
        assert all(torch.equal(a, b.permute(0, 2, 3, 1)) for a, b in zip(nhwc, maps))
        # indices: the last n stages, or the stages listed (negative from the end)
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(images, 2, intermediates_only=True),
                                                      maps[1:]))
        first, last = model.forward_intermediates(images, [0, -1], intermediates_only=True)
        assert torch.equal(first, maps[0]) and torch.equal(last, maps[2])
        # norm: the final norm applies to the last stage's map only
        normed = model.forward_intermediates(images, norm=True, intermediates_only=True)
        assert torch.equal(normed[0], maps[0])
        torch.testing.assert_close(normed[2], final.permute(0, 3, 1, 2))
        # stop_early: the features are those of the last stage run, not normalised
        stopped, early = model.forward_intermediates(images, [1], stop_early=True)
        assert torch.equal(early[0], maps[1]) and torch.equal(stopped.permute(0, 3, 1, 2), maps[1])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images, output_fmt="NCWH")
    with pytest.raises(ValueError, match="stage indices"):
        model.forward_intermediates(images, [3])
    with pytest.raises(ValueError, match="last 4 stages"):
        model.forward_intermediates(images, 4)


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_backbone_maps_at_any_size_are_the_classifiers(family):
    """Sizes that pad in every stage and odd maps that patch merging pads: ceil(H / stride) maps, each equal to the
    full classifier's intermediate, and the last one, normalised, to forward_features."""
    classifier = released_classifier(family)
    backbone = released_classifier(family).as_backbone(norm=True)
    for height, width in ((67, 93), (36, 130), (4, 4)):
        images = torch.randn(1, 3, height, width)
        with torch.no_grad():
            maps = backbone(images)
            expected = classifier.forward_intermediates(images, norm=True, intermediates_only=True)
            final = classifier.forward_features(images)
        sizes = [((height + r - 1) // r, (width + r - 1) // r) for r in (4, 8, 16)]
        assert [tuple(m.shape[2:]) for m in maps] == sizes
        for actual, reference in zip(maps, expected):
            assert torch.equal(actual, reference)
        torch.testing.assert_close(maps[-1], final.permute(0, 3, 1, 2))


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_prune_intermediate_layers_drops_what_the_maps_do_not_need(family):
    model = released_classifier(family)
    full_flops = model.flops()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(images, intermediates_only=True)
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    keys = list(model.state_dict())
    assert len(model.layers) == 2 and model.layers[1].downsample is None
    assert not [k for k in keys if k.startswith(("layers.2.", "layers.1.downsample.", "norm.", "head."))]
    assert model.pruned_prefixes == ("layers.1.downsample.", "layers.2.", "norm.", "head.")
    assert model.num_features == model.feature_info[-1]["num_chs"] == 2 * model.embed_dim and model.num_classes == 0
    assert 0 < model.flops() < full_flops
    with torch.no_grad():
        maps = model.forward_intermediates(images, intermediates_only=True)
        final, _ = model.forward_intermediates(images)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected[:2]))
    assert torch.equal(final.permute(0, 3, 1, 2), expected[1])  # the last kept stage, no norm
    head_only = released_classifier(family)
    assert head_only.prune_intermediate_layers() == [2]  # timm's default: keep the last stage, drop the head
    assert head_only.pruned_prefixes == ("head.",) and len(head_only.layers) == 3


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_build_backbone_loads_a_released_classifier_in_one_call(family, caplog):
    name = FAMILY_FIXTURES[family]
    config = load_config(None, fixture_opts(name, family, **{"MODEL.PRETRAINED": fixture_path(name)}))
    with caplog.at_level(logging.INFO, logger="checkpoint"):
        backbone = build_backbone(config, out_indices=(1, 2)).eval()
    # the final norm goes too: it is sized for the last stage and only used with norm=True
    assert "dropped (not in the backbone): norm.weight, norm.bias, head.weight, head.bias" in caplog.text
    assert [info["index"] for info in backbone.feature_info] == [1, 2]
    assert [info["reduction"] for info in backbone.feature_info] == [8, 16]
    assert [info["module"] for info in backbone.feature_info] == ["layers.1.blocks.1", "layers.2.blocks.1"]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = released_classifier(family).forward_intermediates(images, intermediates_only=True)
        maps = backbone(images)
    assert len(maps) == 2 and torch.equal(maps[0], expected[1]) and torch.equal(maps[1], expected[2])
    # feature_info's module is the one whose output is the map: a hook there sees it
    seen = []
    backbone.get_submodule(backbone.feature_info[0]["module"]).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        backbone(images)
    assert torch.equal(seen[0].permute(0, 3, 1, 2), maps[0])


def test_build_backbone_from_a_simmim_checkpoint():
    """A SimMIM pretraining checkpoint gives its encoder to the backbone (decoder and mask token dropped)."""
    config = load_config(None, fixture_opts("swin_micro_w4_64", "swin", **{
        "MODEL.PRETRAINED": fixture_path("simmim_swin_micro_w4_64")}))
    backbone = build_backbone(config)
    state = torch.load(fixture_path("simmim_swin_micro_w4_64"), weights_only=True)["model"]
    assert torch.equal(backbone.layers[2].blocks[1].mlp.fc2.weight, state["encoder.layers.2.blocks.1.mlp.fc2.weight"])


def test_a_backbone_cannot_be_made_twice_and_forward_stays_a_classifier_otherwise():
    model = released_classifier("swin")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    model.as_backbone()
    with pytest.raises(ValueError, match="backbone already"):
        model.as_backbone([0])

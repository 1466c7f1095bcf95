"""Swin V2 and Swin-MLP beyond the model: fine-tuning from released files, optimizer groups, timm conversion,
prediction, --eval and --throughput."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from checkpoint import MAP_22K_TO_1K, load_pretrained, read_class_map
from config import load_config
from models import build_model
from models.state_dict import adapt_state_dict, load_state_dict_checked
from optimizer import build_optimizer, parameter_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
V2_CONFIGS = os.path.join(REPO, "configs", "swinv2")
# Micro models of each family at 32 px: stage 0 is 8x8 tokens with windows of 4 (shifted), stage 1 one window.
MICRO = {
    "swin": {"MODEL.TYPE": "swin", "MODEL.SWIN.EMBED_DIM": 16, "MODEL.SWIN.DEPTHS": [2, 2],
             "MODEL.SWIN.NUM_HEADS": [2, 4], "MODEL.SWIN.WINDOW_SIZE": 4},
    "swinv2": {"MODEL.TYPE": "swinv2", "MODEL.SWINV2.EMBED_DIM": 16, "MODEL.SWINV2.DEPTHS": [2, 2],
               "MODEL.SWINV2.NUM_HEADS": [2, 4], "MODEL.SWINV2.WINDOW_SIZE": 4},
    "swin_mlp": {"MODEL.TYPE": "swin_mlp", "MODEL.SWIN_MLP.EMBED_DIM": 16, "MODEL.SWIN_MLP.DEPTHS": [2, 2],
                 "MODEL.SWIN_MLP.NUM_HEADS": [2, 4], "MODEL.SWIN_MLP.WINDOW_SIZE": 4},
}
COMMON = {"DATA.IMG_SIZE": 32, "MODEL.NUM_CLASSES": 10, "MODEL.DROP_PATH_RATE": 0.0}


def opts(values):
    return [item for key, value in values.items() for item in (key, str(value))]


def micro(family, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_model(load_config(None, opts({**COMMON, **MICRO[family], **overrides}))).eval()
    with torch.no_grad():  # V2's post-norms start at zero, which would hide everything before them
        for name, p in model.named_parameters():
            if ".norm1." in name or ".norm2." in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    return model


def released_state_dict(model):
    """The weights as the reference release saves them: with every derived table and, per shifted block, its
    attention mask (ours keeps one mask per stage, out of state_dict())."""
    state = dict(model.state_dict())
    for name, buffer in model.named_buffers():
        parts = name.split(".")
        if parts[-1] == "attn_mask" and len(parts) == 3:
            if buffer is None:
                continue
            layer = model.layers[int(parts[1])]
            for j, block in enumerate(layer.blocks):
                if block.shift_size:
                    state[f"layers.{parts[1]}.blocks.{j}.attn_mask"] = buffer.clone()
        else:
            state[name] = buffer.clone()
    return state


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- fine-tuning V2

def test_v2_base_22k_192_window12_loads_into_1k_256_window16():
    """The published fine-tuning pair, on the meta device: cpb_mlp and every learned tensor kept as is, derived
    tables dropped (and rebuilt for window 16 from the pretrained 12 / 6), the 22K head mapped to 1K."""
    with torch.device("meta"):
        source = build_model(load_config(os.path.join(V2_CONFIGS, "swinv2_base_patch4_window12_192_22k.yaml")))
        target = build_model(load_config(os.path.join(
            V2_CONFIGS, "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.yaml")))
    state = released_state_dict(source)
    adapted, report = adapt_state_dict(state, target, read_class_map(MAP_22K_TO_1K))
    assert not report.missing and not report.unexpected and not report.resized and not report.reinitialised
    assert sorted(report.class_mapped) == ["head.bias", "head.weight"]
    assert any(k.endswith("relative_coords_table") for k in report.dropped_derived)
    assert set(adapted) == set(target.state_dict())
    cpb = [k for k in adapted if ".cpb_mlp." in k]
    assert len(cpb) == 3 * 24 and all(adapted[k] is state[k] for k in cpb)
    assert adapted["head.weight"].shape == (1000, 1024)
    # The rebuilt tables: window 16 over the pretrained 12; the last stage (8x8 at 256 px) clipped to 8 over 6.
    first, last = target.layers[0].blocks[0].attn, target.layers[3].blocks[0].attn
    assert (first.window_size, first.pretrained_window_size, tuple(first.relative_coords_table.shape)) == (
        16, 12, (1, 31, 31, 2))
    assert (last.window_size, last.pretrained_window_size, tuple(last.relative_coords_table.shape)) == (
        8, 6, (1, 15, 15, 2))


def test_v2_fixture_pretrained_with_window_4_finetunes_to_window_8(tmp_path):
    """The swinv2_micro_w8_from_w4_64 weights, saved by a window-4 model (with its window-4 derived tables and
    masks), loaded with --pretrained into the window-8 model that PRETRAINED_WINDOW_SIZES [4, 4, 4] describes, give
    the reference's logits for that model."""
    with open(os.path.join(FIXTURES, "swinv2_micro_w8_from_w4_64.json")) as f:
        meta = json.load(f)["constructor"]
    state = torch.load(os.path.join(FIXTURES, "swinv2_micro_w8_from_w4_64.pth"), weights_only=True)["model"]
    io = torch.load(os.path.join(FIXTURES, "swinv2_micro_w8_from_w4_64_io.pt"), weights_only=True)
    arch = {"MODEL.TYPE": "swinv2", "DATA.IMG_SIZE": meta["img_size"], "MODEL.NUM_CLASSES": meta["num_classes"],
            "MODEL.DROP_PATH_RATE": 0.0, "MODEL.SWINV2.PATCH_SIZE": meta["patch_size"],
            "MODEL.SWINV2.EMBED_DIM": meta["embed_dim"], "MODEL.SWINV2.DEPTHS": meta["depths"],
            "MODEL.SWINV2.NUM_HEADS": meta["num_heads"], "MODEL.SWINV2.MLP_RATIO": meta["mlp_ratio"],
            "MODEL.SWINV2.QKV_BIAS": meta["qkv_bias"], "MODEL.SWINV2.APE": meta["ape"]}
    pretrain = build_model(load_config(None, opts({**arch, "MODEL.SWINV2.WINDOW_SIZE": 4})))
    load_state_dict_checked(pretrain, state)
    path = tmp_path / "w4.pth"
    released = released_state_dict(pretrain)
    assert released["layers.0.blocks.0.attn.relative_coords_table"].shape == (1, 7, 7, 2)
    torch.save({"model": released}, path)
    finetune = {**arch, "MODEL.SWINV2.WINDOW_SIZE": 8, "MODEL.SWINV2.PRETRAINED_WINDOW_SIZES": [4, 4, 4],
                "MODEL.PRETRAINED": path}
    config = load_config(None, opts(finetune))
    model = build_model(config).eval()
    load_pretrained(config, model)
    with torch.no_grad():
        assert (model(io["input"]) - io["logits"]).abs().max().item() < 1e-5


def test_v2_absolute_position_embedding_is_resized(tmp_path):
    source = micro("swinv2", **{"MODEL.SWINV2.APE": True})
    path = tmp_path / "ape.pth"
    torch.save({"model": released_state_dict(source)}, path)
    config = load_config(None, opts({**COMMON, **MICRO["swinv2"], "MODEL.SWINV2.APE": True, "DATA.IMG_SIZE": 64,
                                     "MODEL.SWINV2.WINDOW_SIZE": 8, "MODEL.PRETRAINED": path,
                                     "MODEL.SWINV2.PRETRAINED_WINDOW_SIZES": [4, 4]}))
    model = build_model(config)
    load_pretrained(config, model)
    assert model.absolute_pos_embed.shape == (1, 256, 16)
    assert torch.equal(model.layers[0].blocks[0].attn.cpb_mlp[0].weight, source.layers[0].blocks[0].attn.cpb_mlp[0].weight)


# --------------------------------------------------------------------------- optimizer

def test_v2_no_weight_decay_on_cpb_mlp_logit_scale_and_qv_biases():
    groups = parameter_groups(micro("swinv2"), weight_decay=0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    decay = {n for g in groups if g["weight_decay"] > 0.0 for n in g["names"]}
    prefix = "layers.0.blocks.1.attn."
    for name in ("cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight", "logit_scale", "q_bias", "v_bias"):
        assert prefix + name in no_decay, name
    assert prefix + "qkv.weight" in decay and prefix + "proj.weight" in decay


@pytest.mark.parametrize("family", MICRO)
def test_layer_decay_works_for_every_family(family):
    config = load_config(None, opts({**COMMON, **MICRO[family], "TRAIN.LAYER_DECAY": 0.5}))
    model = micro(family)
    optimizer = build_optimizer(config, model, torch.device("cpu"))
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # 4 blocks: the embedding is layer 0 (0.5^5), block j of the whole net layer j+1, the head layer 5 (scale 1).
    assert scale[id(named["patch_embed.proj.weight"])] == 0.5 ** 5
    assert scale[id(named["layers.0.blocks.0.norm1.weight"])] == 0.5 ** 4
    assert scale[id(named["layers.0.downsample.reduction.weight"])] == 0.5 ** 3
    assert scale[id(named["layers.1.blocks.1.mlp.fc1.weight"])] == 0.5 ** 1
    assert scale[id(named["head.weight"])] == 1.0


# --------------------------------------------------------------------------- timm interop

def timm_v2(num_classes=10):
    return timm.models.swin_transformer_v2.SwinTransformerV2(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
        num_classes=num_classes).eval()


def test_convert_v2_to_timm_and_back(tmp_path, capsys):
    convert = load_tool("convert_checkpoint")
    source = micro("swinv2")
    ours, theirs_file, back = (str(tmp_path / n) for n in ("ours.pth", "timm.pth", "back.pth"))
    torch.save({"model": released_state_dict(source)}, ours)
    assert convert.main(["--to", "timm", ours, theirs_file]) == 0
    assert "relative_coords_table" in capsys.readouterr().out
    theirs = timm_v2()
    theirs.load_state_dict(torch.load(theirs_file, weights_only=True))  # strict: every key matches
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(images), source(images), rtol=1e-5, atol=1e-5)
    assert convert.main(["--to", "ours", theirs_file, back]) == 0
    expected, actual = source.state_dict(), torch.load(back, weights_only=True)["model"]
    assert list(expected) == list(actual) and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_convert_v2_from_timm_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    theirs = timm_v2()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".norm1." in name or ".norm2." in name:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    timm_file, converted = tmp_path / "timm.pth", tmp_path / "ours.pth"
    torch.save(theirs.state_dict(), timm_file)
    assert load_tool("convert_checkpoint").main(["--to", "ours", str(timm_file), str(converted)]) == 0
    ours = micro("swinv2")
    load_state_dict_checked(ours, torch.load(converted, weights_only=True)["model"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tools and main.py

def write_family_config(family, path):
    lines = {}
    for key, value in {**COMMON, **MICRO[family]}.items():
        *parents, name = key.split(".")
        node = lines
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    lines["MODEL"]["NAME"] = f"micro_{family}"
    lines["DATA"]["NUM_WORKERS"] = 0
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(lines, f)
    return str(path)


@pytest.mark.parametrize("family", ["swinv2", "swin_mlp"])
def test_predict_works_for_the_family(family, tmp_path, capsys, digits_root):
    cfg = write_family_config(family, tmp_path / "micro.yaml")
    checkpoint = tmp_path / "weights.pth"
    torch.save({"model": released_state_dict(micro(family))}, checkpoint)
    images = os.path.join(digits_root, "val", "3")
    assert load_tool("predict").main(["--cfg", cfg, "--checkpoint", str(checkpoint), "--topk", "2", images]) == 0
    out = capsys.readouterr().out
    assert out.count("%") == 2 * len(os.listdir(images))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["swinv2", "swin_mlp"])
def test_eval_and_throughput_work_for_the_family(family, tmp_path, digits_root):
    cfg = write_family_config(family, tmp_path / "micro.yaml")
    checkpoint = tmp_path / "weights.pth"
    torch.save({"model": released_state_dict(micro(family))}, checkpoint)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "main.py", "--cfg", cfg, "--output", str(tmp_path)]
    for args in (["--eval", "--pretrained", str(checkpoint), "--data-path", digits_root, "--tag", "eval"],
                 ["--throughput", "--batch-size", "4", "--tag", "speed"]):
        result = subprocess.run(base + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / f"micro_{family}" / "eval" / "eval.json") as f:
        assert json.load(f)["count"] == 300
    with open(tmp_path / f"micro_{family}" / "speed" / "throughput.json") as f:
        assert json.load(f)["train_images_per_second"] > 0

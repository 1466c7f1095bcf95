"""torch.export and ONNX of every family (models/export.py, tools/export.py): outputs equal the eager model's at
batch 1 and 3 and, with a dynamic image size, at sizes other than the traced one; clear errors for what cannot be
exported."""
import os
import types

import pytest
import torch
import yaml

from models.export import export_program
from tests.test_backbone import FAMILY_FIXTURES, fixture_opts, fixture_path, load_tool, released_classifier

# float32: the bound tools/export.py checks (measured: 1e-8 to 1e-6).
TOLERANCE = 1e-4
SIZES = ((64, 64), (83, 91))  # the configured size, and one that pads every stage of the micro models


def write_config(path, name: str, family: str, **overrides) -> str:
    """The fixture's config as a YAML file, as a user would give it to tools/export.py."""
    opts = fixture_opts(name, family, **overrides)
    config: dict = {}
    for key, value in zip(opts[::2], opts[1::2]):
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def export_tool(tmp_path, name: str, family: str, fmt: str, *extra: str, checkpoint: str = None, **overrides):
    """Runs tools/export.py on a fixture; returns (exit status, path written)."""
    config = write_config(tmp_path / "config.yaml", name, family, **overrides)
    out = str(tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2"))
    argv = ["--cfg", config, "--resume", checkpoint or fixture_path(name), "--format", fmt, "--out", out, *extra]
    return load_tool("export").main(argv), out


def assert_matches_eager(model, run, sizes, batches=(1, 3)):
    for height, width in sizes:
        for batch in batches:
            images = torch.randn(batch, 3, height, width)
            with torch.no_grad():
                expected = model(images)
            actual = run(images)
            expected = expected if isinstance(expected, list) else [expected]
            assert len(actual) == len(expected)
            for a, e in zip(actual, expected):
                assert a.shape == e.shape
                assert (a - e).abs().max().item() < TOLERANCE, (batch, height, width)


def program_runner(program):
    module = program.module()

    def run(images):
        with torch.no_grad():
            out = module(images)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    return run


def onnx_runner(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda images: [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]


# --------------------------------------------------------------------------- torch.export


def test_dynamic_size_program_is_right_at_sizes_other_than_the_traced_one():
    """The masks of a dynamic-size program are computed in the graph for the size it runs at: a mask traced as a
    constant of the traced size (or taken from the model's per-size cache) would break every other size. The cache
    of the eager model is neither read (it holds a mask of another size here) nor filled by the export."""
    model = released_classifier("swin")
    with torch.no_grad():
        model(torch.randn(1, 3, 83, 91))  # fills the eager model's cache for 83x91
    cached = {id(layer): dict(layer._mask_cache) for layer in model.layers}
    program = export_program(model, (64, 64), dynamic_size=True)
    assert {id(layer): dict(layer._mask_cache) for layer in model.layers} == cached
    assert_matches_eager(model, program_runner(program), SIZES + ((33, 47),))


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_fixed_size_program_takes_any_batch(family):
    model = released_classifier(family)
    program = export_program(model, (64, 64))
    assert_matches_eager(model, program_runner(program), [(64, 64)], batches=(1, 3, 5))
    with pytest.raises(Exception, match="64"):  # the size is fixed: the program says so
        program.module()(torch.randn(1, 3, 96, 96))


def test_exported_graph_takes_the_plain_window_path_and_explicit_attention():
    from kernels.window_process import is_available

    if not is_available("cpu"):
        pytest.skip("the fused window kernel cannot be built here")
    model = released_classifier("swin")
    name = FAMILY_FIXTURES["swin"]
    fused = type(model)(**{**_constructor(name), "fused_window_process": True, "attn_impl": "sdpa"}).eval()
    fused.load_state_dict(model.state_dict())
    program = export_program(fused, (64, 64))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "window_process" in t or "scaled_dot_product" in t]
    assert all(m.attn_impl == "sdpa" for m in fused.modules() if hasattr(m, "attn_impl"))  # restored after export
    assert_matches_eager(fused, program_runner(program), [(64, 64)])


def _constructor(name):
    import json

    with open(os.path.join(os.path.dirname(fixture_path(name)), name + ".json")) as f:
        return json.load(f)["constructor"]


# --------------------------------------------------------------------------- ONNX, checked by onnxruntime

@pytest.mark.slow
@pytest.mark.parametrize("name,family", [(name, family) for family, name in FAMILY_FIXTURES.items()]
                         + [("swin_micro_ape_w8_64", "swin")])
def test_onnx_classifier_matches_eager(tmp_path, capsys, name, family):
    """Each family (and V1 with an absolute position embedding, resized in the graph) with a dynamic size; the tool's
    own check runs too, and onnxruntime is run here again on other images."""
    status, path = export_tool(tmp_path, name, family, "onnx", "--dynamic-size")
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count(" ok") == 4  # batch 1 and 3 at the configured size and another
    run = onnx_runner(path)
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("images", ["batch", 3, "height", "width"])]
    model = released_classifier(family) if name == FAMILY_FIXTURES[family] else _released(name, family)
    assert [o.shape for o in session.get_outputs()] == [["batch", model.num_classes]]
    assert_matches_eager(model, run, SIZES + ((128, 72),))


def _released(name, family):
    from config import load_config
    from models import build_model
    from models.state_dict import load_state_dict_checked

    model = build_model(load_config(None, fixture_opts(name, family))).eval()
    load_state_dict_checked(model, torch.load(fixture_path(name), weights_only=True)["model"])
    return model


@pytest.mark.slow
def test_onnx_backbone_gives_the_stage_maps(tmp_path):
    status, path = export_tool(tmp_path, FAMILY_FIXTURES["swinv2"], "swinv2", "onnx", "--features", "--no-check")
    assert status == 0
    backbone = released_classifier("swinv2").as_backbone()
    assert_matches_eager(backbone, onnx_runner(path), [(64, 64)])
    import onnxruntime

    outputs = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).get_outputs()
    assert [o.name for o in outputs] == ["stage0", "stage1", "stage2"]


@pytest.mark.slow
def test_exported_backbone_from_a_simmim_checkpoint(tmp_path, capsys):
    """--features takes a SimMIM pretraining checkpoint's encoder; the tool checks the .pt2 file it wrote."""
    status, path = export_tool(tmp_path, "swin_micro_w4_64", "swin", "exported", "--features", "--dynamic-size",
                               checkpoint=fixture_path("simmim_swin_micro_w4_64"))
    assert status == 0 and capsys.readouterr().out.count(" ok") == 4
    maps = torch.export.load(path).module()(torch.randn(2, 3, 80, 48))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 20, 12), (2, 32, 10, 6), (2, 64, 5, 3)]


# --------------------------------------------------------------------------- errors


def sharded_folder(tmp_path, with_released: bool) -> str:
    """A folder that checkpoint.is_sharded_checkpoint takes for a TRAIN.FSDP checkpoint."""
    folder = tmp_path / "ckpt_epoch_3"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    (folder / "state.pth").write_bytes(b"")
    if with_released:
        (folder / "model.pth").write_bytes(b"")
    return str(folder)


@pytest.mark.parametrize("case", ["sharded", "sharded-epoch-end", "simmim-checkpoint", "simmim-config",
                                  "other-architecture", "features-of-a-plain-model", "old-torch-dynamic-size",
                                  "onnx-missing"])
def test_what_cannot_be_exported_gives_one_line_and_status_2(tmp_path, capsys, monkeypatch, case):
    name, family, extra, overrides, checkpoint, fmt = FAMILY_FIXTURES["swin"], "swin", [], {}, None, "exported"
    if case.startswith("sharded"):
        checkpoint = sharded_folder(tmp_path, with_released=case == "sharded-epoch-end")
        expected = "sharded (FSDP) checkpoint folder"
    elif case == "simmim-checkpoint":
        checkpoint, expected = fixture_path("simmim_swin_micro_w4_64"), "SimMIM pretraining checkpoint"
    elif case == "simmim-config":
        overrides, expected = {"TRAIN.OBJECTIVE": "simmim"}, "SimMIM pretraining (TRAIN.OBJECTIVE simmim)"
    elif case == "other-architecture":
        checkpoint, expected = fixture_path("swinv2_micro_w4_64"), "does not fit this model"
    elif case == "features-of-a-plain-model":
        from models import build

        monkeypatch.setattr(build, "_builder", lambda config: lambda config: torch.nn.Linear(1, 1))
        extra, expected = ["--features"], "has no backbone API"
    elif case == "old-torch-dynamic-size":
        from torch.fx import experimental

        monkeypatch.setattr(experimental, "_config", types.SimpleNamespace())
        extra, expected = ["--dynamic-size"], "cannot export a dynamic image size"
    else:
        monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # as if it were not installed
        fmt, expected = "onnx", "pip install -r requirements.txt"
    status, out = export_tool(tmp_path, name, family, fmt, *extra, checkpoint=checkpoint, **overrides)
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err and "Traceback" not in err, err
    assert not os.path.exists(out)
    if case == "sharded-epoch-end":
        assert os.path.join(checkpoint, "model.pth") in err


def test_exported_needs_a_pt2_name(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", FAMILY_FIXTURES["swin"], "swin")
    with pytest.raises(SystemExit) as exit_info:
        load_tool("export").main(["--cfg", config, "--resume", fixture_path(FAMILY_FIXTURES["swin"]),
                                  "--format", "exported", "--out", str(tmp_path / "model.pt")])
    assert exit_info.value.code == 2 and "end the name in .pt2" in capsys.readouterr().err

"""SimMIM: the reference's losses on fixtures, masks, target normalisation, data, fine-tuning from it, the command
lines and exact resume."""
import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from checkpoint import load_pretrained
from config import ConfigError, load_config
from data import build_loader
from data.masking import MaskGenerator
from data.simmim import MAX_VAL_FROM_TRAIN
from models import build_model
from models.simmim import SimMIM, normalize_targets, simmim_to_encoder
from models.state_dict import load_state_dict_checked
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2
from objectives import ClassificationObjective, SimMIMObjective, build_objective
from tests.test_resilience import assert_same_training, console_tail, kill_when_logged, losses, run_to_end

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
DEMO = os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")
SIMMIM_CONFIGS = ["simmim_pretrain__swin_base__img192_window6__800ep.yaml",
                  "simmim_pretrain__swinv2_base__img192_window12__800ep.yaml",
                  "simmim_finetune__swin_base__img224_window7__800ep.yaml",
                  "simmim_finetune__swinv2_base__img224_window14__800ep.yaml"]
# A small model for the digits: 2 stages, stride 8, 8 px mask squares.
SMALL = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]",
         "DATA.NUM_WORKERS", "0", "DATA.MASK_PATCH_SIZE", "8", "DATA.PREPARE_DIGITS", "False"]


def fixture_model(name):
    """The fixture's SimMIM model with its weights, and its input, mask and reference loss."""
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        arguments = json.load(f)["constructor"]
    stride, norm_patch = arguments.pop("encoder_stride"), arguments.pop("norm_target_patch_size")
    family = SwinTransformerV2 if "swinv2" in name else SwinTransformer
    model = SimMIM(family(**arguments), norm_patch)
    assert model.encoder_stride == stride
    state_dict = torch.load(os.path.join(FIXTURES, f"{name}.pth"), weights_only=True)["model"]
    load_state_dict_checked(model, state_dict, source=name)  # strict: every key of the reference layout
    io = torch.load(os.path.join(FIXTURES, f"{name}_io.pt"), weights_only=True)
    return model.eval(), io, state_dict


@pytest.mark.parametrize("name", ["simmim_swin_micro_w4_64", "simmim_swinv2_micro_w4_64"])
def test_fixture_loss_matches_the_reference(name):
    model, io, _ = fixture_model(name)
    with torch.no_grad():
        loss = model(io["input"], io["mask"])
    assert abs(loss.item() - io["loss"].item()) < 1e-5


def test_build_model_gives_the_reference_layout():
    config = load_config(DEMO, opts=["TRAIN.OBJECTIVE", "simmim", "DATA.MASK_PATCH_SIZE", "8"])
    model = build_model(config)
    keys = set(model.state_dict())
    assert "encoder.mask_token" in keys and {"decoder.0.weight", "decoder.0.bias"} <= keys
    assert all(k.startswith(("encoder.", "decoder.")) for k in keys)
    assert not any(k.startswith("encoder.head") for k in keys)
    assert "encoder.mask_token" in model.no_weight_decay()
    images, mask = torch.randn(2, 3, 32, 32), MaskGenerator(32, 8, 4, 0.6)()[None].repeat(2, 1, 1)
    loss = model(images, mask)
    loss.backward()
    assert loss.ndim == 0 and all(p.grad is not None for p in model.parameters())


def test_mask_generator_masks_exactly_the_rounded_up_count_of_squares():
    generator = MaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    torch.manual_seed(0)
    masks = [generator() for _ in range(20)]
    for mask in masks:
        assert mask.shape == (48, 48)
        squares = mask[::8, ::8]
        assert int(squares.sum()) == math.ceil(36 * 0.6) == 22
        # constant over each 8 x 8 block of patches (one 32 px square)
        assert torch.equal(squares.repeat_interleave(8, 0).repeat_interleave(8, 1), mask)
    assert len({tuple(m[::8, ::8].flatten().tolist()) for m in masks}) > 1
    torch.manual_seed(0)
    assert torch.equal(generator(), masks[0])  # drawn from the seeded stream only


def test_target_normalisation_is_the_local_unbiased_standardisation():
    torch.manual_seed(0)
    images = torch.randn(1, 2, 9, 11)
    out = normalize_targets(images, 5)
    for y, x in [(0, 0), (4, 5), (8, 10), (2, 9)]:
        window = images[0, :, max(0, y - 2):y + 3, max(0, x - 2):x + 3].reshape(2, -1)
        expected = (images[0, :, y, x] - window.mean(1)) / (window.var(1, unbiased=True) + 1e-6).sqrt()
        torch.testing.assert_close(out[0, :, y, x], expected, atol=1e-5, rtol=1e-5)


def test_config_checks_and_reference_files_load():
    for name in SIMMIM_CONFIGS:
        config = load_config(os.path.join(REPO, "configs", "simmim", name))
        assert config.MODEL.TYPE in ("swin", "swinv2")
    pretrain = load_config(os.path.join(REPO, "configs", "simmim", SIMMIM_CONFIGS[1]),
                           opts=["TRAIN.OBJECTIVE", "simmim"])
    assert pretrain.MODEL.SIMMIM.NORM_TARGET.ENABLE and pretrain.DATA.MASK_PATCH_SIZE == 32
    assert load_config(os.path.join(REPO, "configs", "simmim", SIMMIM_CONFIGS[3])).TRAIN.LAYER_DECAY == 0.75
    for opts, message in [(["TRAIN.OBJECTIVE", "mim"], "TRAIN.OBJECTIVE must be one of"),
                          (["TRAIN.OBJECTIVE", "simmim"], "DATA.MASK_PATCH_SIZE 32 must divide DATA.IMG_SIZE 48"),
                          (["TRAIN.OBJECTIVE", "simmim", "DATA.MASK_PATCH_SIZE", "16", "DATA.MASK_RATIO", "1.0"],
                           "DATA.MASK_RATIO"),
                          (["TRAIN.OBJECTIVE", "simmim", "DATA.MASK_PATCH_SIZE", "16",
                            "MODEL.SIMMIM.NORM_TARGET.ENABLE", "True", "MODEL.SIMMIM.NORM_TARGET.PATCH_SIZE", "8"],
                           "odd")]:
        with pytest.raises(ConfigError, match=message):
            load_config(DEMO, opts=["DATA.IMG_SIZE", "48"] + opts)


def test_objective_is_chosen_by_the_config():
    assert isinstance(build_objective(load_config(DEMO)), ClassificationObjective)
    assert isinstance(build_objective(load_config(DEMO, opts=["TRAIN.OBJECTIVE", "simmim", "DATA.MASK_PATCH_SIZE",
                                                              "8"])), SimMIMObjective)


def finetune_config(name, tmp_path, opts=()):
    """A classifier config for fine-tuning the fixture's encoder (window 4 -> 8 for V1, as 6 -> 7 in the reference)."""
    with open(os.path.join(FIXTURES, f"{name}.json")) as f:
        arguments = json.load(f)["constructor"]
    section = "SWINV2" if "swinv2" in name else "SWIN"
    return load_config(None, opts=[
        "MODEL.TYPE", "swinv2" if section == "SWINV2" else "swin", "DATA.IMG_SIZE", "64", "MODEL.NUM_CLASSES", "7",
        f"MODEL.{section}.EMBED_DIM", str(arguments["embed_dim"]), f"MODEL.{section}.DEPTHS", str(arguments["depths"]),
        f"MODEL.{section}.NUM_HEADS", str(arguments["num_heads"]), f"MODEL.{section}.WINDOW_SIZE", "8",
        "OUTPUT", str(tmp_path)] + list(opts))


def test_finetuning_from_a_v1_simmim_checkpoint_takes_the_encoder(tmp_path, caplog):
    _, _, state_dict = fixture_model("simmim_swin_micro_w4_64")
    path = tmp_path / "simmim.pth"
    torch.save({"model": state_dict}, path)
    config = finetune_config("simmim_swin_micro_w4_64", tmp_path, ["MODEL.PRETRAINED", str(path)])
    model = build_model(config)
    with caplog.at_level("INFO"):
        load_pretrained(config, model)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrained weights")][0]
    assert "SimMIM pretraining checkpoint" in summary and "decoder.0.weight" in summary
    assert "encoder.mask_token" in summary and "new head initialised to zeros" in summary
    own = model.state_dict()
    torch.testing.assert_close(own["patch_embed.proj.weight"], state_dict["encoder.patch_embed.proj.weight"])
    assert own["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (15 ** 2, 2)  # 7x7 -> 15x15 table
    assert not own["head.weight"].any() and not own["head.bias"].any()


def test_finetuning_from_a_v2_simmim_checkpoint_keeps_the_position_mlp_and_renames_rpe_mlp(tmp_path):
    _, _, state_dict = fixture_model("simmim_swinv2_micro_w4_64")
    old_names = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in state_dict.items()}  # an older file
    path = tmp_path / "simmim_v2.pth"
    torch.save({"model": old_names}, path)
    config = finetune_config("simmim_swinv2_micro_w4_64", tmp_path,
                             ["MODEL.PRETRAINED", str(path), "MODEL.SWINV2.PRETRAINED_WINDOW_SIZES", "[4, 4, 4]"])
    model = build_model(config)
    load_pretrained(config, model)
    key = "layers.1.blocks.0.attn.cpb_mlp.0.weight"
    torch.testing.assert_close(model.state_dict()[key], state_dict["encoder." + key])
    encoder, dropped = simmim_to_encoder(old_names)
    assert key in encoder and sorted(dropped) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]


def test_layer_decay_groups_for_the_v2_finetuning_config():
    from optimizer import parameter_groups, model_depths

    config = load_config(os.path.join(REPO, "configs", "simmim", SIMMIM_CONFIGS[3]),
                         opts=["MODEL.SWINV2.DEPTHS", "[2, 2, 2, 2]", "MODEL.SWINV2.EMBED_DIM", "32"])
    model = build_model(config)
    groups = parameter_groups(model, 0.05, config.TRAIN.LAYER_DECAY, model_depths(model))
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert len(scales) == 10 and scales[-1] == 1.0 and math.isclose(scales[0], 0.75 ** 9, rel_tol=1e-5)


def write_images(folder, count, size=32):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size + i % 3, size), (i * 7 % 255, 40, 90)).save(os.path.join(folder, f"img{i}.png"))


def simmim_data_config(data_path, opts=()):
    return load_config(DEMO, opts=["TRAIN.OBJECTIVE", "simmim", "DATA.DATA_PATH", str(data_path), "DATA.BATCH_SIZE",
                                   "4"] + SMALL + list(opts))


def test_pretraining_reads_a_flat_folder_without_labels(tmp_path):
    write_images(tmp_path / "flat", 10)
    loaders = build_loader(simmim_data_config(tmp_path / "flat"))
    assert len(loaders.train_dataset) == 10 and len(loaders.val_dataset) == min(10, MAX_VAL_FROM_TRAIN)
    (images, masks), labels = next(iter(loaders.train_loader))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 8, 8)
    assert (masks[:, ::2, ::2].flatten(1).sum(1) == math.ceil(16 * 0.6)).all()
    # validation masks are the same in every pass
    first = [m for (_, m), _ in loaders.val_loader]
    second = [m for (_, m), _ in loaders.val_loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_pretraining_reads_class_folders_and_zip(digits_root):
    for opts in ([], ["DATA.ZIP_MODE", "True"]):
        loaders = build_loader(simmim_data_config(digits_root, ["MODEL.NUM_CLASSES", "3"] + opts))  # labels unused
        assert (len(loaders.train_dataset), len(loaders.val_dataset)) == (1497, 300)
        (images, masks), _ = next(iter(loaders.train_loader))
        assert images.shape == (4, 3, 32, 32)


def test_training_masks_are_seeded_per_sample(digits_root):
    config = simmim_data_config(digits_root)
    runs = []
    for _ in range(2):
        loaders = build_loader(config)
        loaders.train_sampler.set_epoch(3)
        runs.append(next(iter(loaders.train_loader))[0][1])
    assert torch.equal(runs[0], runs[1])
    assert not all(torch.equal(runs[0][0], m) for m in runs[0][1:])


def test_visualisation_writes_a_grid(digits_root, tmp_path):
    from tools.simmim_visualize import save_reconstruction_grid

    config = simmim_data_config(digits_root)
    model = build_model(config)
    loaders = build_loader(config, eval_only=True)
    path = save_reconstruction_grid(model, loaders.val_dataset, tmp_path / "grid.png", count=3)
    with Image.open(path) as grid:
        assert grid.size[0] >= 3 * 32 and grid.size[1] >= 3 * 32


def test_visualisation_shows_images_spread_over_the_dataset(digits_root, tmp_path):
    """The validation digits are stored class by class: the grid's 8 images must not all be zeros."""
    from tools.simmim_visualize import save_reconstruction_grid

    config = simmim_data_config(digits_root)
    val = build_loader(config, eval_only=True).val_dataset
    shown = []

    class Recording:
        def __len__(self):
            return len(val)

        def __getitem__(self, item):
            shown.append(item[0])
            return val[item]

    save_reconstruction_grid(build_model(config), Recording(), tmp_path / "grid.png", count=8)
    folders = {os.path.basename(os.path.dirname(val.image_path(index))) for index in shown}  # the digit
    assert len(shown) == 8 and len(folders) == 8, (shown, folders)


def cli(script, args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(REPO, script)] + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_reference_command_lines_pretrain_then_finetune_on_a_small_folder(tmp_path):
    """The reference's command lines with its V1 SimMIM files, shrunk by --opts, on a flat folder of images."""
    write_images(tmp_path / "images", 12, size=64)
    shrink = ["DATA.IMG_SIZE", "64", "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]",
              "MODEL.SWIN.NUM_HEADS", "[2, 4]", "DATA.NUM_WORKERS", "0", "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS",
              "1", "PRINT_FREQ", "1"]
    pretrain = cli("main_simmim_pt.py", [
        "--cfg", os.path.join(REPO, "configs", "simmim", SIMMIM_CONFIGS[0]), "--data-path", "images",
        "--batch-size", "4", "--output", "out", "--opts", "DATA.MASK_PATCH_SIZE", "16",
        "TRAIN.LR_SCHEDULER.MULTISTEPS", "[1]", "TRAIN.WARMUP_EPOCHS", "1"] + shrink, tmp_path)
    assert pretrain.returncode == 0, pretrain.stdout[-3000:] + pretrain.stderr[-3000:]
    run_dir = tmp_path / "out" / "simmim_pretrain" / "simmim_pretrain__swin_base__img192_window6__800ep"
    assert "Reconstruction loss" in pretrain.stdout and (run_dir / "ckpt_epoch_1.pth").exists()
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2 and records[-1]["best_loss"] == min(r["val_loss"] for r in records)
    # class folders for fine-tuning: two classes of the same images
    for label in ("a", "b"):
        for split in ("train", "val"):
            write_images(tmp_path / "labelled" / split / label, 6, size=64)
    finetune = cli("main_simmim_ft.py", [
        "--cfg", os.path.join(REPO, "configs", "simmim", SIMMIM_CONFIGS[2]), "--data-path", "labelled",
        "--batch-size", "4", "--output", "out", "--pretrained", str(run_dir / "ckpt_epoch_1.pth"), "--opts",
        "MODEL.NUM_CLASSES", "2", "MODEL.SWIN.WINDOW_SIZE", "8", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"] + shrink,
        tmp_path)
    assert finetune.returncode == 0, finetune.stdout[-3000:] + finetune.stderr[-3000:]
    assert "SimMIM pretraining checkpoint: its encoder taken" in finetune.stdout
    assert "Acc@1" in finetune.stdout


@pytest.mark.slow
def test_pretraining_resumes_exactly_after_a_kill(digits_root, tmp_path):
    run = os.path.join("swin_micro_digits", "default")

    def command(output):
        return [sys.executable, "main_simmim_pt.py", "--cfg", DEMO, "--data-path", digits_root, "--output",
                str(output), "--opts"] + SMALL + ["DATA.NUM_WORKERS", "2", "PRINT_FREQ", "1", "TRAIN.SAVE_ITERS", "1",
                                                  "TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1"]

    run_to_end(command(tmp_path / "straight"))
    step = random.Random().randint(3, 40)
    resumed_dir = tmp_path / "killed" / run
    process = kill_when_logged(command(tmp_path / "killed"), resumed_dir / "log_rank0.txt", step)
    assert process.wait(timeout=60) == -signal.SIGKILL, console_tail(process)
    # No wait: the run lock is a POSIX record lock, which the killed run's loader workers do not inherit.
    result = run_to_end(command(tmp_path / "killed"))
    assert "continuing at epoch" in result.stdout
    assert len(losses(resumed_dir / "log_rank0.txt")) == 2 * 23
    assert_same_training(tmp_path / "straight" / run, resumed_dir)


def test_throughput_measures_the_simmim_step(tmp_path):
    import main_simmim_pt

    status = main_simmim_pt.cli(["--cfg", DEMO, "--throughput", "--batch-size", "2", "--output", str(tmp_path),
                                 "--opts", "DATA.MASK_PATCH_SIZE", "8"] + SMALL[:6])
    assert status == 0
    with open(tmp_path / "swin_micro_digits" / "default" / "throughput.json") as f:
        assert json.load(f)["train_images_per_second"] > 0


def test_main_simmim_pt_puts_the_objective_ahead_of_user_overrides():
    from main_simmim_pt import simmim_argv

    assert simmim_argv(["--cfg", "x"]) == ["--cfg", "x", "--opts", "TRAIN.OBJECTIVE", "simmim"]
    assert simmim_argv(["--opts", "A", "1", "--tag", "t"]) == ["--opts", "TRAIN.OBJECTIVE", "simmim", "A", "1",
                                                               "--tag", "t"]


def test_simmim_pretraining_starts_from_a_classifier_checkpoint_as_its_encoder(tmp_path, caplog):
    """A classifier's weights are SimMIM's encoder without the ``encoder.`` prefix: taken as such, its head dropped,
    the mask token and the decoder as the model initialised them."""
    import logging

    from checkpoint import load_pretrained

    classifier = build_model(load_config(os.path.join(REPO, "configs", "demo", "swin_micro_digits.yaml")))
    torch.save({"model": classifier.state_dict()}, tmp_path / "classifier.pth")
    config = load_config(os.path.join(REPO, "configs", "demo", "simmim_pretrain_swin_micro_digits.yaml"),
                         opts=["MODEL.PRETRAINED", str(tmp_path / "classifier.pth")])
    model = build_model(config)
    decoder = model.decoder[0].weight.clone()
    with caplog.at_level(logging.INFO):
        load_pretrained(config, model)
    for name, value in classifier.state_dict().items():
        if not name.startswith("head.") and name in dict(model.encoder.named_parameters()):
            assert torch.equal(dict(model.encoder.named_parameters())[name], value), name
    assert torch.equal(model.decoder[0].weight, decoder)
    assert ("classifier checkpoint: its weights taken as the SimMIM encoder (prefix encoder. added); 90 tensors "
            "loaded; new, as initialised: encoder.mask_token, decoder.0.weight, decoder.0.bias; dropped (no head in "
            "SimMIM): head.weight, head.bias") in caplog.text

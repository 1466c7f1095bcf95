"""Optimizer groups, schedules, accumulation, validation counts and checkpoint files, without a dataset."""
import copy
import math

import pytest
import torch
from torch import nn

import config as cfg_lib
from engine import EpochState, Precision, TrainParts, train_one_epoch, validate
from lr_scheduler import build_scheduler
from models import SwinTransformer
from optimizer import build_optimizer, parameter_groups, swin_layer_id
from checkpoint import (CheckpointError, atomic_torch_save, find_resumable, load_checkpoint_file, read_manifest,
                        save_checkpoint)
from utils import get_rng_state, set_rng_state

CPU = torch.device("cpu")


def tiny_model(**kwargs) -> SwinTransformer:
    args = dict(img_size=16, patch_size=2, embed_dim=8, depths=(2, 2), num_heads=(2, 2), window_size=4,
                num_classes=3, drop_path_rate=0.0, ape=True)
    args.update(kwargs)
    return SwinTransformer(**args)


def schedule(opts, updates_per_epoch=10):
    config = cfg_lib.load_config(None, opts=["DATA.BATCH_SIZE", "512"] + opts)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    return build_scheduler(config, optimizer, updates_per_epoch), optimizer


def lr_at(scheduler, optimizer, update):
    scheduler.step_update(update)
    return optimizer.param_groups[0]["lr"]


def test_cosine_with_warmup_prefix():
    sched, opt = schedule(["TRAIN.EPOCHS", "10", "TRAIN.WARMUP_EPOCHS", "2", "TRAIN.BASE_LR", "1e-3",
                           "TRAIN.WARMUP_LR", "1e-6", "TRAIN.MIN_LR", "1e-5"])
    assert lr_at(sched, opt, 0) == pytest.approx(1e-6)
    assert lr_at(sched, opt, 10) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 10 / 20)  # half-way through warmup
    assert lr_at(sched, opt, 20) == pytest.approx(1e-3)  # decay starts after the warmup
    assert lr_at(sched, opt, 60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way through the cosine
    assert lr_at(sched, opt, 100) == pytest.approx(1e-5)


def test_linear_step_and_multistep():
    base = ["TRAIN.EPOCHS", "10", "TRAIN.WARMUP_EPOCHS", "0", "TRAIN.BASE_LR", "1e-3"]
    sched, opt = schedule(base + ["TRAIN.LR_SCHEDULER.NAME", "linear"])
    assert lr_at(sched, opt, 50) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    sched, opt = schedule(base + ["TRAIN.LR_SCHEDULER.NAME", "step", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "3"])
    assert lr_at(sched, opt, 29) == pytest.approx(1e-3) and lr_at(sched, opt, 30) == pytest.approx(1e-4)
    sched, opt = schedule(base + ["TRAIN.LR_SCHEDULER.NAME", "multistep", "TRAIN.LR_SCHEDULER.MULTISTEPS", "[2, 5]"])
    assert [lr_at(sched, opt, u) for u in (19, 20, 50)] == pytest.approx([1e-3, 1e-4, 1e-5])


def test_unknown_scheduler_and_optimizer_list_valid_names():
    # The config refuses both at load time (tests/test_validation.py); the builders say the same for a
    # config that did not go through it.
    with pytest.raises(ValueError, match="cosine, linear, step, multistep"):
        schedule(["TRAIN.LR_SCHEDULER.NAME", "onecycle"])
    config = cfg_lib.get_defaults()
    config.TRAIN.OPTIMIZER.NAME = "lamb"
    with pytest.raises(ValueError, match="adamw, sgd"):
        build_optimizer(config, tiny_model(), CPU)


def test_weight_decay_exemptions():
    groups = parameter_groups(tiny_model(), weight_decay=0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert "absolute_pos_embed" in no_decay
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in no_decay
    assert "layers.0.blocks.0.attn.qkv.bias" in no_decay and "norm.weight" in no_decay
    assert "layers.0.blocks.0.attn.qkv.weight" in decay and "head.weight" in decay


def test_layer_decay_scales_learning_rates_by_depth():
    depths = (2, 2)
    assert swin_layer_id("patch_embed.proj.weight", depths) == 0
    assert swin_layer_id("layers.1.blocks.0.mlp.fc1.weight", depths) == 3
    assert swin_layer_id("layers.0.downsample.reduction.weight", depths) == 2
    assert swin_layer_id("head.weight", depths) == 5
    groups = parameter_groups(tiny_model(), 0.05, layer_decay=0.5, depths=depths)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0
    assert scale["patch_embed.proj.weight"] == 0.5 ** 5


class ListLoader(list):
    """A fixed list of batches that behaves like a DataLoader for the loop."""


def run_epoch(model, batches, accumulation_steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = cfg_lib.load_config(None, opts=["TRAIN.WARMUP_EPOCHS", "0", "DATA.BATCH_SIZE", "512"])
    parts = TrainParts(model=model, criterion=nn.CrossEntropyLoss(), optimizer=optimizer,
                       lr_scheduler=build_scheduler(config, optimizer, 1), accumulation_steps=accumulation_steps)
    state = EpochState(epoch=0, updates_per_epoch=math.ceil(len(batches) / accumulation_steps))
    train_one_epoch(parts, ListLoader(batches), state, CPU, Precision(False), print_freq=100,
                    num_batches=len(batches))
    return state


def test_accumulating_two_half_batches_equals_one_full_batch():
    torch.manual_seed(0)
    model = tiny_model()
    images, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    full, accumulated = copy.deepcopy(model), copy.deepcopy(model)
    run_epoch(full, [(images, targets)], accumulation_steps=1)
    state = run_epoch(accumulated, [(images[:4], targets[:4]), (images[4:], targets[4:])], accumulation_steps=2)
    assert state.update == 1
    for (name, a), (_, b) in zip(full.named_parameters(), accumulated.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_partial_accumulation_at_epoch_end_is_applied():
    torch.manual_seed(0)
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2,))) for _ in range(3)]
    state = run_epoch(model, batches, accumulation_steps=2)
    assert state.update == 2  # one full group of 2, then the leftover batch as its own update
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_validate_counts_every_image_once():
    model = nn.Linear(4, 5)
    images = torch.randn(7, 4)
    targets = model(images).argmax(1)
    targets[0] = (targets[0] + 1) % 5  # one wrong at top-1
    loader = [(images[:4], targets[:4]), (images[4:], targets[4:])]
    metrics = validate(model, loader, CPU, Precision(False), expected_total=7)
    assert metrics["count"] == 7 and metrics["acc1"] == pytest.approx(100 * 6 / 7)
    with pytest.raises(RuntimeError, match="evaluated 7 images but the validation set has 8"):
        validate(model, loader, CPU, Precision(False), expected_total=8)


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    state = get_rng_state()
    atomic_torch_save({"rng": [state]}, str(tmp_path / "rng.pth"))
    expected = (torch.rand(3), __import__("numpy").random.rand(2), __import__("random").random())
    set_rng_state(load_checkpoint_file(str(tmp_path / "rng.pth"))["rng"][0])
    again = (torch.rand(3), __import__("numpy").random.rand(2), __import__("random").random())
    torch.testing.assert_close(expected[0], again[0])
    assert list(expected[1]) == list(again[1]) and expected[2] == again[2]


def test_checkpoint_retention_and_fallback_past_a_truncated_file(tmp_path):
    out = str(tmp_path)
    for epoch in range(4):
        save_checkpoint({"epoch": epoch}, out, epoch, 0, True, keep=2)
    assert [e["file"] for e in read_manifest(out)] == ["ckpt_epoch_2.pth", "ckpt_epoch_3.pth"]
    assert not (tmp_path / "ckpt_epoch_0.pth").exists()
    newest = tmp_path / "ckpt_epoch_3.pth"
    newest.write_bytes(newest.read_bytes()[:40])
    assert find_resumable(out)[1]["epoch"] == 2


def test_code_carrying_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_checkpoint_file(str(path))

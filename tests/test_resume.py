"""Resuming under a changed config: the schedule, the position in images, refused changes, finished runs and the
formats ``--resume`` takes."""
import os
import re
import shutil

import pytest
import torch

import config as cfg_lib
import main as driver
from checkpoint import load_checkpoint_file, position_in_images
from data.samplers import DistributedTrainSampler
from lr_scheduler import build_scheduler
from models import build_model
from models.state_dict import ours_to_timm
from optimizer import build_optimizer
from tests.test_resilience import DEMO, RUN, snapshot

# The small model of the resilience tests; one progress line per update, checkpoints at epoch ends only.
SMALL = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]",
         "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1", "TRAIN.WARMUP_EPOCHS", "1", "AMP_ENABLE", "False"]
PROGRESS = re.compile(r"Train: \[(\d+)\]\[(\d+)/\d+\] eta \S+ lr (\S+) ")


def argv(digits_root, output, opts=(), flags=()):
    return ["--cfg", DEMO, "--data-path", digits_root, "--output", str(output), *flags, "--opts", *SMALL, *opts]


def read_log(output):
    with open(os.path.join(output, RUN, "log_rank0.txt")) as f:
        return f.read()


def logged_lrs(log):
    """(epoch, update in epoch) -> lr logged after that update; the later line wins."""
    return {(int(m.group(1)), int(m.group(2))): float(m.group(3)) for m in PROGRESS.finditer(log)}


def fresh_schedule_lr(digits_root, opts, updates_per_epoch, update):
    """The lr a fresh run of this config has after ``update`` updates (first parameter group)."""
    config = cfg_lib.load_config(DEMO, opts=["DATA.DATA_PATH", digits_root] + SMALL + list(opts))
    optimizer = build_optimizer(config, build_model(config), torch.device("cpu"))
    scheduler = build_scheduler(config, optimizer, updates_per_epoch)
    scheduler.step_update(update)
    return optimizer.param_groups[0]["lr"]


@pytest.fixture(scope="module")
def two_epochs(digits_root, tmp_path_factory):
    """A finished run of 2 epochs (TRAIN.EPOCHS 2) with a mid-epoch checkpoint every 8 updates."""
    output = tmp_path_factory.mktemp("two_epochs")
    assert driver.cli(argv(digits_root, output, ["TRAIN.EPOCHS", "2", "TRAIN.SAVE_ITERS", "8",
                                                 "TRAIN.KEEP_CHECKPOINTS", "10"])) == 0
    return output


@pytest.fixture
def run_copy(two_epochs, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(two_epochs, output)
    return output


def updates_per_epoch(log):
    return int(re.search(r"\((\d+) updates per epoch\)", log).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["TRAIN.BASE_LR", "4e-3"]], ids=["longer", "longer_and_lower_lr"])
def test_resumed_longer_run_follows_a_fresh_schedule_of_the_new_config(digits_root, run_copy, extra):
    opts = ["TRAIN.EPOCHS", "4", "TRAIN.SAVE_ITERS", "8", "TRAIN.KEEP_CHECKPOINTS", "10"] + extra
    assert driver.cli(argv(digits_root, run_copy, opts)) == 0
    log = read_log(run_copy)
    assert re.search(r"config changes since the checkpoint: .*TRAIN\.EPOCHS 2 -> 4", log), log[-3000:]
    per_epoch = updates_per_epoch(log)
    lrs = logged_lrs(log)
    resumed = {key: lr for key, lr in lrs.items() if key[0] >= 2}
    assert len(resumed) == 2 * per_epoch
    for (epoch, update), lr in resumed.items():
        expected = fresh_schedule_lr(digits_root, opts, per_epoch, epoch * per_epoch + update)
        assert lr == pytest.approx(expected, rel=1e-5), (epoch, update)
    # The first update after the resume already ran at the new schedule's learning rate.
    first = float(re.search(r"continuing at epoch 2, update 0 .*learning rate (\S+)", log).group(1))
    assert first == pytest.approx(fresh_schedule_lr(digits_root, opts, per_epoch, 2 * per_epoch), rel=1e-5)
    if extra:  # a lowered BASE_LR (a quarter) takes effect from the first update after the resume
        unchanged = fresh_schedule_lr(digits_root, ["TRAIN.EPOCHS", "4"], per_epoch, 2 * per_epoch)
        assert first < 0.5 * unchanged


def keep_only_checkpoint(run_dir, name):
    """Makes ``name`` the newest valid checkpoint of a run, as if the run had stopped right after writing it."""
    import json

    manifest_path = os.path.join(run_dir, "checkpoints.json")
    with open(manifest_path) as f:
        entries = json.load(f)["checkpoints"]
    keep = entries[:[e["file"] for e in entries].index(name) + 1]
    for entry in entries[len(keep):]:
        os.remove(os.path.join(run_dir, entry["file"]))
    with open(manifest_path, "w") as f:
        json.dump({"checkpoints": keep}, f)


@pytest.mark.slow
def test_changed_batch_size_continues_after_the_images_already_trained(digits_root, run_copy):
    run_dir = os.path.join(run_copy, RUN)
    keep_only_checkpoint(run_dir, "ckpt_epoch_0_step_8.pth")
    assert load_checkpoint_file(os.path.join(run_dir, "ckpt_epoch_0_step_8.pth"))["images"] == 8 * 64
    assert driver.cli(argv(digits_root, run_copy, ["TRAIN.EPOCHS", "1"], ["--batch-size", "32"])) == 0
    log = read_log(run_copy).split("resumed weights from")[-1]
    # 8 updates of 64 images are 16 updates of 32: the epoch goes on at update 16 of 46.
    assert "continuing at epoch 0, update 16 (512 images of the epoch done" in log
    assert sorted(u for e, u in logged_lrs(log)) == list(range(17, 1497 // 32 + 1))


@pytest.mark.slow
def test_batch_size_that_splits_an_update_repeats_the_partial_update_with_a_warning(digits_root, run_copy):
    run_dir = os.path.join(run_copy, RUN)
    keep_only_checkpoint(run_dir, "ckpt_epoch_0_step_8.pth")
    assert driver.cli(argv(digits_root, run_copy, ["TRAIN.EPOCHS", "1"], ["--batch-size", "48"])) == 0
    log = read_log(run_copy).split("resumed weights from")[-1]
    assert "512 images of epoch 0 were done, which is not a whole number of updates of 48 images" in log
    assert "continuing at epoch 0, update 10 (480 images of the epoch done" in log


@pytest.mark.parametrize("old_world,new_world,batch,accum", [(1, 2, 16, 1), (2, 1, 16, 1), (4, 3, 8, 1),
                                                             (2, 4, 8, 2), (3, 2, 5, 1)])
def test_changed_world_size_resumes_at_the_same_images(old_world, new_world, batch, accum):
    """The samplers of the old and the new world size, skipped to the mapped position, leave exactly the images
    that the old run had not trained on (up to the whole updates the warning reports)."""
    size, seed, epoch, updates_done = 1000, 7, 3, 5
    old = [DistributedTrainSampler(size, r, old_world, seed) for r in range(old_world)]
    images = updates_done * accum * batch * old_world
    done = set()
    for sampler in old:
        sampler.set_epoch(epoch)
        done.update(list(sampler)[:images // old_world])
    batches_per_epoch = (size // new_world) // batch  # a lower bound of what the loader gives; enough here
    updates, kept = position_in_images(images, batch, accum, new_world, batches_per_epoch)
    assert kept <= images and images - kept < batch * accum * new_world
    remaining, skipped = [], set()
    for rank in range(new_world):
        sampler = DistributedTrainSampler(size, rank, new_world, seed)
        sampler.set_epoch(epoch)
        skipped.update(sampler.epoch_indices(epoch)[:updates * accum * batch])
        sampler.skip(updates * accum * batch)
        remaining += list(sampler)
    if kept == images:
        assert skipped == done
        assert set(remaining) == set(range(size)) - done
    else:
        assert skipped < done


def test_architecture_change_on_auto_resume_names_the_key_the_checkpoint_and_the_fixes(digits_root, run_copy,
                                                                                       capsys):
    before = snapshot(run_copy)
    assert driver.cli(argv(digits_root, run_copy, ["TRAIN.EPOCHS", "3", "MODEL.SWIN.DEPTHS", "[2, 4]"])) == 2
    error = capsys.readouterr().err
    assert re.search(r"cannot resume from \S+ckpt_epoch_1.pth: MODEL.SWIN.DEPTHS is \[2, 4\] but the checkpoint "
                     r"was trained with \[2, 2\]", error), error
    assert "--tag" in error and "TRAIN.AUTO_RESUME False" in error and "Traceback" not in error
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("opts,key", [(["TRAIN.LAYER_DECAY", "0.9"], "TRAIN.LAYER_DECAY"),
                                      (["TRAIN.OPTIMIZER.NAME", "sgd"], "TRAIN.OPTIMIZER.NAME")])
def test_optimizer_change_that_cannot_be_honoured_stops_naming_the_key(digits_root, run_copy, capsys, opts, key):
    before = snapshot(run_copy)
    assert driver.cli(argv(digits_root, run_copy, ["TRAIN.EPOCHS", "3"] + opts)) == 2
    error = capsys.readouterr().err
    assert f"cannot resume from" in error and f"{key} is" in error and "--tag" in error, error
    assert snapshot(run_copy) == before


def test_finished_run_does_nothing_and_leaves_config_yaml_alone(digits_root, run_copy, capsys):
    before = snapshot(run_copy)
    assert driver.cli(argv(digits_root, run_copy, ["TRAIN.EPOCHS", "2", "PRINT_FREQ", "3"])) == 0
    log = read_log(run_copy)
    assert re.search(r"already finished at epoch 2 \(checkpoint \S+ckpt_epoch_1.pth\); nothing to do", log)
    assert "training from epoch" not in log.split("already finished")[-1]
    assert snapshot(run_copy) == before


def eval_acc(output):
    import json

    with open(os.path.join(output, RUN, "eval.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("layout", ["plain", "timm", "folder"])
def test_eval_resume_takes_what_pretrained_takes(digits_root, two_epochs, tmp_path, layout):
    run_dir = os.path.join(two_epochs, RUN)
    weights = load_checkpoint_file(os.path.join(run_dir, "ckpt_epoch_1.pth"))["model"]
    source = {"plain": tmp_path / "plain.pth", "timm": tmp_path / "timm.pth", "folder": run_dir}[layout]
    if layout != "folder":
        torch.save(ours_to_timm(weights) if layout == "timm" else weights, source)
    assert driver.cli(argv(digits_root, tmp_path / "eval", flags=["--eval", "--resume", str(source)])) == 0
    log = read_log(tmp_path / "eval")
    assert "starting from scratch" not in log and "randomly initialised" not in log
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = [line for line in f][-1]
    assert f'"val_acc1": {eval_acc(tmp_path / "eval")["acc1"]}' in last
    if layout == "folder":
        assert f"taking its newest valid checkpoint, {os.path.join(run_dir, 'ckpt_epoch_1.pth')}" in log


def test_training_resume_from_a_plain_state_dict(digits_root, two_epochs, tmp_path):
    weights = load_checkpoint_file(os.path.join(two_epochs, RUN, "ckpt_epoch_1.pth"))["model"]
    torch.save(weights, tmp_path / "plain.pth")
    assert driver.cli(argv(digits_root, tmp_path / "out", ["TRAIN.EPOCHS", "1", "TRAIN.SAVE_ITERS", "0"],
                           ["--resume", str(tmp_path / "plain.pth")])) == 0
    assert "holds weights only: training starts at epoch 0" in read_log(tmp_path / "out")


def test_eval_with_pretrained_does_not_claim_to_start_from_scratch(digits_root, two_epochs, tmp_path):
    source = os.path.join(two_epochs, RUN, "ckpt_epoch_1.pth")
    assert driver.cli(argv(digits_root, tmp_path / "eval", flags=["--eval", "--pretrained", source])) == 0
    log = read_log(tmp_path / "eval")
    assert "starting from scratch" not in log
    assert f"evaluating pretrained weights {source}" in log


def test_eval_with_pretrained_in_a_folder_with_checkpoints_evaluates_the_pretrained_weights(digits_root, run_copy):
    """The folder's newest checkpoint is epoch 1; --pretrained names epoch 0's: epoch 0's figures come out."""
    source = os.path.join(run_copy, RUN, "ckpt_epoch_0.pth")
    assert driver.cli(argv(digits_root, run_copy, flags=["--eval", "--pretrained", source])) == 0
    import json

    with open(os.path.join(run_copy, RUN, "metrics.jsonl")) as f:
        epoch_0, epoch_1 = [json.loads(line) for line in f][:2]
    assert epoch_0["val_loss"] != epoch_1["val_loss"]
    assert eval_acc(run_copy)["loss"] == epoch_0["val_loss"]
    assert f"evaluating pretrained weights {source}" in read_log(run_copy).split("output folder")[-1]


def test_eval_resume_at_another_image_size_names_the_image_size_and_the_windows(digits_root, two_epochs, tmp_path,
                                                                              capsys):
    source = os.path.join(two_epochs, RUN, "ckpt_epoch_1.pth")
    assert driver.cli(argv(digits_root, tmp_path, ["DATA.IMG_SIZE", "16"], ["--eval", "--resume", source])) == 2
    error = capsys.readouterr().err
    assert (f"cannot load {source} at DATA.IMG_SIZE 16: it was trained at DATA.IMG_SIZE 32, and the window of each "
            "stage is clipped to the stage's map when that is smaller (windows per stage: [4, 4] at 32 px, [4, 2] at "
            "16 px)") in error, error
    assert "--opts DATA.IMG_SIZE 32" in error and "NUM_CLASSES" not in error


@pytest.mark.parametrize("content,message", [
    ({"model": {"patch_embed.proj.weight": "not a tensor"}},
     r"its model weights \('model'\) must all be tensors, but 1 are not, e\.g\. 'patch_embed.proj.weight' is a str"),
    ({"model": {"layers.0.blocks.0.norm1.weight": [1.0, 2.0], "head.bias": torch.zeros(10)}},
     r"'layers.0.blocks.0.norm1.weight' is a list"),
])
@pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
def test_a_checkpoint_whose_weights_are_not_tensors_is_refused_in_one_line(digits_root, tmp_path, capsys, content,
                                                                          message, flag):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    assert driver.cli(argv(digits_root, tmp_path / "out", flags=["--eval", flag, str(path)])) == 2
    error = capsys.readouterr().err
    assert re.search(message, error) and "Traceback" not in error, error


def test_an_empty_folder_given_as_a_checkpoint_says_so(digits_root, two_epochs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert driver.cli(argv(digits_root, tmp_path / "out", flags=["--pretrained", str(tmp_path / "empty")])) == 2
    assert f"{tmp_path / 'empty'} is a folder without a checkpoint in it: give a checkpoint file (.pth)" in \
        capsys.readouterr().err
    run_dir = os.path.join(two_epochs, RUN)
    assert driver.cli(argv(digits_root, tmp_path / "out", flags=["--pretrained", run_dir])) == 2
    assert f"{run_dir} is a run folder, not a checkpoint: give one of its checkpoint files, e.g. " \
        f"{os.path.join(run_dir, 'ckpt_epoch_1.pth')}" in capsys.readouterr().err


def test_non_finite_loss_before_any_checkpoint_does_not_claim_one_is_intact(digits_root, tmp_path, capsys):
    assert driver.cli(argv(digits_root, tmp_path, ["TRAIN.BASE_LR", "1e32", "TRAIN.WARMUP_EPOCHS", "0",
                                                   "TRAIN.SAVE_ITERS", "0", "TRAIN.EPOCHS", "1"])) == 2
    error = capsys.readouterr().err
    assert "non-finite loss" in error and "No checkpoint was saved yet" in error, error
    assert "intact" not in error and "none saved yet" not in error


@pytest.mark.parametrize("model_type, key, expected", [
    ("swin", "MODEL.SWIN.DEPTHS", True), ("swin", "MODEL.SWIN.ATTN_IMPL", False),
    ("swinv2", "MODEL.SWINV2.WINDOW_SIZE", True), ("swinv2", "MODEL.SWINV2.ATTN_IMPL", False),
    ("swinv2", "MODEL.SWIN.DEPTHS", False),  # another family's section does not shape this model
    ("swin_mlp", "MODEL.SWIN_MLP.EMBED_DIM", True), ("swin_mlp", "MODEL.TYPE", True),
    ("swin", "TRAIN.EPOCHS", False),
])
def test_architecture_keys_follow_the_model_family(model_type, key, expected):
    from checkpoint import _is_architecture_key
    from config import load_config

    assert _is_architecture_key(key, load_config(None, opts=["MODEL.TYPE", model_type])) is expected

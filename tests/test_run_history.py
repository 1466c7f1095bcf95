"""A run folder never loses another run's files: starting over or rolling back sets them aside in earlier_run_N/,
and ckpt_best.pth is only replaced by a better checkpoint."""
import hashlib
import json
import logging
import os
import re
import shutil

import pytest
import torch

import main as driver
from checkpoint import read_manifest_dict, save_best
from run_history import checkpoint_position
from tests.test_resilience import DEMO, RUN, SMALL

TWO_EPOCHS = SMALL + ["TRAIN.EPOCHS", "2", "TRAIN.SAVE_ITERS", "0"]


def digests(folder):
    """sha256 of every file directly in ``folder`` but the logs."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name)) and not name.startswith("log_rank")}


def metrics_epochs(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


@pytest.fixture
def run_dir(two_epoch_run, tmp_path):
    shutil.copytree(two_epoch_run, tmp_path / "run")
    return os.path.join(tmp_path / "run", RUN)


def argv(digits_root, run_dir, flags=(), opts=()):
    output = os.path.dirname(os.path.dirname(run_dir))
    return ["--cfg", DEMO, "--data-path", digits_root, "--output", output, *flags, "--opts", *TWO_EPOCHS, *opts]


def log_of_last_run(run_dir):
    with open(os.path.join(run_dir, "log_rank0.txt")) as f:
        return f.read().split("output folder")[-1]


def test_starting_over_sets_the_earlier_run_aside_whole(digits_root, run_dir):
    before = digests(run_dir)
    assert {"ckpt_epoch_0.pth", "ckpt_epoch_1.pth", "ckpt_best.pth", "config.yaml", "metrics.jsonl",
            "checkpoints.json"} <= set(before)
    assert driver.cli(argv(digits_root, run_dir, opts=["TRAIN.AUTO_RESUME", "False", "TRAIN.EPOCHS", "1",
                                                       "TRAIN.BASE_LR", "1e-3"])) == 0
    aside = os.path.join(run_dir, "earlier_run_1")
    kept = digests(aside)
    for name, digest in before.items():  # every file of the earlier run, unchanged
        assert kept.get(name) == digest, name
    assert metrics_epochs(run_dir) == [0]  # the new run's only
    assert [e["file"] for e in read_manifest_dict(run_dir)["checkpoints"]] == ["ckpt_epoch_0.pth"]
    assert read_manifest_dict(run_dir)["best"]["source"] == "ckpt_epoch_0.pth"
    assert any(n.startswith("events.out.tfevents") for n in kept)  # its TensorBoard curves went with it
    log = log_of_last_run(run_dir)
    assert re.search(r"this run starts from scratch; .* set aside in \S+earlier_run_1, not replaced: "
                     r"ckpt_epoch_0.pth, ckpt_epoch_1.pth, ckpt_best.pth \(epoch \d, acc@1 [\d.]+%\), 2 lines of "
                     r"metrics.jsonl", log), log


def test_rolling_back_sets_aside_the_later_part_only(digits_root, run_dir):
    before = digests(run_dir)
    best_epoch, best_score = (read_manifest_dict(run_dir)["best"][key] for key in ("epoch", "score"))
    older = os.path.join(run_dir, "ckpt_epoch_0.pth")
    assert driver.cli(argv(digits_root, run_dir, ["--resume", older], ["TRAIN.BASE_LR", "1e-3"])) == 0
    aside = os.path.join(run_dir, "earlier_run_1")
    kept = digests(aside)
    assert kept["ckpt_epoch_1.pth"] == before["ckpt_epoch_1.pth"]  # the abandoned epoch, unchanged
    assert digests(run_dir)["ckpt_epoch_0.pth"] == before["ckpt_epoch_0.pth"]  # the shared part stays
    assert kept["config.yaml"] == before["config.yaml"] and kept["checkpoints.json"] == before["checkpoints.json"]
    with open(os.path.join(aside, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [1]
    assert metrics_epochs(run_dir) == [0, 1]  # epoch 0 of the shared part, epoch 1 of the new branch
    # The earlier best stays where it was (epoch 0) unless a better one replaced it, or is set aside (epoch 1).
    best = read_manifest_dict(run_dir)["best"]
    if best_epoch == 1:
        assert kept["ckpt_best.pth"] == before["ckpt_best.pth"]
    elif best["epoch"] == 0:
        assert digests(run_dir)["ckpt_best.pth"] == before["ckpt_best.pth"]
    else:
        assert best["score"] > best_score
    assert "continues from epoch 1 update 0" in log_of_last_run(run_dir)


def test_resuming_the_newest_checkpoint_sets_nothing_aside(digits_root, run_dir):
    assert driver.cli(argv(digits_root, run_dir, opts=["TRAIN.EPOCHS", "3"])) == 0
    assert not any(n.startswith("earlier_run") for n in os.listdir(run_dir))
    assert metrics_epochs(run_dir) == [0, 1, 2]


def test_the_best_is_replaced_only_by_a_better_one_and_the_log_says_which(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = str(tmp_path)
    record = save_best({"w": torch.zeros(1)}, out, "ckpt_epoch_3.pth", 3, 0, 90.0, 90.0)
    with open(tmp_path / "checkpoints.json", "w") as f:
        json.dump({"checkpoints": [], "best": record}, f)
    held = (tmp_path / "ckpt_best.pth").read_bytes()
    assert save_best({"w": torch.ones(1)}, out, "ckpt_epoch_5.pth", 5, 0, 53.0, 53.0) is None
    assert (tmp_path / "ckpt_best.pth").read_bytes() == held
    assert "ckpt_best.pth kept: it holds epoch 3 (acc@1 90.00%), at least as good as epoch 5 (acc@1 53.00%)" in \
        caplog.text
    assert save_best({"w": torch.ones(1)}, out, "ckpt_epoch_6.pth", 6, 0, 91.0, 91.0)["epoch"] == 6
    assert "ckpt_best.pth is now epoch 6 (acc@1 91.00%) from ckpt_epoch_6.pth, replacing epoch 3 (acc@1 90.00%)" in \
        caplog.text


@pytest.mark.parametrize("name,position", [("ckpt_epoch_4.pth", (5, 0)), ("ckpt_epoch_4_step_30.pth", (4, 30)),
                                           ("ckpt_epoch_4", (5, 0)), ("ckpt_epoch_4_step_30", (4, 30)),
                                           ("ckpt_best.pth", None), ("ckpt_epoch_4.pth.tmp", None)])
def test_checkpoint_positions(name, position):
    assert checkpoint_position(name) == position


def test_prepare_digits_leaves_a_neighbouring_tmp_folder_alone(tmp_path):
    from data.digits import prepare_digits

    neighbour = tmp_path / "digits.tmp"
    neighbour.mkdir()
    (neighbour / "mine.txt").write_text("not the tool's")
    prepare_digits(str(tmp_path / "digits"))
    assert (neighbour / "mine.txt").read_text() == "not the tool's"
    assert sorted(os.listdir(tmp_path / "digits" / "train")) == [str(d) for d in range(10)]

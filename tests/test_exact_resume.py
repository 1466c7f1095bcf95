"""Resuming mid-epoch and training on gives exactly the figures of an unbroken run, with 0 or 2 loader workers,
persistent or not: every random stream (augmentation, Mixup/CutMix, drop path, the loaders' own) comes from the
seed, the epoch and the position, never from what another loader happened to draw before."""
import json
import os
import re
import shutil

import pytest
from torch.utils.data import DataLoader

import main as driver
from tests.test_resilience import DEMO, RUN
from tests.test_resume import keep_only_checkpoint

# The demo model at a tiny size on 12 training and 5 validation digits a class: 7 updates of 16 an epoch. Drop path,
# Mixup/CutMix, RandAugment, random erasing, flips and an EMA (validated after each checkpoint) all draw.
TINY = ["MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[2, 2]", "MODEL.SWIN.NUM_HEADS", "[2, 4]",
        "MODEL.DROP_PATH_RATE", "0.2", "DATA.BATCH_SIZE", "16", "DATA.PREPARE_DIGITS", "False",
        "AUG.MIXUP", "0.8", "AUG.CUTMIX", "1.0", "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5-inc1", "AUG.REPROB", "0.25",
        "AUG.HFLIP", "0.5", "MODEL.EMA.ENABLE", "True", "MODEL.EMA.DECAY", "0.9", "AMP_ENABLE", "False",
        "PRINT_FREQ", "1", "TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "TRAIN.SAVE_ITERS", "3",
        "TRAIN.KEEP_CHECKPOINTS", "20"]
PROGRESS = re.compile(r"Train: \[(\d+)\]\[(\d+)/\d+\] eta \S+ (lr \S+ loss \S+ grad_norm \S+ loss_scale \S+) ")


@pytest.fixture(scope="module")
def few_digits(digits_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("few_digits")
    for split, count in (("train", 12), ("val", 5)):
        for label in range(10):
            source = os.path.join(digits_root, split, str(label))
            os.makedirs(root / split / str(label))
            for name in sorted(os.listdir(source))[:count]:
                shutil.copy(os.path.join(source, name), root / split / str(label) / name)
    return str(root)


def progress(run_dir):
    """(epoch, update) -> the figures of its progress line; after a resume, the later line wins."""
    with open(os.path.join(run_dir, "log_rank0.txt")) as f:
        return {(int(m.group(1)), int(m.group(2))): m.group(3) for m in PROGRESS.finditer(f.read())}


def metrics(run_dir):
    """epoch -> every figure of its metrics.jsonl line but the time taken."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["epoch"]: {k: v for k, v in r.items() if k != "train_epoch_time"} for r in map(json.loads, f)}


@pytest.mark.slow
@pytest.mark.parametrize("workers,persistent", [(0, False), (2, True), (2, False)],
                         ids=["0_workers", "2_persistent_workers", "2_workers"])
def test_resume_mid_epoch_then_train_on_gives_every_figure_of_an_unbroken_run(few_digits, tmp_path, monkeypatch,
                                                                            workers, persistent):
    if not persistent:  # the loaders' workers restart every epoch instead
        init = DataLoader.__init__
        monkeypatch.setattr(DataLoader, "__init__",
                            lambda self, *a, **k: init(self, *a, **{**k, "persistent_workers": False}))
    argv = ["--cfg", DEMO, "--data-path", few_digits, "--output", str(tmp_path / "straight"), "--opts", *TINY,
            "DATA.NUM_WORKERS", str(workers)]
    assert driver.cli(argv) == 0
    straight = os.path.join(tmp_path / "straight", RUN)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    resumed = os.path.join(tmp_path / "resumed", RUN)
    # As if the run had stopped after update 3 of epoch 1: the epoch goes on from its checkpoint, and one whole
    # epoch (with its validations, a fresh loader pass and a new epoch's streams) follows.
    keep_only_checkpoint(resumed, "ckpt_epoch_1_step_3.pth")
    argv[argv.index("--output") + 1] = str(tmp_path / "resumed")
    assert driver.cli(argv) == 0
    with open(os.path.join(resumed, "log_rank0.txt")) as f:
        assert "continuing at epoch 1, update 3" in f.read()
    expected, got = progress(straight), progress(resumed)
    assert [key for key in expected if key >= (1, 4)] == [key for key in got if key >= (1, 4)]
    for key in expected:
        assert got[key] == expected[key], key
    assert metrics(resumed) == metrics(straight)

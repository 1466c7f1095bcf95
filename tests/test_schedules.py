"""Learning-rate schedules with warmup, update by update, against the reference release's formulas.

The reference (microsoft/Swin-Transformer ``lr_scheduler.py``) builds, with U updates per epoch,
W = WARMUP_EPOCHS x U warmup updates and T = EPOCHS x U updates in all:

- every schedule: ``WARMUP_LR + t (BASE_LR - WARMUP_LR) / W`` for t < W;
- cosine: timm's cosine over T - W updates after the warmup with WARMUP_PREFIX, else over T from update 0;
- linear: its own class, ``BASE_LR - (BASE_LR - 0.01 BASE_LR) (t - W) / (T - W)`` whatever WARMUP_PREFIX says;
- step: timm's step schedule without a warmup prefix, ``BASE_LR DECAY_RATE ** (t // (DECAY_EPOCHS U))``;
- multistep: its own class, ``BASE_LR GAMMA ** bisect_right([m U for m in MULTISTEPS], t)``.

The formulas are written out here on purpose (not taken from timm), so that a change in how we call
timm, or in timm itself, shows up as a difference from the reference.
"""
import bisect
import math

import pytest
import torch
from torch import nn

import config as cfg_lib
from lr_scheduler import build_scheduler

UPDATES_PER_EPOCH = 10
EPOCHS, WARMUP_EPOCHS = 10, 2
BASE_LR, WARMUP_LR, MIN_LR = 1e-3, 1e-6, 1e-5
DECAY_EPOCHS, DECAY_RATE = 3, 0.1
MULTISTEPS, GAMMA = [3, 7], 0.5


def reference_lr(name: str, t: int, warmup_prefix: bool) -> float:
    """The reference recipe's learning rate after ``t`` optimizer updates."""
    total, warmup = EPOCHS * UPDATES_PER_EPOCH, WARMUP_EPOCHS * UPDATES_PER_EPOCH
    if t < warmup:
        return WARMUP_LR + t * (BASE_LR - WARMUP_LR) / warmup
    if name == "cosine":
        start, length = (warmup, total - warmup) if warmup_prefix else (0, total)
        return MIN_LR + 0.5 * (BASE_LR - MIN_LR) * (1 + math.cos(math.pi * (t - start) / length))
    if name == "linear":
        return BASE_LR - (BASE_LR - 0.01 * BASE_LR) * (t - warmup) / (total - warmup)
    if name == "step":
        return BASE_LR * DECAY_RATE ** (t // (DECAY_EPOCHS * UPDATES_PER_EPOCH))
    if name == "multistep":
        return BASE_LR * GAMMA ** bisect.bisect_right([m * UPDATES_PER_EPOCH for m in MULTISTEPS], t)
    raise AssertionError(name)


def our_lrs(name: str, warmup_prefix: bool) -> list:
    """Our learning rate after each update 0 .. T-1, as the engine steps it."""
    config = cfg_lib.load_config(None, opts=[
        "DATA.BATCH_SIZE", "512",  # a global batch of 512: the learning rates are used unscaled
        "TRAIN.EPOCHS", str(EPOCHS), "TRAIN.WARMUP_EPOCHS", str(WARMUP_EPOCHS), "TRAIN.BASE_LR", str(BASE_LR),
        "TRAIN.WARMUP_LR", str(WARMUP_LR), "TRAIN.MIN_LR", str(MIN_LR), "TRAIN.LR_SCHEDULER.NAME", name,
        "TRAIN.LR_SCHEDULER.WARMUP_PREFIX", str(warmup_prefix),
        "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", str(DECAY_EPOCHS), "TRAIN.LR_SCHEDULER.DECAY_RATE", str(DECAY_RATE),
        "TRAIN.LR_SCHEDULER.MULTISTEPS", str(MULTISTEPS), "TRAIN.LR_SCHEDULER.GAMMA", str(GAMMA)])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    scheduler = build_scheduler(config, optimizer, UPDATES_PER_EPOCH)
    lrs = []
    for t in range(EPOCHS * UPDATES_PER_EPOCH):
        scheduler.step_update(t)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("warmup_prefix", [True, False])
@pytest.mark.parametrize("name", ["cosine", "linear", "step", "multistep"])
def test_every_update_equals_the_reference(name, warmup_prefix):
    expected = [reference_lr(name, t, warmup_prefix) for t in range(EPOCHS * UPDATES_PER_EPOCH)]
    got = our_lrs(name, warmup_prefix)
    wrong = [(t, g, e) for t, (g, e) in enumerate(zip(got, expected)) if g != pytest.approx(e, rel=1e-9, abs=1e-15)]
    assert not wrong, f"{len(wrong)} updates differ from the reference; first (update, ours, reference): {wrong[:3]}"


def test_step_decays_where_the_reference_does_despite_the_warmup():
    """The case of issue 12: 2 warmup epochs, DECAY_EPOCHS 3, 10 updates per epoch: first decay at update 30."""
    lrs = our_lrs("step", warmup_prefix=True)
    assert lrs[29] == pytest.approx(BASE_LR) and lrs[30] == pytest.approx(BASE_LR * DECAY_RATE)
    assert lrs[60] == pytest.approx(BASE_LR * DECAY_RATE ** 2)


def test_multistep_milestone_inside_the_warmup_is_refused():
    """The reference asserts that the warmup ends before the first milestone; we say so at start-up."""
    with pytest.raises(cfg_lib.ConfigError, match=r"TRAIN.LR_SCHEDULER.MULTISTEPS .*TRAIN.WARMUP_EPOCHS"):
        cfg_lib.load_config(None, opts=["TRAIN.LR_SCHEDULER.NAME", "multistep", "TRAIN.WARMUP_EPOCHS", "5",
                                        "TRAIN.LR_SCHEDULER.MULTISTEPS", "[3, 8]"])

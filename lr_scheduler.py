"""Learning-rate schedules (timm's), stepped once per optimizer update with linear warmup."""
import logging

from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch.optim import Optimizer
from yacs.config import CfgNode

logger = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "step", "multistep")
# The reference's linear schedule ends at this fraction of the base learning rate.
LINEAR_MIN_LR_RATE = 0.01


def build_scheduler(config: CfgNode, optimizer: Optimizer, updates_per_epoch: int) -> Scheduler:
    """The schedule named by ``TRAIN.LR_SCHEDULER.NAME``, counted in optimizer updates.

    Call ``step_update(num_updates)`` after every optimizer step. With ``WARMUP_PREFIX`` the decay
    starts after the warmup; without it the warmup overlays the first steps of the decay.

    Args:
        updates_per_epoch: optimizer updates in one epoch (batches / accumulation steps, rounded up).
    """
    train = config.TRAIN
    sched = train.LR_SCHEDULER
    total = int(train.EPOCHS * updates_per_epoch)
    warmup = int(train.WARMUP_EPOCHS * updates_per_epoch)
    common = dict(warmup_t=warmup, warmup_lr_init=train.WARMUP_LR, warmup_prefix=sched.WARMUP_PREFIX,
                  t_in_epochs=False)
    decay_length = total - warmup if sched.WARMUP_PREFIX else total
    if sched.NAME == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(decay_length, 1), lr_min=train.MIN_LR, cycle_limit=1,
                                 **common)
    if sched.NAME == "linear":
        return PolyLRScheduler(optimizer, t_initial=max(decay_length, 1), power=1.0,
                               lr_min=train.BASE_LR * LINEAR_MIN_LR_RATE, cycle_limit=1, **common)
    if sched.NAME == "step":
        return StepLRScheduler(optimizer, decay_t=int(sched.DECAY_EPOCHS * updates_per_epoch),
                               decay_rate=sched.DECAY_RATE, **common)
    if sched.NAME == "multistep":
        # timm decays once t + 1 reaches a milestone; the reference decays at the milestone itself.
        milestones = [int(m * updates_per_epoch) + 1 for m in sched.MULTISTEPS]
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=sched.GAMMA, **common)
    raise ValueError(f"unknown TRAIN.LR_SCHEDULER.NAME {sched.NAME!r}; valid names: {', '.join(SCHEDULERS)}")

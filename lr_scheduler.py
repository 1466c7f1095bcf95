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

    Call ``step_update(num_updates)`` after every optimizer step. Every schedule warms up linearly from
    ``WARMUP_LR`` over the first ``WARMUP_EPOCHS``; what follows is the reference release's:

    - cosine: with ``WARMUP_PREFIX`` the cosine starts after the warmup and spans the remaining updates;
      without it, it spans all updates and the warmup overlays its first steps;
    - linear: always starts after the warmup, from ``BASE_LR`` to 1% of it (``WARMUP_PREFIX`` is ignored);
    - step and multistep: decay epochs are counted from update 0, not from the end of the warmup
      (``WARMUP_PREFIX`` is ignored), so epoch 30 of ``DECAY_EPOCHS 30`` decays at update 30 x updates per epoch.

    Args:
        updates_per_epoch: optimizer updates in one epoch (batches / accumulation steps, rounded up).
    """
    train = config.TRAIN
    sched = train.LR_SCHEDULER
    total = int(train.EPOCHS * updates_per_epoch)
    warmup = int(train.WARMUP_EPOCHS * updates_per_epoch)
    common = dict(warmup_t=warmup, warmup_lr_init=train.WARMUP_LR, t_in_epochs=False)
    if sched.NAME == "cosine":
        decay_length = total - warmup if sched.WARMUP_PREFIX else total
        return CosineLRScheduler(optimizer, t_initial=max(decay_length, 1), lr_min=train.MIN_LR, cycle_limit=1,
                                 warmup_prefix=sched.WARMUP_PREFIX, **common)
    if sched.NAME == "linear":
        # The reference's own linear schedule always decays over the updates after the warmup.
        return PolyLRScheduler(optimizer, t_initial=max(total - warmup, 1), power=1.0,
                               lr_min=train.BASE_LR * LINEAR_MIN_LR_RATE, cycle_limit=1, warmup_prefix=True,
                               **common)
    # The reference's step and multistep schedules count their decay epochs from update 0, so the warmup
    # is never a prefix that would shift the decays later.
    if sched.NAME == "step":
        return StepLRScheduler(optimizer, decay_t=int(sched.DECAY_EPOCHS * updates_per_epoch),
                               decay_rate=sched.DECAY_RATE, warmup_prefix=False, **common)
    if sched.NAME == "multistep":
        # timm decays once t + 1 reaches a milestone; the reference decays at the milestone itself.
        milestones = [int(m * updates_per_epoch) + 1 for m in sched.MULTISTEPS]
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=sched.GAMMA, warmup_prefix=False,
                                    **common)
    raise ValueError(f"unknown TRAIN.LR_SCHEDULER.NAME {sched.NAME!r}; valid names: {', '.join(SCHEDULERS)}")

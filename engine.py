"""The loop bodies: one training epoch, exact validation and throughput measurement."""
import contextlib
import datetime
import logging
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.datasets import unreadable_index
from data.errors import DataError
from fsdp import clip_grad_norm, gradient_sync_off, is_sharded
from utils import all_reduce_max, all_reduce_sum, gather_objects, mark_failure_agreed

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (or too many skipped float16 steps in a row)."""


@dataclass
class Precision:
    """Autocast settings; a gradient scaler is used for float16 only."""
    enabled: bool
    dtype: torch.dtype = torch.bfloat16

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.enabled)

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "") + " autocast" if self.enabled else "float32"

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16


@dataclass
class TrainParts:
    """What one optimizer step touches. ``model`` may be DDP-wrapped and/or compiled."""
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object  # timm Scheduler: step_update(num_updates)
    scaler: Optional[torch.amp.GradScaler] = None
    model_ema: Optional[nn.Module] = None
    mixup_fn: Optional[Callable] = None
    clip_grad: float = 0.0
    accumulation_steps: int = 1
    max_skipped_steps: int = 20
    # What the batches are and how their loss is computed (objectives.py); None: classification with
    # ``criterion`` and ``mixup_fn``.
    objective: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.objective is None:
            from objectives import ClassificationObjective  # objectives.py calls back into this module's validate

            self.objective = ClassificationObjective(self.criterion, self.mixup_fn)


@dataclass
class EpochState:
    """Where training is: the one position type that the loop advances, checkpoints store and resume returns.

    Enough to continue exactly: the epoch, the optimizer updates and training images done in it, the best
    validation accuracy so far and the float16 skipped-step counts.
    """
    epoch: int
    updates_per_epoch: int
    update: int = 0  # optimizer updates done in this epoch
    skipped_in_a_row: int = 0
    skipped_total: int = 0
    images: int = 0  # training images of this epoch done, all processes together (set when saving)
    max_accuracy: float = 0.0
    # The training loss summed over this epoch's micro-batches done (set when saving mid-epoch), so that a resumed
    # epoch reports the mean of the whole epoch; None: unknown (a checkpoint that did not store it).
    loss_sum: Optional[float] = 0.0


def _no_sync(model: nn.Module, skip: bool):
    """No gradient reduction on micro-steps whose gradients are only accumulated: DDP's no_sync, or FSDP's
    gradient sync switched off."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    if skip and is_sharded(model):
        return gradient_sync_off(model)
    return contextlib.nullcontext()


def optimizer_step(parts: TrainParts, step_parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Unscales, clips (norm logged, or measured when clipping is off), steps and clears gradients.

    Returns:
        The total gradient norm before clipping, as a 0-d tensor (no host sync).
    """
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)
    max_norm = parts.clip_grad if parts.clip_grad > 0 else float("inf")
    grad_norm = clip_grad_norm(step_parameters, max_norm)  # sharded (FSDP) gradients too
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def micro_step(parts: TrainParts, images: torch.Tensor, targets: torch.Tensor, device: torch.device,
               precision: Precision, loss_divisor: int, sync: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients accumulate until :func:`optimizer_step`.

    Returns:
        The un-divided loss as a 0-d tensor.
    """
    images, targets = parts.objective.prepare(images, targets)
    with _no_sync(parts.model, not sync):
        with precision.autocast(device):
            loss = parts.objective.loss(parts.model, images, targets)
        scaled = loss / loss_divisor
        if parts.scaler is not None:
            scaled = parts.scaler.scale(scaled)
        scaled.backward()
    return loss.detach()


def _memory_mb(device: torch.device) -> float:
    """Peak memory so far in MB: tensors allocated on a CUDA device, else the process's resident set (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


def train_one_epoch(parts: TrainParts, data_loader: Iterable, state: EpochState, device: torch.device,
                    precision: Precision, print_freq: int, num_batches: int,
                    save_due: Optional[Callable[[EpochState], bool]] = None,
                    save: Optional[Callable[[EpochState], None]] = None,
                    log_scalar: Optional[Callable[[str, float, int], None]] = None) -> Dict[str, float]:
    """Trains for the rest of ``state.epoch``, starting after ``state.update`` optimizer updates.

    Every ``accumulation_steps`` micro-batches make one update (the last group of an epoch may be
    shorter; it is applied, with its loss averaged over its own size). The schedule steps per update.

    The loop reads from the device only at sync points: updates that print a progress line or save a
    checkpoint. There the health flags (non-finite loss, skipped float16 steps) are agreed across processes,
    so every process stops at the same update with the same message; other updates never wait for the device.

    Args:
        num_batches: micro-batches this loader yields in this (possibly resumed) epoch.
        save_due: after each optimizer update, whether a mid-epoch checkpoint is due (the same answer on every
            process); the health flags are checked before ``save`` is called.
        save: writes the mid-epoch checkpoint.
        log_scalar: TensorBoard-style ``(tag, value, global_update)``, called on logging steps.

    Returns:
        Mean training loss of the epoch's micro-batches (those before a mid-epoch resume included), final lr, last
        gradient norm, skipped float16 steps and seconds taken.

    Raises:
        NonFiniteLossError: a NaN/inf loss in float32 or bfloat16, or too many skipped float16 steps.
    """
    model = parts.model
    model.train()
    accum = parts.accumulation_steps
    params = [p for p in model.parameters() if p.requires_grad]
    batches_done = state.update * accum
    total_batches = batches_done + num_batches
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)  # since the last progress line
    loss_count = 0
    epoch_loss_sum = torch.full((), state.loss_sum or 0.0, device=device, dtype=torch.float64)
    grad_norm = torch.zeros(())
    health = HealthFlags(device, state.skipped_in_a_row)
    images_seen = 0
    start = window_start = time.time()
    parts.optimizer.zero_grad(set_to_none=True)
    for index, (images, targets) in enumerate(data_loader, start=batches_done):
        images, targets = parts.objective.to_device(images, targets, device)
        group_start = (index // accum) * accum
        group_size = min(accum, total_batches - group_start)
        last_of_group = index == group_start + group_size - 1
        loss = micro_step(parts, images, targets, device, precision, group_size, sync=last_of_group)
        loss_sum += loss
        epoch_loss_sum += loss
        loss_count += 1
        images_seen += parts.objective.batch_size(images)
        if not precision.needs_scaler:
            health.record_loss(loss)
        if not last_of_group:
            continue
        # A copy: the scaler updates its scale tensor in place. Compared on the device, never read here.
        scale_before = parts.scaler._get_scale_async().clone() if parts.scaler is not None else None
        grad_norm = optimizer_step(parts, params)
        state.update += 1
        global_update = state.epoch * state.updates_per_epoch + state.update
        parts.lr_scheduler.step_update(global_update)
        if parts.scaler is not None:
            health.record_scale(scale_before, parts.scaler._get_scale_async())
        if parts.model_ema is not None:
            parts.model_ema.update(_unwrap(model), step=global_update)
        log_now = state.update % print_freq == 0 or index == total_batches - 1
        save_now = save_due is not None and save_due(state)
        if log_now or save_now:
            health.check(state, parts.max_skipped_steps)
        if log_now:
            elapsed = time.time() - window_start
            mean_loss = (loss_sum / max(loss_count, 1)).item()
            _log_progress(parts, state, index + 1, total_batches, index + 1 - batches_done, mean_loss,
                          float(grad_norm), images_seen / elapsed,
                          time.time() - start, device, log_scalar, global_update)
            loss_sum.zero_()
            loss_count = 0
            images_seen = 0
            window_start = time.time()
        if save_now:
            state.loss_sum = epoch_loss_sum.item()  # a sync point already (the health flags were read)
            save(state)
    # The mean over the whole epoch; over the micro-batches of this call when a resumed epoch's sum is unknown.
    mean_over = num_batches if state.loss_sum is None else total_batches
    return {"loss": (epoch_loss_sum / max(mean_over, 1)).item(), "lr": parts.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm), "skipped_steps": state.skipped_total, "epoch_time": time.time() - start}


def _unwrap(model: nn.Module) -> nn.Module:
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


class HealthFlags:
    """Non-finite losses and skipped float16 steps, tracked on the device and read only at sync points.

    The loss scale of a gradient scaler drops exactly when it skipped a step for non-finite gradients; the
    comparison stays on the device, so float16 costs no host sync per update either.
    """

    def __init__(self, device: torch.device, skipped_in_a_row: int = 0):
        # non-finite loss seen, steps skipped since the last check, skipped in a row now, longest run since the check
        self.values = torch.tensor([0.0, 0.0, skipped_in_a_row, skipped_in_a_row], device=device, dtype=torch.float64)

    def record_loss(self, loss: torch.Tensor) -> None:
        self.values[0] = torch.maximum(self.values[0], (~torch.isfinite(loss)).to(self.values.dtype))

    def record_scale(self, scale_before: torch.Tensor, scale_after: torch.Tensor) -> None:
        skipped = (scale_after < scale_before).to(self.values.dtype).reshape(())
        self.values[1] += skipped
        self.values[2] = (self.values[2] + 1) * skipped
        self.values[3] = torch.maximum(self.values[3], self.values[2])

    def check(self, state: EpochState, max_skipped_steps: int) -> None:
        """Reads the flags, agreed across processes (a collective: call it at the same update on every process).

        Raises:
            NonFiniteLossError: a process saw a non-finite loss, or more than ``max_skipped_steps`` float16 steps
                in a row were skipped.
        """
        agreed = all_reduce_max(self.values.clone())
        non_finite, skipped, in_a_row, longest = (int(v) for v in agreed.tolist())
        if non_finite or longest > max_skipped_steps:
            mark_failure_agreed()  # every process raises the error below at this update
        if non_finite:
            raise NonFiniteLossError(
                f"non-finite loss in epoch {state.epoch}, at or before update {state.update} of "
                f"{state.updates_per_epoch}. The run stopped before saving anything from these steps. "
                "Lower TRAIN.BASE_LR, keep TRAIN.CLIP_GRAD on, or check the data.")
        state.skipped_total += skipped
        state.skipped_in_a_row = in_a_row
        if skipped:
            logger.warning("epoch %d update %d: %d float16 step(s) skipped for non-finite gradients since the last "
                           "check (%d in a row now)", state.epoch, state.update, skipped, in_a_row)
        if longest > max_skipped_steps:
            raise NonFiniteLossError(
                f"epoch {state.epoch}, at or before update {state.update}: {longest} float16 steps in a row were "
                f"skipped for non-finite gradients (limit TRAIN.MAX_SKIPPED_STEPS={max_skipped_steps}). "
                "Lower the learning rate or train in bfloat16 (AMP_DTYPE bfloat16).")
        self.values[1] = 0
        self.values[3] = self.values[2]


def _log_progress(parts: TrainParts, state: EpochState, batch: int, total: int, done_this_run: int, loss: float,
                  grad_norm: float,
                  images_per_second: float, elapsed: float, device: torch.device,
                  log_scalar: Optional[Callable[[str, float, int], None]], global_update: int) -> None:
    lr = parts.optimizer.param_groups[0]["lr"]
    eta = datetime.timedelta(seconds=int(elapsed / max(done_this_run, 1) * (total - batch)))
    scale = parts.scaler.get_scale() if parts.scaler is not None else 1.0
    memory = _memory_mb(device)
    logger.info("Train: [%d][%d/%d] eta %s lr %.6g loss %.4f grad_norm %.4f loss_scale %g %.1f img/s mem %.0fMB",
                state.epoch, batch, total, eta, lr, loss, grad_norm, scale, images_per_second, memory)
    if log_scalar is not None:
        for tag, value in (("train/loss", loss), ("train/lr", lr), ("train/grad_norm", grad_norm),
                           ("train/loss_scale", scale), ("train/images_per_second", images_per_second),
                           ("train/memory_mb", memory)):
            log_scalar(tag, value, global_update)


@torch.no_grad()
@torch.no_grad()
def validate(model: nn.Module, data_loader: Iterable, device: torch.device, precision: Precision,
             expected_total: int, print_freq: int = 0, objective: Optional[Any] = None) -> Dict[str, float]:
    """Exact validation over the readable images of the whole validation set: for classification (the default
    objective) top-1 / top-5 accuracy and mean loss, for SimMIM the mean reconstruction loss.

    Each process evaluates its own shard (no padding); the objective's per-batch sums and the image counts are
    added up across processes, so the result is the same for any number of processes. An item whose label is
    negative stands for an unreadable image (see ``data.datasets.unreadable_label``): it is left out of the
    figures, counted, and named in a warning (paths from ``data_loader.dataset.image_path`` when it has one).

    Args:
        objective: what a batch is and what is measured (objectives.py); None: classification.

    Returns:
        The objective's figures over the ``count`` images evaluated; ``unreadable``, the images left out.

    Raises:
        RuntimeError: the images evaluated plus those left out differ from ``expected_total``.
        DataError: no validation image could be read.
    """
    if objective is None:
        from objectives import ClassificationObjective

        objective = ClassificationObjective(criterion=None)
    model.eval()
    names = objective.eval_sum_names
    sums = torch.zeros(len(names), device=device, dtype=torch.float64)
    counts = torch.zeros(2, device=device, dtype=torch.float64)  # images evaluated, images left out
    unreadable: List[int] = []  # this process's image indices
    for index, (images, targets) in enumerate(data_loader):
        readable = targets >= 0  # still on the host: no device sync
        if not bool(readable.all()):
            unreadable += [unreadable_index(label) for label in targets[~readable].tolist()]
            images, targets = objective.select(images, readable), targets[readable]
        if len(targets):
            images, targets = objective.to_device(images, targets, device)
            with precision.autocast(device):
                sums += objective.eval_sums(model, images, targets)
            counts[0] += len(targets)
        if print_freq and (index + 1) % print_freq == 0:
            logger.info("Test: [%d/%d]", index + 1, len(data_loader))
    counts[1] += len(unreadable)
    totals = all_reduce_sum(torch.cat([sums, counts])).tolist()
    total, left_out = int(totals[-2]), int(totals[-1])
    if total + left_out != expected_total:
        left = f" and left out {left_out} unreadable ones" if left_out else ""
        raise RuntimeError(f"evaluated {total} images{left} but the validation set has {expected_total}: the "
                           "evaluation sampler must cover each image exactly once")
    if left_out:
        _report_unreadable(data_loader, unreadable, total, expected_total)
    if total == 0:
        raise DataError(f"none of the {expected_total} validation images could be read (the warnings above name "
                        "them); replace or delete the broken files")
    metrics = objective.eval_metrics(dict(zip(names, totals)), total)
    return {**metrics, "count": total, "unreadable": left_out}


# The unreadable validation images a summary names; the per-image warnings name them all.
MAX_NAMED_UNREADABLE = 20


def _report_unreadable(data_loader: Iterable, unreadable: List[int], evaluated: int, expected_total: int) -> None:
    """Logs the summary of the images left out, with the paths gathered from all processes (collective)."""
    unreadable = [index for part in gather_objects(unreadable) for index in part]
    dataset = getattr(data_loader, "dataset", None)
    names = [dataset.image_path(index) if hasattr(dataset, "image_path") else f"image {index}"
             for index in sorted(unreadable)]
    more = len(names) - MAX_NAMED_UNREADABLE
    logger.warning("evaluated %d of %d validation images; %d unreadable images were left out: %s%s", evaluated,
                   expected_total, len(names), ", ".join(names[:MAX_NAMED_UNREADABLE]),
                   f" and {more} more (see the warnings above)" if more > 0 else "")


def _timed(fn: Callable[[], None], device: torch.device, warmup: int, iterations: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iterations


def throughput(parts: TrainParts, images: torch.Tensor, targets: torch.Tensor, device: torch.device,
               precision: Precision, warmup: int = 5, iterations: int = 20) -> Dict[str, float]:
    """Images/s of inference and of the full training step on the given synthetic batch.

    The training step is the real one: mixup, autocast, scaler, accumulation, clipping, optimizer,
    schedule and EMA. The model and optimizer are changed by it: call it on a throwaway copy.
    """
    model = parts.model
    batch = parts.objective.batch_size(images)

    def infer() -> None:
        with torch.no_grad(), precision.autocast(device):
            parts.objective.infer(model, images)

    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    infer_seconds = _timed(infer, device, warmup, iterations)
    infer_memory = _memory_mb(device)
    params = [p for p in model.parameters() if p.requires_grad]
    accum = parts.accumulation_steps
    update = [0]

    def train_step() -> None:
        for micro in range(accum):
            micro_step(parts, images, targets, device, precision, accum, sync=micro == accum - 1)
        optimizer_step(parts, params)
        update[0] += 1
        parts.lr_scheduler.step_update(update[0])
        if parts.model_ema is not None:
            parts.model_ema.update(_unwrap(model), step=update[0])

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_seconds = _timed(train_step, device, warmup, iterations)
    return {"batch_size": batch, "inference_images_per_second": batch / infer_seconds,
            "train_images_per_second": batch * accum / train_seconds, "inference_peak_memory_mb": infer_memory,
            "train_peak_memory_mb": _memory_mb(device)}

"""Training objectives: what differs between supervised classification and SimMIM pretraining.

The loop (``engine.train_one_epoch``: accumulation, AMP, clipping, EMA, schedules, checkpoints, health checks,
logging) and the driver (``main.train``) are the same for both; they ask the objective, chosen by
``TRAIN.OBJECTIVE``, for the few things that differ: how a batch moves to the device, the loss of a batch, what
validation measures, and which validation figure makes a checkpoint the best.
"""
import logging
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.utils import make_grid

from data.datasets import ImageDataset, unreadable_index
from data.errors import DataError
from data.simmim import VAL_MASK_SEED
from utils import all_reduce_sum

logger = logging.getLogger(__name__)

Batch = Any  # a tensor of images, or for SimMIM a pair [images, masks]


class Objective:
    """The interface; :class:`ClassificationObjective` and :class:`SimMIMObjective` implement it.

    Attributes:
        best_metric: the validation figure that decides the best checkpoint (stored as ``max_accuracy``).
        higher_is_better: whether a larger ``best_metric`` is better.
    """
    name = ""
    best_metric = "acc1"
    higher_is_better = True

    def to_device(self, images: Batch, targets: torch.Tensor, device: torch.device) -> Tuple[Batch, torch.Tensor]:
        return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def batch_size(self, images: Batch) -> int:
        return images.shape[0]

    def prepare(self, images: Batch, targets: torch.Tensor) -> Tuple[Batch, torch.Tensor]:
        """Batch-level augmentation before the forward pass (outside autocast)."""
        return images, targets

    def loss(self, model: nn.Module, images: Batch, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a micro-batch (called under autocast)."""
        raise NotImplementedError

    def infer(self, model: nn.Module, images: Batch) -> torch.Tensor:
        """The model's forward pass alone (throughput measurement)."""
        return model(images)

    def validate(self, model: nn.Module, data_loader: Iterable, device: torch.device, precision,
                 expected_total: int, print_freq: int = 0) -> Dict[str, float]:
        raise NotImplementedError

    def score(self, metrics: Dict[str, float]) -> float:
        """The best-checkpoint figure, oriented so that larger is better."""
        value = metrics[self.best_metric]
        return value if self.higher_is_better else -value

    def summary(self, metrics: Dict[str, float], best: float) -> str:
        """The log line after each validation; ``best`` is the best :meth:`score` so far."""
        raise NotImplementedError

    def log_images(self, model: nn.Module, val_dataset: ImageDataset, writer, step: int) -> None:
        """Images for TensorBoard after a validation (none by default)."""


class ClassificationObjective(Objective):
    """Images and labels; Mixup/CutMix (``mixup_fn``) and the criterion; validation is acc@1/acc@5/loss."""
    name = "classification"

    def __init__(self, criterion: Optional[nn.Module], mixup_fn=None):
        self.criterion = criterion
        self.mixup_fn = mixup_fn

    def prepare(self, images: Batch, targets: torch.Tensor) -> Tuple[Batch, torch.Tensor]:
        if self.mixup_fn is not None:
            return self.mixup_fn(images, targets)
        return images, targets

    def loss(self, model: nn.Module, images: Batch, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(model(images), targets)

    def validate(self, model: nn.Module, data_loader: Iterable, device: torch.device, precision,
                 expected_total: int, print_freq: int = 0) -> Dict[str, float]:
        from engine import validate  # engine builds its default objective from this module

        return validate(model, data_loader, device, precision, expected_total, print_freq)

    def summary(self, metrics: Dict[str, float], best: float) -> str:
        return (f"accuracy of the network on the {metrics['count']} test images: {metrics['acc1']:.2f}%; "
                f"max accuracy {best:.2f}%")


class SimMIMObjective(Objective):
    """Batches ``[images, masks]``; the model (``models.simmim.SimMIM``) returns the masked L1 loss itself;
    validation is the mean reconstruction loss over the validation images (lower is better)."""
    name = "simmim"
    best_metric = "loss"
    higher_is_better = False

    def to_device(self, images: Batch, targets: torch.Tensor, device: torch.device) -> Tuple[Batch, torch.Tensor]:
        pixels, masks = images
        return (pixels.to(device, non_blocking=True), masks.to(device, non_blocking=True)), targets

    def batch_size(self, images: Batch) -> int:
        return images[0].shape[0]

    def loss(self, model: nn.Module, images: Batch, targets: torch.Tensor) -> torch.Tensor:
        pixels, masks = images
        return model(pixels, masks)

    def infer(self, model: nn.Module, images: Batch) -> torch.Tensor:
        return model(*images)

    @torch.no_grad()
    def validate(self, model: nn.Module, data_loader: Iterable, device: torch.device, precision,
                 expected_total: int, print_freq: int = 0) -> Dict[str, float]:
        """The mean masked-L1 loss per image over the whole validation set, the same for any number of processes.

        Every image has the same number of masked squares, so a batch's loss is the mean of its images' losses;
        batch losses are weighted by their image counts and summed across processes. Unreadable images (negative
        labels) are left out and counted.

        Raises:
            RuntimeError: the images evaluated plus those left out differ from ``expected_total``.
            DataError: no validation image could be read.
        """
        model.eval()
        counts = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, images evaluated, left out
        for index, ((pixels, masks), targets) in enumerate(data_loader):
            readable = targets >= 0
            if not bool(readable.all()):
                for label in targets[~readable].tolist():
                    logger.warning("validation image %d is unreadable; left out", unreadable_index(label))
                pixels, masks = pixels[readable], masks[readable]
                counts[2] += int((~readable).sum())
            if len(pixels):
                pixels = pixels.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True)
                with precision.autocast(device):
                    loss = model(pixels, masks)
                counts[0] += loss.double() * len(pixels)
                counts[1] += len(pixels)
            if print_freq and (index + 1) % print_freq == 0:
                logger.info("Test: [%d/%d]", index + 1, len(data_loader))
        all_reduce_sum(counts)
        loss_sum, total, left_out = counts.tolist()
        total, left_out = int(total), int(left_out)
        if total + left_out != expected_total:
            raise RuntimeError(f"evaluated {total} images (and left out {left_out}) but the validation set has "
                               f"{expected_total}: the evaluation sampler must cover each image exactly once")
        if total == 0:
            raise DataError(f"none of the {expected_total} validation images could be read; replace or delete the "
                            "broken files")
        metrics = {"loss": loss_sum / total, "count": total, "unreadable": left_out}
        logger.info(" * Reconstruction loss %.4f (masked L1 over %d images)", metrics["loss"], total)
        return metrics

    def log_images(self, model: nn.Module, val_dataset: ImageDataset, writer, step: int) -> None:
        """Input / masked input / reconstruction of the first validation images (see :func:`reconstruction_grid`)."""
        writer.add_image("val/reconstruction", reconstruction_grid(model, val_dataset), step)

    def summary(self, metrics: Dict[str, float], best: float) -> str:
        return (f"reconstruction loss (masked L1) on the {metrics['count']} validation images: "
                f"{metrics['loss']:.4f}; best {-best:.4f}")


# Images shown by default, and the pixel size each is drawn at (small digits are enlarged for the eye).
DEFAULT_GRID_COUNT = 8
MIN_DISPLAY_SIZE = 96


def reconstruction_grid(model: nn.Module, dataset: ImageDataset, count: int = DEFAULT_GRID_COUNT) -> torch.Tensor:
    """A (3, H, W) image in [0, 1]: for the first ``count`` images of ``dataset`` (a SimMIM validation dataset),
    one row of input, masked input and reconstruction."""
    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    items = [dataset[(index, VAL_MASK_SEED + index)][0] for index in range(min(count, len(dataset)))]
    images = torch.stack([image for image, _ in items]).to(device)
    masks = torch.stack([mask for _, mask in items]).to(device)
    was_training = model.training
    model.eval()
    rows = model.visualize(images, masks).float().cpu()
    model.train(was_training)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    rows = (rows * std + mean).clamp(0, 1)
    if rows.shape[-1] < MIN_DISPLAY_SIZE:
        scale = -(-MIN_DISPLAY_SIZE // rows.shape[-1])
        rows = rows.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return make_grid(rows, nrow=3, padding=2, pad_value=1.0)


def build_objective(config, criterion: Optional[nn.Module] = None, mixup_fn=None) -> Objective:
    """The objective of ``TRAIN.OBJECTIVE``."""
    if config.TRAIN.OBJECTIVE == "simmim":
        return SimMIMObjective()
    return ClassificationObjective(criterion, mixup_fn)

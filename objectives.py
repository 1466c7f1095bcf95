"""Training objectives: what differs between supervised classification and SimMIM pretraining.

The loop (``engine.train_one_epoch``: accumulation, AMP, clipping, EMA, schedules, checkpoints, health checks,
logging) and the driver (``main.train``) are the same for both; they ask the objective, chosen by
``TRAIN.OBJECTIVE``, for the few things that differ: how a batch moves to the device, the loss of a batch, what
validation measures, and which validation figure makes a checkpoint the best.
"""
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.utils import make_grid

from data.datasets import ImageDataset
from data.simmim import VAL_MASK_SEED

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

    # Names of the per-batch sums that validation adds up across batches and processes (see eval_sums).
    eval_sum_names: Tuple[str, ...] = ()

    def select(self, images: Batch, keep: torch.Tensor) -> Batch:
        """The images of a batch where ``keep`` (a boolean mask of the batch) is true."""
        return images[keep]

    def eval_sums(self, model: nn.Module, images: Batch, targets: torch.Tensor) -> torch.Tensor:
        """Validation sums of one batch, a 1-D tensor ordered as ``eval_sum_names`` (called under autocast; the
        sums stay on the device)."""
        raise NotImplementedError

    def eval_metrics(self, sums: Dict[str, float], count: int) -> Dict[str, float]:
        """The validation figures from the sums over the ``count`` images evaluated (logs the summary line)."""
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

    eval_sum_names = ("correct1", "correct5", "loss")

    def eval_sums(self, model: nn.Module, images: Batch, targets: torch.Tensor) -> torch.Tensor:
        logits = model(images).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
        return torch.stack([hits[:, :1].sum().to(loss.dtype), hits.sum().to(loss.dtype), loss])

    def eval_metrics(self, sums: Dict[str, float], count: int) -> Dict[str, float]:
        metrics = {"acc1": 100.0 * sums["correct1"] / count, "acc5": 100.0 * sums["correct5"] / count,
                   "loss": sums["loss"] / count}
        # Users' log parsers read this exact line.
        logger.info(" * Acc@1 %.3f Acc@5 %.3f", metrics["acc1"], metrics["acc5"])
        return metrics

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

    # Every image has the same number of masked squares, so a batch's loss is the mean of its images' losses, and
    # the loss times the batch size is the batch's sum.
    eval_sum_names = ("loss",)

    def select(self, images: Batch, keep: torch.Tensor) -> Batch:
        pixels, masks = images
        return pixels[keep], masks[keep]

    def eval_sums(self, model: nn.Module, images: Batch, targets: torch.Tensor) -> torch.Tensor:
        pixels, masks = images
        return (model(pixels, masks).double() * len(pixels)).reshape(1)

    def eval_metrics(self, sums: Dict[str, float], count: int) -> Dict[str, float]:
        metrics = {"loss": sums["loss"] / count}
        logger.info(" * Reconstruction loss %.4f (masked L1 over %d images)", metrics["loss"], count)
        return metrics

    def log_images(self, model: nn.Module, val_dataset: ImageDataset, writer, step: int) -> None:
        """Input / masked input / reconstruction of validation images (see :func:`reconstruction_grid`)."""
        writer.add_image("val/reconstruction", reconstruction_grid(model, val_dataset), step)

    def summary(self, metrics: Dict[str, float], best: float) -> str:
        return (f"reconstruction loss (masked L1) on the {metrics['count']} validation images: "
                f"{metrics['loss']:.4f}; best {-best:.4f}")


# Images shown by default, and the pixel size each is drawn at (small digits are enlarged for the eye).
DEFAULT_GRID_COUNT = 8
MIN_DISPLAY_SIZE = 96


def grid_indices(count: int, size: int) -> List[int]:
    """``count`` image indices spread evenly over a dataset of ``size`` (datasets are often sorted by class, so the
    first images would all show one class)."""
    count = min(count, size)
    return [index * size // count for index in range(count)]


def reconstruction_grid(model: nn.Module, dataset: ImageDataset, count: int = DEFAULT_GRID_COUNT) -> torch.Tensor:
    """A (3, H, W) image in [0, 1]: for ``count`` images spread over ``dataset`` (a SimMIM validation dataset), one
    row of input, masked input and reconstruction."""
    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    items = [dataset[(index, VAL_MASK_SEED + index)][0] for index in grid_indices(count, len(dataset))]
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

"""The reference training and evaluation transforms, and Mixup/CutMix, built from the config with timm."""
import logging
from typing import Callable, Optional

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AugmentOp
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from yacs.config import CfgNode

from config import ConfigError

logger = logging.getLogger(__name__)

# Images this small (CIFAR-like) are padded and randomly cropped for training and not resized, as the
# reference does; an image of another size is first resized to IMG_SIZE x IMG_SIZE (the reference would crash).
SMALL_IMAGE_SIZE = 32
# Evaluation with TEST.CROP resizes the short side; an image longer than this many times its short side is
# first center-cropped to this ratio, so that a 5000x1 image does not become 1,280,000 x 256 pixels. Only the
# middle of the long side survives the center crop anyway, so images up to this ratio are unaffected.
MAX_EVAL_ASPECT_RATIO = 8

# Evaluation resizes with one fixed filter; "random" (a training-only choice) evaluates with bilinear,
# like the reference.
_EVAL_INTERPOLATION = {
    "random": transforms.InterpolationMode.BILINEAR,
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "box": transforms.InterpolationMode.BOX,
    "hamming": transforms.InterpolationMode.HAMMING,
    "lanczos": transforms.InterpolationMode.LANCZOS,
}

Transform = Callable[[Image.Image], torch.Tensor]


def build_transform(is_train: bool, config: CfgNode) -> Transform:
    """The transform from a decoded RGB PIL image to a normalised float tensor (3, IMG_SIZE, IMG_SIZE).

    Training: RandomResizedCrop (scale 0.08-1, DATA.INTERPOLATION), horizontal flip (AUG.HFLIP), RandAugment
    AUG.AUTO_AUGMENT, color jitter AUG.COLOR_JITTER (timm leaves it out when RandAugment is on), ImageNet
    normalisation and random erasing AUG.REPROB/REMODE/RECOUNT. Images of 32 px or less get
    RandomCrop(size, padding=4) instead of the resized crop.

    Evaluation: with TEST.CROP resize the short side to int(256 / 224 * size) and center-crop, else
    resize to (size, size); no resize at 32 px or less; then ImageNet normalisation.

    At 32 px or less an image that is not size x size is first resized to it, so every transform gives
    (3, size, size) for any input size.
    """
    interpolation = config.DATA.INTERPOLATION
    if interpolation not in _EVAL_INTERPOLATION:
        raise ConfigError(f"DATA.INTERPOLATION must be one of {', '.join(_EVAL_INTERPOLATION)}; "
                          f"got {interpolation!r}")
    if is_train:
        return _train_transform(config)
    return _eval_transform(config)


def _train_transform(config: CfgNode) -> Transform:
    size = config.DATA.IMG_SIZE
    aug = config.AUG
    auto_augment = aug.AUTO_AUGMENT if aug.AUTO_AUGMENT not in (None, "", "none") else None
    transform = create_transform(
        input_size=size,
        is_training=True,
        color_jitter=aug.COLOR_JITTER if aug.COLOR_JITTER > 0 else None,
        auto_augment=auto_augment,
        re_prob=aug.REPROB,
        re_mode=aug.REMODE,
        re_count=aug.RECOUNT,
        interpolation=config.DATA.INTERPOLATION,
        hflip=aug.HFLIP,
    )
    _fix_posterize(transform)
    if size > SMALL_IMAGE_SIZE:
        return transform
    steps = list(transform.transforms)
    if not isinstance(steps[0], RandomResizedCropAndInterpolation):
        raise RuntimeError(f"expected timm's training transform to start with a random resized crop, got "
                           f"{steps[0]!r}; this timm version is not supported")
    steps[0:1] = [ResizeIfNeeded(size, _EVAL_INTERPOLATION[config.DATA.INTERPOLATION]),
                  transforms.RandomCrop(size, padding=4)]
    return transforms.Compose(steps)


class ResizeIfNeeded:
    """Resizes an image that is not ``size`` x ``size`` to that size; one that is passes through untouched.

    Args:
        size: the side of the square output.
        interpolation: the resampling filter.
    """

    def __init__(self, size: int, interpolation: transforms.InterpolationMode):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == (self.size, self.size):
            return image
        return transforms.functional.resize(image, [self.size, self.size], self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


class LimitAspectRatio:
    """Center-crops the long side of an image to at most ``max_ratio`` times its short side.

    Args:
        max_ratio: the largest long side / short side kept.
    """

    def __init__(self, max_ratio: float):
        self.max_ratio = max_ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short = min(width, height)
        limit = int(self.max_ratio * short)
        if max(width, height) <= limit:
            return image
        return transforms.functional.center_crop(image, [min(height, limit), min(width, limit)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_ratio={self.max_ratio})"


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize op, keeping 0 bits as Pillow before version 13 did: a black image."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _fix_posterize(transform: transforms.Compose) -> None:
    """Makes the posterize ops of timm's auto-augmentation work with Pillow 13.

    timm's RandAugment asks to keep 0 bits when the sampled magnitude reaches its maximum (about 2% of
    the posterize draws for rand-m9-mstd0.5); Pillow before 13 returned a black image, Pillow 13 raises
    ValueError, which would stop a run after a few thousand images. Only these op instances change.
    """
    for step in transform.transforms:
        ops = list(getattr(step, "ops", []))
        ops += [op for sub_policy in getattr(step, "policy", []) for op in sub_policy]
        for op in ops:
            if isinstance(op, AugmentOp) and op.name in ("Posterize", "PosterizeIncreasing"):
                op.aug_fn = _posterize


def _eval_transform(config: CfgNode) -> Transform:
    size = config.DATA.IMG_SIZE
    interpolation = _EVAL_INTERPOLATION[config.DATA.INTERPOLATION]
    steps = []
    if size > SMALL_IMAGE_SIZE:
        if config.TEST.CROP:
            steps.append(LimitAspectRatio(MAX_EVAL_ASPECT_RATIO))
            steps.append(transforms.Resize(int(256 / 224 * size), interpolation=interpolation))
            steps.append(transforms.CenterCrop(size))
        else:
            steps.append(transforms.Resize((size, size), interpolation=interpolation))
    else:
        steps.append(ResizeIfNeeded(size, interpolation))
    steps.append(transforms.ToTensor())
    steps.append(transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return transforms.Compose(steps)


def build_mixup(config: CfgNode) -> Optional[Mixup]:
    """timm's Mixup/CutMix with label smoothing, or None when AUG.MIXUP, AUG.CUTMIX are 0 and
    AUG.CUTMIX_MINMAX is None. It turns integer targets into soft (B, MODEL.NUM_CLASSES) targets.

    Raises:
        ConfigError: an odd DATA.BATCH_SIZE (timm mixes each sample with its mirror in the batch).
    """
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0 and aug.CUTMIX_MINMAX is None:
        return None
    if config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f"Mixup/CutMix needs an even DATA.BATCH_SIZE, got {config.DATA.BATCH_SIZE}. Change "
                          "--batch-size, or turn mixing off with --opts AUG.MIXUP 0.0 AUG.CUTMIX 0.0")
    return Mixup(
        mixup_alpha=aug.MIXUP,
        cutmix_alpha=aug.CUTMIX,
        cutmix_minmax=aug.CUTMIX_MINMAX,
        prob=aug.MIXUP_PROB,
        switch_prob=aug.MIXUP_SWITCH_PROB,
        mode=aug.MIXUP_MODE,
        label_smoothing=config.MODEL.LABEL_SMOOTHING,
        num_classes=config.MODEL.NUM_CLASSES,
    )

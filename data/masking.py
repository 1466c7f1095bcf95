"""SimMIM's random masks and its pretraining transform.

The mask is drawn from torch's global random stream, inside the transform: the training loader seeds that
stream per sample from (run seed, epoch, image index) (see ``data.samplers.SeededSampler``), so a resumed
run draws exactly the same masks as an uninterrupted one; validation seeds it per image (see
``data.samplers.FixedSeedSampler``), so every evaluation masks an image the same way. The mask is a transform
step like the others: the device pipeline draws it in the loader workers the same way (``data.device_transforms``).
"""
import math
from typing import Callable, Tuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from yacs.config import CfgNode

from config import MODEL_SECTIONS
from data.transforms import build_transform


class MaskGenerator:
    """Masks exactly ``ceil(count * mask_ratio)`` of the ``mask_patch_size`` squares of an image.

    Args:
        input_size: the image side in pixels.
        mask_patch_size: side of the masked squares; divides ``input_size``.
        model_patch_size: side of the model's patches; divides ``mask_patch_size``.
        mask_ratio: the fraction of squares masked, rounded up to a whole square.

    Calling it gives a (input_size / model_patch_size)^2 int64 map, one entry per model patch, 1 = masked.
    """

    def __init__(self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float):
        if input_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f"the mask square ({mask_patch_size} px) must divide the image ({input_size} px) and "
                             f"be a multiple of the model's patch ({model_patch_size} px)")
        self.squares_per_side = input_size // mask_patch_size
        self.patches_per_square = mask_patch_size // model_patch_size
        self.count = self.squares_per_side ** 2
        self.masked = int(math.ceil(self.count * mask_ratio))

    def __call__(self) -> torch.Tensor:
        chosen = torch.randperm(self.count)[:self.masked]
        squares = torch.zeros(self.count, dtype=torch.int64)
        squares[chosen] = 1
        squares = squares.reshape(self.squares_per_side, self.squares_per_side)
        scale = self.patches_per_square
        return squares.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


class MaskedImageTransform:
    """An image transform followed by a fresh mask: PIL image -> (image tensor, mask)."""

    def __init__(self, image_transform: Callable[[Image.Image], torch.Tensor], mask_generator: MaskGenerator):
        self.image_transform = image_transform
        self.mask_generator = mask_generator

    def __call__(self, image: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.image_transform(image), self.mask_generator()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.image_transform!r}, masked squares {self.mask_generator.masked} of " \
               f"{self.mask_generator.count})"


def build_mask_generator(config: CfgNode) -> MaskGenerator:
    """The mask generator of DATA.MASK_PATCH_SIZE / DATA.MASK_RATIO for the model's patch size."""
    patch_size = config.MODEL[MODEL_SECTIONS[config.MODEL.TYPE]].PATCH_SIZE
    return MaskGenerator(config.DATA.IMG_SIZE, config.DATA.MASK_PATCH_SIZE, patch_size, config.DATA.MASK_RATIO)


def build_simmim_transform(is_train: bool, config: CfgNode) -> MaskedImageTransform:
    """SimMIM's transform: (image, mask) pairs.

    Training: RandomResizedCrop(IMG_SIZE, scale 0.67-1, ratio 3/4-4/3), horizontal flip (AUG.HFLIP) and ImageNet
    normalisation, as the reference's pretraining. Evaluation: the usual evaluation transform (resize and
    center crop, see ``data.transforms``).
    """
    if is_train:
        image_transform = transforms.Compose([
            transforms.RandomResizedCrop(config.DATA.IMG_SIZE, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
            transforms.RandomHorizontalFlip(config.AUG.HFLIP),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ])
    else:
        image_transform = build_transform(False, config)
    return MaskedImageTransform(image_transform, build_mask_generator(config))

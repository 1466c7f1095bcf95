"""The training and evaluation transforms of the workers pipeline, run on the training device in batches.

:func:`build_device_transform` reads the steps of the PIL transform that ``data.transforms`` (or
``data.masking`` for SimMIM) builds, so both pipelines follow one recipe. Each step becomes a
:class:`DeviceStep` with two halves:

- ``draw`` runs in a loader worker, per sample, inside the sample's seeded random streams (as the PIL
  transform runs in the workers pipeline) and makes exactly the random draws the PIL step makes, in the same
  order, from the same streams. For the same sample seed both pipelines therefore pick the same crop, flip,
  RandAugment ops and magnitudes, jitter and erasing boxes; only the pixels are computed elsewhere.
- ``apply`` runs on the training device on the whole batch with those parameters (``data.device_ops``).

Images start as a list of uint8 (3, H, W) tensors of different sizes; the geometric steps crop and resize
each one, and from the first step that gives every image the same size on they are one float batch.
"""
import math
import random
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import _LEVEL_DENOM, AugmentOp, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import functional as TF

from config import ConfigError
from data import device_ops as ops
from data.masking import MaskedImageTransform
from data.transforms import LimitAspectRatio, ResizeIfNeeded

Images = Union[List[torch.Tensor], torch.Tensor]
Size = Tuple[int, int]  # (height, width)
Params = Dict[str, Any]

_MODES = {transforms.InterpolationMode.BICUBIC: "bicubic", transforms.InterpolationMode.BILINEAR: "bilinear",
          Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}
_UNSUPPORTED = "DATA.PIPELINE device cannot run {what}; use DATA.PIPELINE workers (or {fix})"


def _mode(interpolation: Any, what: str) -> str:
    if interpolation not in _MODES:
        name = getattr(interpolation, "value", None) if isinstance(interpolation, transforms.InterpolationMode) else \
            getattr(interpolation, "name", str(interpolation)).lower()
        raise ConfigError(_UNSUPPORTED.format(what=f"{what} with {name} interpolation",
                                              fix="DATA.INTERPOLATION bicubic, bilinear or random"))
    return _MODES[interpolation]


def _size_of(height: int, width: int) -> torch.Tensor:
    """A tensor that torchvision's and timm's parameter functions read the image size from (no memory)."""
    return torch.empty(()).expand(1, height, width)


class DeviceStep:
    """One step of the transform: per-sample parameters drawn on the host, applied to the batch on the device."""

    def draw(self, size: Size) -> Tuple[Params, Size]:
        """This step's parameters for an image of ``size``, and the size it leaves."""
        return {}, size

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        raise NotImplementedError


class CropResize(DeviceStep):
    """Crop boxes resized to an output size, one image at a time: random resized crops, resizes, center crops.

    Args:
        box: ``(height, width) -> (top, left, crop height, crop width, out height, out width)``, drawing from
            the random streams where the PIL step does.
        mode: ``bicubic`` or ``bilinear``; a side whose size does not change is not resampled.
        to_batch: the outputs all have one size: stack them.
    """

    def __init__(self, box: Callable[[Size], Sequence[int]], mode: str, to_batch: bool):
        self.box = box
        self.mode = mode
        self.to_batch = to_batch

    def draw(self, size: Size) -> Tuple[Params, Size]:
        box = [int(v) for v in self.box(size)]
        return {"box": box}, (box[4], box[5])

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        boxes = params["box"].tolist()
        out = [ops.resized_crop(image, *box[:4], box[4:], self.mode) for image, box in zip(images, boxes)]
        return torch.stack(out) if self.to_batch else out


def _timm_random_resized_crop(step: RandomResizedCropAndInterpolation, modes: Sequence[str]) -> DeviceStep:
    def box(size: Size) -> Sequence[int]:
        top, left, height, width = step.get_params(_size_of(*size), step.scale, step.ratio)
        return top, left, height, width, *step.size

    if len(modes) == 1:
        return CropResize(box, modes[0], to_batch=True)
    return RandomInterpolationCrop(box, modes)


class RandomInterpolationCrop(CropResize):
    """timm's random resized crop with DATA.INTERPOLATION random: the filter is drawn per image, after the box."""

    def __init__(self, box: Callable[[Size], Sequence[int]], modes: Sequence[str]):
        super().__init__(box, modes[0], to_batch=True)
        self.modes = list(modes)

    def draw(self, size: Size) -> Tuple[Params, Size]:
        params, size = super().draw(size)
        params["mode"] = self.modes.index(random.choice(self.modes))
        return params, size

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        boxes, modes = params["box"].tolist(), params["mode"].tolist()
        return torch.stack([ops.resized_crop(image, *box[:4], box[4:], self.modes[mode])
                            for image, box, mode in zip(images, boxes, modes)])


def _center_box(size: Size, crop: Size) -> List[int]:
    """torchvision's center crop of ``crop`` (height, width) from ``size``."""
    top, left = int(round((size[0] - crop[0]) / 2.0)), int(round((size[1] - crop[1]) / 2.0))
    if top < 0 or left < 0:
        raise ValueError(f"cannot center-crop {crop} from an image of {size}")
    return [top, left, crop[0], crop[1], crop[0], crop[1]]


class Flip(DeviceStep):
    """RandomHorizontalFlip: ``torch.rand(1) < p`` per image, as torchvision draws it."""

    def __init__(self, probability: float):
        self.probability = probability

    def draw(self, size: Size) -> Tuple[Params, Size]:
        return {"flip": bool(torch.rand(1) < self.probability)}, size

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        flip = params["flip"].to(images.device)
        return torch.where(flip.reshape(-1, 1, 1, 1), images.flip(-1), images)


class PadCrop(DeviceStep):
    """RandomCrop(size, padding): zero padding, then a crop at an offset drawn with ``torch.randint``."""

    def __init__(self, step: transforms.RandomCrop):
        if not isinstance(step.padding, int) or step.padding_mode != "constant" or step.fill != 0 or \
                step.pad_if_needed:
            raise ConfigError(_UNSUPPORTED.format(what=repr(step), fix="images above 32 px"))
        self.step = step

    def draw(self, size: Size) -> Tuple[Params, Size]:
        pad = self.step.padding
        top, left, height, width = self.step.get_params(_size_of(size[0] + 2 * pad, size[1] + 2 * pad),
                                                        self.step.size)
        return {"offset": [top, left]}, (height, width)

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        pad = self.step.padding
        height, width = self.step.size
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        offsets = params["offset"].to(images.device)
        rows = offsets[:, 0, None] + torch.arange(height, device=images.device)  # (N, h)
        columns = offsets[:, 1, None] + torch.arange(width, device=images.device)  # (N, w)
        n, c = images.shape[:2]
        picked = padded.gather(2, rows[:, None, :, None].expand(n, c, height, padded.shape[3]))
        return picked.gather(3, columns[:, None, None, :].expand(n, c, height, width))


# RandAugment ops by timm's name: what the op does on the device with the arguments its level function gave.
_POINT_OPS = {
    "AutoContrast": lambda x, v: ops.autocontrast(x),
    "Equalize": lambda x, v: ops.equalize(x),
    "Invert": lambda x, v: ops.invert(x),
    "Posterize": ops.posterize, "PosterizeIncreasing": ops.posterize, "PosterizeOriginal": ops.posterize,
    "Solarize": ops.solarize, "SolarizeIncreasing": ops.solarize,
    "SolarizeAdd": ops.solarize_add,
    "Color": ops.adjust_color, "ColorIncreasing": ops.adjust_color,
    "Contrast": ops.adjust_contrast, "ContrastIncreasing": ops.adjust_contrast,
    "Brightness": ops.adjust_brightness, "BrightnessIncreasing": ops.adjust_brightness,
    "Sharpness": ops.adjust_sharpness, "SharpnessIncreasing": ops.adjust_sharpness,
}


def _affine_matrix(name: str, args: Sequence[float], size: Size) -> Tuple[float, ...]:
    """The inverse matrix that timm's geometric op hands to PIL for an image of ``size``."""
    height, width = size
    if name == "Rotate":
        return ops.rotation_matrix(args[0], width, height)
    return {"ShearX": (1, args[0], 0, 0, 1, 0), "ShearY": (1, 0, 0, args[0], 1, 0),
            "TranslateX": (1, 0, args[0], 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, args[0]),
            "TranslateXRel": (1, 0, args[0] * width, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, args[0] * height),
            }[name]


_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel")


class RandAugmentStep(DeviceStep):
    """timm's RandAugment: per image, ``num_layers`` ops chosen with numpy, each applied with its probability and
    a magnitude drawn as ``AugmentOp.__call__`` draws it; on the device each op runs on the images that chose it."""

    def __init__(self, step: RandAugment):
        self.step = step
        self.names = [op.name for op in step.ops]
        unknown = sorted({name for name in self.names if name not in _POINT_OPS and name not in _GEOMETRIC_OPS})
        if unknown:
            raise ConfigError(_UNSUPPORTED.format(what=f"the RandAugment ops {', '.join(unknown)}",
                                                  fix="a rand-* AUG.AUTO_AUGMENT policy of the standard ops"))
        fills = {tuple(op.kwargs["fillcolor"]) for op in step.ops}
        self.fill = fills.pop() if len(fills) == 1 else (128, 128, 128)

    def draw(self, size: Size) -> Tuple[Params, Size]:
        step = self.step
        chosen = np.random.choice(len(step.ops), step.num_layers, replace=step.choice_weights is None,
                                  p=step.choice_weights)
        params: Params = {"op": [], "on": [], "value": [], "matrix": [], "bicubic": []}
        for index in chosen:
            op: AugmentOp = step.ops[index]
            on, value, matrix, bicubic = self._draw_op(op, size)
            params["op"].append(int(index))
            params["on"].append(on)
            params["value"].append(value)
            params["matrix"].append(matrix)
            params["bicubic"].append(bicubic)
        return params, size

    @staticmethod
    def _draw_op(op: AugmentOp, size: Size) -> Tuple[bool, float, Tuple[float, ...], bool]:
        """What ``AugmentOp.__call__`` draws: applied or not, its magnitude, the level arguments (some negated at
        random) and, for geometric ops, the resampling filter."""
        identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        if op.prob < 1.0 and random.random() > op.prob:
            return False, 0.0, identity, True
        magnitude = op.magnitude
        if op.magnitude_std > 0:
            if op.magnitude_std == float("inf"):
                magnitude = random.uniform(0, magnitude)
            else:
                magnitude = random.gauss(magnitude, op.magnitude_std)
        magnitude = max(0.0, min(magnitude, op.magnitude_max or _LEVEL_DENOM))
        args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        if op.name not in _GEOMETRIC_OPS:
            return True, float(args[0]) if args else 0.0, identity, True
        resample = op.kwargs["resample"]
        if isinstance(resample, (list, tuple)):
            resample = random.choice(resample)
        return True, 0.0, _affine_matrix(op.name, args, size), _mode(resample, "RandAugment") == "bicubic"

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        chosen, on = params["op"], params["on"]
        for layer in range(chosen.shape[1]):
            for index in chosen[:, layer][on[:, layer]].unique().tolist():
                rows = torch.nonzero(on[:, layer] & (chosen[:, layer] == index)).flatten()
                name = self.names[index]
                subset = images[rows.to(images.device)]
                if name in _GEOMETRIC_OPS:
                    result = ops.affine(subset, params["matrix"][rows, layer], params["bicubic"][rows, layer],
                                        self.fill)
                else:
                    result = _POINT_OPS[name](subset, params["value"][rows, layer])
                images = images.index_copy(0, rows.to(images.device), result)
        return images


class ColorJitterStep(DeviceStep):
    """torchvision's ColorJitter on PIL images (brightness, contrast, saturation; their order drawn per image)."""

    def __init__(self, step: transforms.ColorJitter):
        if step.hue is not None:
            raise ConfigError(_UNSUPPORTED.format(what="colour jitter of the hue", fix="no hue jitter"))
        self.step = step

    def draw(self, size: Size) -> Tuple[Params, Size]:
        order, brightness, contrast, saturation, _ = self.step.get_params(
            self.step.brightness, self.step.contrast, self.step.saturation, self.step.hue)
        factors = [math.nan if f is None else float(f) for f in (brightness, contrast, saturation)]
        return {"order": order.tolist(), "factor": factors}, size

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        adjust = (ops.adjust_brightness, ops.adjust_contrast, ops.adjust_color)
        order, factors = params["order"], params["factor"]
        for position in range(order.shape[1]):
            for fn_id, fn in enumerate(adjust):
                rows = torch.nonzero((order[:, position] == fn_id) & ~factors[:, fn_id].isnan()).flatten()
                if len(rows):
                    device_rows = rows.to(images.device)
                    images = images.index_copy(0, device_rows, fn(images[device_rows], factors[rows, fn_id]))
        return images


class ToFloat(DeviceStep):
    """ToTensor: 0..255 values to 0..1."""

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        if isinstance(images, list):
            images = torch.stack([image.float() for image in images])
        return images / 255.0


class Normalize(DeviceStep):
    def __init__(self, step: transforms.Normalize):
        self.mean = torch.as_tensor(step.mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(step.std, dtype=torch.float32).reshape(1, -1, 1, 1)

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        return (images - self.mean.to(images.device)) / self.std.to(images.device)


class Erasing(DeviceStep):
    """timm's RandomErasing (after normalisation): the boxes drawn as timm draws them; the fill is standard normal
    noise per pixel (``pixel``), per channel (``rand``) or zero (``const``), from a counter-based generator
    keyed by a seed drawn with the boxes (the same noise on any device)."""

    def __init__(self, step: RandomErasing):
        if step.num_splits > 1:
            raise ConfigError(_UNSUPPORTED.format(what="random erasing with splits", fix="AUG.RECOUNT splits off"))
        self.step = step

    def draw(self, size: Size) -> Tuple[Params, Size]:
        step = self.step
        boxes = [[0, 0, 0, 0] for _ in range(step.max_count)]
        if random.random() <= step.probability:
            height, width = size
            count = step.min_count if step.min_count == step.max_count else \
                random.randint(step.min_count, step.max_count)
            for number in range(count):
                for _ in range(10):
                    target_area = random.uniform(step.min_area, step.max_area) * height * width / count
                    aspect_ratio = math.exp(random.uniform(*step.log_aspect_ratio))
                    h = int(round(math.sqrt(target_area * aspect_ratio)))
                    w = int(round(math.sqrt(target_area / aspect_ratio)))
                    if w < width and h < height:
                        top, left = random.randint(0, height - h), random.randint(0, width - w)
                        boxes[number] = [top, left, h, w]
                        break
        # Drawn after everything timm draws, so that the boxes follow timm's streams exactly.
        return {"boxes": boxes, "noise_seed": random.getrandbits(62)}, size

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        boxes = params["boxes"]  # (N, count, 4)
        erased = torch.nonzero((boxes[:, :, 2] > 0).any(dim=1)).flatten()
        if not len(erased):
            return images
        device = images.device
        n, channels, height, width = len(erased), *images.shape[1:]
        subset = images[erased.to(device)]
        ys = torch.arange(height, device=device).reshape(1, height, 1)
        xs = torch.arange(width, device=device).reshape(1, 1, width)
        for number in range(boxes.shape[1]):
            top, left, h, w = (boxes[erased, number, k].to(device).reshape(n, 1, 1) for k in range(4))
            inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)  # (n, H, W)
            seeds = params["noise_seed"][erased] + number
            if self.step.per_pixel:
                fill = ops.normal_noise(seeds, (channels, height, width), device)
            elif self.step.rand_color:
                fill = ops.normal_noise(seeds, (channels, 1, 1), device)
            else:
                fill = torch.zeros(n, channels, 1, 1, device=device)
            subset = torch.where(inside[:, None], fill.to(subset.dtype), subset)
        return images.index_copy(0, erased.to(device), subset)


class Mask(DeviceStep):
    """SimMIM's mask: drawn by the mask generator itself, after the image's draws, as MaskedImageTransform does."""

    def __init__(self, mask_generator: Callable[[], torch.Tensor]):
        self.mask_generator = mask_generator

    def draw(self, size: Size) -> Tuple[Params, Size]:
        return {"mask": self.mask_generator().numpy()}, size

    def apply(self, images: Images, params: Dict[str, torch.Tensor]) -> Images:
        return images


class DeviceTransform:
    """A PIL transform's steps as :class:`DeviceStep` s: ``draw`` per sample on the host, ``__call__`` per batch.

    Args:
        steps: the steps in order.
        with_mask: SimMIM: the result is ``(images, masks)``.
    """

    def __init__(self, steps: List[DeviceStep], with_mask: bool = False):
        self.steps = steps
        self.with_mask = with_mask

    def draw(self, size: Size) -> Params:
        """All parameters for one image of ``size`` (height, width), keyed ``<step number>.<name>``."""
        params: Params = {}
        for number, step in enumerate(self.steps):
            drawn, size = step.draw(size)
            params.update({f"{number}.{key}": value for key, value in drawn.items()})
        return params

    def __call__(self, images: List[torch.Tensor], params: Dict[str, torch.Tensor]):
        """The batch: ``images`` uint8 (3, H, W) on the device, ``params`` collated from :meth:`draw`."""
        current: Images = images
        for number, step in enumerate(self.steps):
            prefix = f"{number}."
            current = step.apply(current, {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})
        if self.with_mask:
            mask_key = next(k for k in params if k.endswith(".mask"))
            return current, params[mask_key].to(current.device)
        return current


def build_device_transform(transform: Callable) -> DeviceTransform:
    """The device version of a PIL transform built by ``data.transforms.build_transform`` or
    ``data.masking.build_simmim_transform``.

    Raises:
        ConfigError: a step (or a setting of one) the device pipeline does not implement; the message names it.
    """
    with_mask = isinstance(transform, MaskedImageTransform)
    pil_steps = list(transform.image_transform.transforms if with_mask else transform.transforms)
    steps: List[DeviceStep] = []
    for position, step in enumerate(pil_steps):
        last_geometric = not any(isinstance(s, (transforms.Resize, transforms.CenterCrop, LimitAspectRatio))
                                 for s in pil_steps[position + 1:])
        steps.append(_device_step(step, to_batch=last_geometric))
    if with_mask:
        steps.append(Mask(transform.mask_generator))
    return DeviceTransform(steps, with_mask)


def _device_step(step: Any, to_batch: bool) -> DeviceStep:
    """The device step of one PIL step."""
    if isinstance(step, RandomResizedCropAndInterpolation):
        interpolations = step.interpolation if isinstance(step.interpolation, (list, tuple)) else [step.interpolation]
        return _timm_random_resized_crop(step, [_mode(i, "the random resized crop") for i in interpolations])
    if isinstance(step, transforms.RandomResizedCrop):
        mode = _mode(step.interpolation, "the random resized crop")
        return CropResize(lambda size: (*step.get_params(_size_of(*size), step.scale, step.ratio), *step.size), mode,
                          to_batch=True)
    if isinstance(step, ResizeIfNeeded):
        return CropResize(lambda size: (0, 0, *size, step.size, step.size), _mode(step.interpolation, repr(step)),
                          to_batch=True)
    if isinstance(step, LimitAspectRatio):
        def limited(size: Size) -> Sequence[int]:
            limit = int(step.max_ratio * min(size))
            return _center_box(size, (min(size[0], limit), min(size[1], limit)))
        return CropResize(limited, "bicubic", to_batch=False)
    if isinstance(step, transforms.Resize):
        return CropResize(lambda size: (0, 0, *size, *TF._compute_resized_output_size(size, _as_list(step.size))),
                          _mode(step.interpolation, repr(step)), to_batch=to_batch)
    if isinstance(step, transforms.CenterCrop):
        return CropResize(lambda size: _center_box(size, step.size), "bicubic", to_batch=to_batch)
    if isinstance(step, transforms.RandomCrop):
        return PadCrop(step)
    if isinstance(step, transforms.RandomHorizontalFlip):
        return Flip(step.p)
    if isinstance(step, RandAugment):
        return RandAugmentStep(step)
    if isinstance(step, transforms.ColorJitter):
        return ColorJitterStep(step)
    if isinstance(step, (transforms.ToTensor, MaybeToTensor)):
        return ToFloat()
    if isinstance(step, transforms.Normalize):
        return Normalize(step)
    if isinstance(step, RandomErasing):
        return Erasing(step)
    raise ConfigError(_UNSUPPORTED.format(what=f"the transform step {step!r}", fix="a standard DATA/AUG setting"))


def _as_list(size: Union[int, Sequence[int]]) -> List[int]:
    return [size] if isinstance(size, int) else list(size)

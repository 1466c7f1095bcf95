"""Optimizers with the reference's weight-decay exemptions and layer-wise learning-rate decay."""
import logging
import re
from typing import Dict, List, Sequence

import torch
from torch import nn
from yacs.config import CfgNode

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


def _exempt_from_decay(name: str, param: torch.Tensor, skip: Sequence[str], skip_keywords: Sequence[str]) -> bool:
    """1-D tensors (norms, biases), listed names and keyword matches get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name in skip or any(k in name for k in skip_keywords)


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Depth of a parameter for layer-wise decay: 0 for the embedding, 1.. for blocks, last for norm and head.

    Patch merging at the end of stage i sits with the last block of that stage.
    """
    total = sum(depths)
    if name.startswith(("patch_embed", "absolute_pos_embed")):
        return 0
    match = re.match(r"layers\.(\d+)\.(blocks\.(\d+)|downsample)", name)
    if match:
        stage = int(match.group(1))
        block = int(match.group(3)) if match.group(3) is not None else depths[stage] - 1
        return sum(depths[:stage]) + block + 1
    return total + 1


def model_depths(model: nn.Module) -> List[int]:
    """Blocks per stage of any Swin family (V1, V2, MLP), read from the model itself; () for other models."""
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(layer, "blocks") for layer in layers):
        return []
    return [len(layer.blocks) for layer in layers]


def parameter_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                     depths: Sequence[int] = ()) -> List[Dict]:
    """Splits parameters into decay / no-decay groups, per layer when ``layer_decay`` < 1.

    Each group carries ``lr_scale``, which timm's schedulers multiply into the learning rate.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    skip_keywords = model.no_weight_decay_keywords() if hasattr(model, "no_weight_decay_keywords") else set()
    use_layers = layer_decay < 1.0 and depths
    num_layers = sum(depths) + 1
    groups: Dict[str, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = _exempt_from_decay(name, param, skip, skip_keywords)
        layer = swin_layer_id(name, depths) if use_layers else 0
        key = f"layer{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            scale = layer_decay ** (num_layers - layer) if use_layers else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
                           "names": []}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(config: CfgNode, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`parameter_groups`; AdamW is the fused kernel on CUDA."""
    opt = config.TRAIN.OPTIMIZER
    depths = model_depths(model)
    groups = parameter_groups(model, config.TRAIN.WEIGHT_DECAY, config.TRAIN.LAYER_DECAY, depths)
    for group in groups:
        del group["names"]
    name = opt.NAME.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=config.TRAIN.BASE_LR, betas=tuple(opt.BETAS), eps=opt.EPS,
                                 weight_decay=config.TRAIN.WEIGHT_DECAY, fused=device.type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=config.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True,
                               weight_decay=config.TRAIN.WEIGHT_DECAY)
    raise ValueError(f"unknown TRAIN.OPTIMIZER.NAME {opt.NAME!r}; valid names: {', '.join(OPTIMIZERS)}")

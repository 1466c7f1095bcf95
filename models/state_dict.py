"""Loading state dicts from released and foreign checkpoints into our models."""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.simmim import is_simmim_state_dict, simmim_to_encoder

logger = logging.getLogger(__name__)

# Buffers that released checkpoints carry but that are derived from shapes, not learned.
DERIVED_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask", "relative_coords_table")
# The classifier, in our layout; the only tensors whose shape follows the class count.
HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class LoadReport:
    """What happened to each key when a state dict was loaded."""
    loaded: List[str] = field(default_factory=list)
    dropped_derived: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)
    class_mapped: List[str] = field(default_factory=list)  # head tensors whose rows a class map selected
    reinitialised: List[str] = field(default_factory=list)  # a new head, set to zeros as the reference does
    simmim_dropped: List[str] = field(default_factory=list)  # a SimMIM checkpoint's decoder and mask token
    pruned: List[str] = field(default_factory=list)  # what a backbone does not have (head, final norm, later stages)
    from_classifier: bool = False  # a classifier's weights taken as a SimMIM model's encoder

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.from_classifier:
            parts.insert(0, "classifier checkpoint: its weights taken as the SimMIM encoder (prefix encoder. added)")
        elif self.simmim_dropped:
            parts.insert(0, "SimMIM pretraining checkpoint: its encoder taken (prefix encoder. removed)")
        for name in ("resized", "class_mapped", "reinitialised", "dropped_derived", "simmim_dropped", "pruned",
                     "missing", "unexpected"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                label = {"reinitialised": "new, as initialised" if self.from_classifier
                         else "new head initialised to zeros",
                         "simmim_dropped": "dropped (no head in SimMIM)" if self.from_classifier
                         else "dropped (pretraining only)",
                         "pruned": "dropped (not in the backbone)"}.get(name, name.replace("_", " "))
                parts.append(f"{label}: {shown}")
        return "; ".join(parts)


def drop_derived_buffers(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Removes the derived buffers (relative position indices, attention masks) of released checkpoints.

    Returns:
        The learned tensors, and the keys that were dropped.
    """
    dropped = [k for k in state_dict if k.endswith(DERIVED_BUFFER_SUFFIXES)]
    return {k: v for k, v in state_dict.items() if k not in dropped}, dropped


# Learned tensors whose shapes follow the attention window or the image size, not the architecture's widths.
POSITION_KEYS = ("relative_position_bias_table", "absolute_pos_embed")


def _what_differs(report: LoadReport, mismatched: List[str]) -> str:
    """Which settings a failed load points at, from the keys that did not fit."""
    causes = []
    if report.missing or report.unexpected or any(not k.endswith(POSITION_KEYS) and k not in HEAD_KEYS
                                                  for k in mismatched):
        causes.append("another architecture? check MODEL.TYPE and MODEL.SWIN.*")
    if any(k.endswith(POSITION_KEYS) for k in mismatched):
        causes.append("other windows? check MODEL.SWIN.WINDOW_SIZE and DATA.IMG_SIZE, which clips the window of "
                      "each stage whose map is smaller")
    if any(k in HEAD_KEYS for k in mismatched):
        causes.append("another class count? check MODEL.NUM_CLASSES")
    return "; ".join(causes)


def drop_pruned(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Removes the tensors of the parts that ``model`` pruned (``WindowTransformer.prune_intermediate_layers``: a
    backbone has no head, and may lack the final norm and later stages), so a full checkpoint fits it.

    Returns:
        The other tensors, and the keys that were dropped.
    """
    prefixes = tuple(getattr(model, "pruned_prefixes", ()))
    dropped = [k for k in state_dict if k.startswith(prefixes)] if prefixes else []
    return {k: v for k, v in state_dict.items() if k not in dropped}, dropped


def load_state_dict_checked(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True,
                            source: str = "checkpoint") -> LoadReport:
    """Loads learned tensors into ``model`` after dropping derived buffers, and reports every key.

    Args:
        strict: raise when a learned key is missing or unexpected, or a shape differs.
        source: names the checkpoint in messages.

    Raises:
        ValueError: with ``strict``, listing what did not match.
    """
    state_dict, dropped = drop_derived_buffers(state_dict)
    state_dict, pruned = drop_pruned(state_dict, model)
    own = model.state_dict()
    report = LoadReport(dropped_derived=dropped, pruned=pruned)
    report.missing = [k for k in own if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if strict and (report.missing or report.unexpected or mismatched):
        raise ValueError(
            f"{source} does not fit this model ({_what_differs(report, [m.split(':')[0] for m in mismatched])}): "
            f"missing {report.missing[:8]}, unexpected {report.unexpected[:8]}, shape mismatches {mismatched[:8]}")
    loadable = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    report.loaded = list(loadable)
    if report.missing or report.unexpected:
        logger.warning("loading %s: %s", source, report.summary())
    return report


def is_timm_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    """timm's Swin puts patch merging at the start of the next stage and names the head ``head.fc``."""
    has_downsample = any(".downsample." in k for k in state_dict)
    first_stage_downsamples = any(k.startswith("layers.0.downsample.") for k in state_dict)
    return any(k.startswith("head.fc.") for k in state_dict) or (has_downsample and not first_stage_downsamples)


def _shift_downsample(key: str, offset: int) -> str:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":
        parts[1] = str(int(parts[1]) + offset)
    return ".".join(parts)


def timm_to_ours(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames a timm Swin state dict to the reference layout used here."""
    converted = {}
    for key, value in state_dict.items():
        key = _shift_downsample(key, -1)
        if key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        converted[key] = value
    return converted


def ours_to_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Renames a reference-layout state dict to timm's Swin layout (derived buffers dropped).

    Raises:
        ValueError: the model uses an absolute position embedding, which timm's Swin does not have.
    """
    state_dict, _ = drop_derived_buffers(state_dict)
    if "absolute_pos_embed" in state_dict:
        raise ValueError("timm's Swin Transformer has no absolute position embedding (APE); "
                         "a model trained with MODEL.SWIN.APE True cannot be converted")
    converted = {}
    for key, value in state_dict.items():
        key = _shift_downsample(key, 1)
        if key.startswith("head."):
            key = "head.fc." + key[len("head."):]
        converted[key] = value
    return converted


def resize_relative_position_bias_table(table: torch.Tensor, window_size: int) -> torch.Tensor:
    """Bicubic resize of a ((2w-1)^2, heads) table to another window, each head separately."""
    old_side = int(round(table.shape[0] ** 0.5))
    new_side = 2 * window_size - 1
    if old_side == new_side:
        return table
    heads = table.shape[1]
    grid = table.T.reshape(1, heads, old_side, old_side).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return grid.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


def resize_absolute_pos_embed(pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of a (1, h*w, C) absolute position embedding (square source grid) to height x width."""
    side = int(round(pos.shape[1] ** 0.5))
    if side * side == height * width and side == height:
        return pos
    grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, height * width, -1).to(pos.dtype)


def adapt_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module,
                     class_map: Optional[List[int]] = None) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """Fits a pretrained Swin state dict to ``model`` for fine-tuning.

    A SimMIM pretraining state dict (``encoder.*``, ``decoder.*``) gives its encoder (see
    :func:`models.simmim.simmim_to_encoder`). Derived buffers are dropped; relative position bias tables and the absolute position embedding
    are resized bicubically to the model's windows and resolution. With ``class_map`` (one pretrained
    row per class of the model) the head takes those rows, whatever the two class counts are. Without
    it, a head of another size, or no head in the checkpoint, gives a new head initialised to zeros (as the
    reference's fine-tuning does), with a warning.

    Raises:
        ValueError: an unexpected learned key, a missing one other than the head, a shape that cannot be
            adapted, or a class map that does not fit the model or the pretrained head.
    """
    if is_timm_layout(state_dict):
        state_dict = timm_to_ours(state_dict)
    own = model.state_dict()
    simmim_dropped: List[str] = []
    new_for_simmim: List[str] = []
    if is_simmim_state_dict(state_dict) and not is_simmim_state_dict(own):
        state_dict, simmim_dropped = simmim_to_encoder(state_dict)
    elif is_simmim_state_dict(own) and not is_simmim_state_dict(state_dict):
        # A classifier's weights are the encoder of a SimMIM model, without the prefix; its head has no place there.
        simmim_dropped = [k for k in state_dict if k in HEAD_KEYS]
        state_dict = {f"encoder.{k}": v for k, v in state_dict.items() if k not in HEAD_KEYS}
        new_for_simmim = [k for k in own if not k.startswith("encoder.") or k == "encoder.mask_token"]
    state_dict, dropped = drop_derived_buffers(state_dict)
    state_dict, pruned = drop_pruned(state_dict, model)
    report = LoadReport(dropped_derived=dropped, simmim_dropped=simmim_dropped, pruned=pruned)
    report.from_classifier = bool(new_for_simmim)
    adapted: Dict[str, torch.Tensor] = {k: own[k] for k in new_for_simmim}  # as the model initialised them
    report.reinitialised.extend(new_for_simmim)
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target = own[key].shape
        if key.endswith("relative_position_bias_table") and value.shape != target:
            window = int(round((target[0] ** 0.5 + 1) / 2))
            if value.shape[1] != target[1]:
                raise ValueError(f"{key}: {value.shape[1]} heads in the checkpoint, {target[1]} in the model")
            value = resize_relative_position_bias_table(value, window)
            report.resized.append(key)
        elif key.endswith("absolute_pos_embed") and value.shape != target:
            height, width = getattr(model, "encoder", model).patch_embed.patches_resolution
            value = resize_absolute_pos_embed(value, height, width)
            report.resized.append(key)
        elif key in HEAD_KEYS and (class_map is not None or value.shape != target):
            value = _adapt_head(key, value, target, class_map, report)
        if value.shape != target:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} cannot be adapted to the model's "
                             f"{tuple(target)}; is it another architecture? check MODEL.SWIN.*")
        adapted[key] = value
    absent_head = [k for k in HEAD_KEYS if k in own and k not in state_dict]
    if absent_head:
        logger.warning("the pretrained weights have no classifier head (%s); the new head is initialised to zeros",
                       ", ".join(absent_head))
        report.reinitialised.extend(absent_head)
        adapted.update({k: torch.zeros_like(own[k]) for k in absent_head})
    report.missing = [k for k in own if k not in adapted]
    if report.unexpected or report.missing:
        raise ValueError(f"pretrained weights do not fit this model: unexpected {report.unexpected[:8]}, "
                         f"missing {report.missing[:8]}; is it another architecture? check MODEL.SWIN.*")
    report.loaded = [k for k in adapted if k not in report.reinitialised]
    return adapted, report


def _adapt_head(key: str, value: torch.Tensor, target: torch.Size, class_map: Optional[List[int]],
                report: LoadReport) -> torch.Tensor:
    """Selects the mapped rows of a pretrained head, or gives a new head of zeros (the reference's choice: a
    fine-tuned head starts from zero logits, so the first updates do not push random features around)."""
    if class_map is not None:
        if len(class_map) != target[0]:
            raise ValueError(f"the class map has {len(class_map)} entries but the model has {target[0]} classes "
                             "(MODEL.NUM_CLASSES); it needs one pretrained row per class of the model")
        if max(class_map) >= value.shape[0] or min(class_map) < 0:
            raise ValueError(f"the class map names rows {min(class_map)}..{max(class_map)} but the pretrained "
                             f"head has rows 0..{value.shape[0] - 1}")
        report.class_mapped.append(key)
        return value[torch.as_tensor(class_map)]
    if key == "head.weight":  # one warning for the head, not one per tensor
        logger.warning("pretrained head has %d classes, the model %d; the new head is initialised to zeros (give "
                       "MODEL.PRETRAINED_CLASS_MAP to keep mapped rows)", value.shape[0], target[0])
    report.reinitialised.append(key)
    return torch.zeros(target, dtype=value.dtype)

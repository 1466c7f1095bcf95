"""Loading state dicts from released and foreign checkpoints into our models."""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Buffers that released checkpoints carry but that are derived from shapes, not learned.
DERIVED_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")


@dataclass
class LoadReport:
    """What happened to each key when a state dict was loaded."""
    loaded: List[str] = field(default_factory=list)
    dropped_derived: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)
    reinitialised: List[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        for name in ("resized", "reinitialised", "dropped_derived", "missing", "unexpected"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{name.replace('_', ' ')}: {shown}")
        return "; ".join(parts)


def drop_derived_buffers(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Removes the derived buffers (relative position indices, attention masks) of released checkpoints.

    Returns:
        The learned tensors, and the keys that were dropped.
    """
    dropped = [k for k in state_dict if k.endswith(DERIVED_BUFFER_SUFFIXES)]
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
    own = model.state_dict()
    report = LoadReport(dropped_derived=dropped)
    report.missing = [k for k in own if k not in state_dict]
    report.unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if strict and (report.missing or report.unexpected or mismatched):
        raise ValueError(
            f"{source} does not fit this model (is it another architecture or size? check MODEL.SWIN.* and "
            f"MODEL.NUM_CLASSES): missing {report.missing[:8]}, unexpected {report.unexpected[:8]}, "
            f"shape mismatches {mismatched[:8]}")
    loadable = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    report.loaded = list(loadable)
    if report.missing or report.unexpected:
        logger.warning("loading %s: %s", source, report.summary())
    return report

"""Model registry: ``MODEL.TYPE`` -> a builder that reads its own config section."""
import logging
from typing import Callable, Dict, Optional, Sequence, Union

from torch import nn
from yacs.config import CfgNode

from models.simmim import build_simmim
from models.swin_mlp import SwinMLP
from models.swin_transformer import SwinTransformer, WindowTransformer
from models.swin_transformer_v2 import SwinTransformerV2

logger = logging.getLogger(__name__)

_BUILDERS: Dict[str, Callable[[CfgNode], nn.Module]] = {}


def register_model(model_type: str) -> Callable:
    """Decorator: registers ``builder(config) -> nn.Module`` under ``model_type``."""
    def wrap(builder: Callable[[CfgNode], nn.Module]) -> Callable[[CfgNode], nn.Module]:
        if model_type in _BUILDERS:
            raise ValueError(f"model type {model_type!r} is registered twice")
        _BUILDERS[model_type] = builder
        return builder
    return wrap


def registered_model_types() -> list:
    """The values ``MODEL.TYPE`` may take, sorted."""
    return sorted(_BUILDERS)


def _builder(config: CfgNode) -> Callable[[CfgNode], nn.Module]:
    model_type = config.MODEL.TYPE
    if model_type not in _BUILDERS:
        raise ValueError(f"unknown MODEL.TYPE {model_type!r}; registered types: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[model_type]


def build_model(config: CfgNode) -> nn.Module:
    """The model named by ``config.MODEL.TYPE``, randomly initialised; with ``TRAIN.OBJECTIVE simmim``, the SimMIM
    model on that family's encoder (``forward(images, mask)`` returns the loss)."""
    if config.TRAIN.OBJECTIVE == "simmim":
        return build_simmim(config, _builder(config))
    return _builder(config)(config)


def build_backbone(config: CfgNode, out_indices: Optional[Union[int, Sequence[int]]] = None, norm: bool = False,
                   output_fmt: str = "NCHW") -> WindowTransformer:
    """The family of ``MODEL.TYPE`` as a feature extractor for dense tasks (timm's ``features_only``):
    ``forward(images)`` returns the maps of the stages ``out_indices`` (all by default), ``feature_info`` gives
    their channels, strides and modules (see ``WindowTransformer.as_backbone``).

    With ``MODEL.PRETRAINED`` set, those weights are loaded as for fine-tuning (``checkpoint.load_pretrained``): a
    released or trained classifier, a timm or SimMIM checkpoint; the head and anything else the backbone dropped
    are left out and reported, windows and the position embedding are adapted. ``TRAIN.OBJECTIVE`` plays no part.

    Raises:
        ValueError: an unknown model type, or stage indices out of range.
        checkpoint.CheckpointError: pretrained weights that cannot be read or do not fit.
    """
    model = _builder(config)(config)
    if not isinstance(model, WindowTransformer):
        raise ValueError(f"MODEL.TYPE {config.MODEL.TYPE!r} builds a {type(model).__name__}, which has no backbone API "
                         "(forward_intermediates and as_backbone come with models.swin_transformer.WindowTransformer)")
    backbone = model.as_backbone(out_indices, norm, output_fmt)
    if config.MODEL.PRETRAINED:
        from checkpoint import load_pretrained  # checkpoint imports the training loop; only needed here

        load_pretrained(config, backbone)
    return backbone


def _trunk_args(config: CfgNode, section: CfgNode) -> dict:
    """Constructor arguments every family takes: from its own config section and the shared keys."""
    return dict(
        img_size=config.DATA.IMG_SIZE, patch_size=section.PATCH_SIZE, in_chans=section.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES, embed_dim=section.EMBED_DIM, depths=section.DEPTHS,
        num_heads=section.NUM_HEADS, window_size=section.WINDOW_SIZE, mlp_ratio=section.MLP_RATIO,
        drop_rate=config.MODEL.DROP_RATE, drop_path_rate=config.MODEL.DROP_PATH_RATE, ape=section.APE,
        patch_norm=section.PATCH_NORM, use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        fused_window_process=config.FUSED_WINDOW_PROCESS)


@register_model("swin")
def build_swin(config: CfgNode) -> SwinTransformer:
    swin = config.MODEL.SWIN
    return SwinTransformer(**_trunk_args(config, swin), qkv_bias=swin.QKV_BIAS, qk_scale=swin.QK_SCALE,
                           attn_impl=swin.ATTN_IMPL)


@register_model("swinv2")
def build_swinv2(config: CfgNode) -> SwinTransformerV2:
    swin = config.MODEL.SWINV2
    return SwinTransformerV2(**_trunk_args(config, swin), qkv_bias=swin.QKV_BIAS,
                             pretrained_window_sizes=swin.PRETRAINED_WINDOW_SIZES, attn_impl=swin.ATTN_IMPL)


@register_model("swin_mlp")
def build_swin_mlp(config: CfgNode) -> SwinMLP:
    return SwinMLP(**_trunk_args(config, config.MODEL.SWIN_MLP))

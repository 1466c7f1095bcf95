"""Models: ``build_model(config)`` and the registry behind it."""
from models.build import build_backbone, build_model, register_model
from models.swin_mlp import SwinMLP
from models.swin_transformer import SwinTransformer
from models.swin_transformer_v2 import SwinTransformerV2

__all__ = ["build_backbone", "build_model", "register_model", "SwinMLP", "SwinTransformer", "SwinTransformerV2"]

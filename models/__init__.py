"""Models: ``build_model(config)`` and the registry behind it."""
from models.build import build_model, register_model
from models.swin_transformer import SwinTransformer

__all__ = ["build_model", "register_model", "SwinTransformer"]

"""SimMIM (Xie et al., CVPR 2022): masked image modelling on a Swin (V1 or V2) encoder, in the reference's layout.

The encoder is the family's own classifier built without a head (``num_classes`` 0) with one learned
``mask_token`` added; its trunk (embedding, stages, final norm) is used as it is. The decoder is a 1x1
convolution to ``stride^2 * in_chans`` channels and a PixelShuffle back to the image size. State-dict keys are
those of the reference's pretraining checkpoints: ``encoder.*`` (``encoder.mask_token`` included) and
``decoder.0.*``.
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from models.swin_transformer import WindowTransformer

logger = logging.getLogger(__name__)

# Keys of a SimMIM pretraining checkpoint that fine-tuning never takes: the pixel decoder and the mask token.
PRETRAINING_ONLY = ("decoder.", "encoder.mask_token")


def local_statistics(images: torch.Tensor, patch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean and standard deviation of the ``patch_size`` x ``patch_size`` window around each pixel.

    Windows at the border count only the pixels inside the image; the variance is the unbiased one, and
    1e-6 is added under the square root (the reference's target normalisation).

    Args:
        images: (B, C, H, W).
        patch_size: odd window side.
    """
    if patch_size % 2 != 1:
        raise ValueError(f"the target normalisation window must have an odd side, got {patch_size}")
    pad = patch_size // 2
    mean = F.avg_pool2d(images, patch_size, stride=1, padding=pad, count_include_pad=False)
    mean_of_squares = F.avg_pool2d(images * images, patch_size, stride=1, padding=pad, count_include_pad=False)
    # Pixels inside each window (fewer at the border): pool a map of ones, summing instead of averaging.
    ones = torch.ones_like(images[:1, :1])
    count = F.avg_pool2d(ones, patch_size, stride=1, padding=pad, divisor_override=1)
    variance = ((mean_of_squares - mean * mean) * (count / (count - 1))).clamp(min=0.0)
    return mean, (variance + 1e-6).sqrt()


def normalize_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each pixel minus the mean, over the std, of the window around it (see :func:`local_statistics`)."""
    mean, std = local_statistics(images, patch_size)
    return (images - mean) / std


class SimMIM(nn.Module):
    """Masked image modelling: ``forward(images, mask)`` returns the masked L1 reconstruction loss.

    Args:
        encoder: a :class:`WindowTransformer` without head; it gets a ``mask_token`` parameter.
        norm_target_patch_size: window of the target normalisation, or None for raw pixel targets.
    """

    def __init__(self, encoder: WindowTransformer, norm_target_patch_size: Optional[int] = None):
        super().__init__()
        if encoder.num_classes != 0:
            raise ValueError("the SimMIM encoder is built without a head (num_classes 0)")
        self.encoder = encoder
        encoder.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        trunc_normal_(encoder.mask_token, std=0.02)
        self.patch_size = encoder.patch_embed.patch_size
        self.in_chans = encoder.patch_embed.in_chans
        self.encoder_stride = self.patch_size * 2 ** (encoder.num_layers - 1)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.encoder_stride ** 2 * self.in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride))
        self.norm_target_patch_size = norm_target_patch_size

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images and a (B, H/p, W/p) mask (1 = masked) -> (B, C, H/stride, W/stride) features.

        Masked patch tokens are replaced by ``mask_token`` after the patch embedding (and its norm), before the
        absolute position embedding; the rest is the encoder's own trunk.
        """
        encoder = self.encoder
        tokens = encoder.patch_embed(images)  # (B, H/p, W/p, C)
        weight = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - weight) + encoder.mask_token.to(tokens.dtype) * weight
        if encoder.ape:
            tokens = tokens + encoder._position_embedding(tokens.shape[1], tokens.shape[2])
        x = encoder.pos_drop(tokens)
        for layer in encoder.layers:
            x = layer(x)
        return encoder.norm(x).permute(0, 3, 1, 2)

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoded image (B, C_in, H, W), in the space of the (possibly normalised) targets."""
        return self.decoder(self.encode(images, mask))

    def pixel_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The (B, H/p, W/p) patch mask expanded to (B, 1, H, W) pixels."""
        return mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """What the decoder is trained to output: the images, normalised locally when configured."""
        if self.norm_target_patch_size is None:
            return images
        return normalize_targets(images, self.norm_target_patch_size)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mean L1 error over masked pixels and channels: a 0-d float32 tensor."""
        reconstruction = self.reconstruct(images, mask).float()
        targets = self.targets(images.float())
        pixel_mask = self.pixel_mask(mask).to(reconstruction.dtype)
        error = (reconstruction - targets).abs() * pixel_mask
        return error.sum() / (pixel_mask.sum() + 1e-5) / self.in_chans

    @torch.no_grad()
    def visualize(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rows of (input, masked input, input with the masked pixels reconstructed) for each image, in the input's
        (normalised) space: (3 * B, C, H, W). With target normalisation the reconstruction is brought back with the
        input's local mean and standard deviation."""
        reconstruction = self.reconstruct(images, mask).float()
        if self.norm_target_patch_size is not None:
            mean, std = local_statistics(images.float(), self.norm_target_patch_size)
            reconstruction = reconstruction * std + mean
        pixel_mask = self.pixel_mask(mask).to(images.dtype)
        masked = images * (1 - pixel_mask)
        filled = images * (1 - pixel_mask) + reconstruction * pixel_mask
        return torch.stack([images, masked, filled], dim=1).flatten(0, 1)

    def no_weight_decay(self) -> set:
        """The encoder's exemptions under their ``encoder.`` names, and the mask token."""
        names = self.encoder.no_weight_decay() if hasattr(self.encoder, "no_weight_decay") else set()
        return {"encoder." + name for name in names} | {"encoder.mask_token"}

    def no_weight_decay_keywords(self) -> set:
        return set(self.encoder.no_weight_decay_keywords()) if hasattr(self.encoder, "no_weight_decay_keywords") \
            else set()

    def flops(self) -> float:
        """Encoder multiply-accumulates plus the decoder's 1x1 convolution, at the configured size."""
        height, width = self.encoder.patch_embed.patches_resolution
        cells = (height * self.patch_size // self.encoder_stride) * (width * self.patch_size // self.encoder_stride)
        decoder = self.decoder[0]
        return self.encoder.flops() + cells * decoder.in_channels * decoder.out_channels


def is_simmim_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict is a SimMIM pretraining model's (every key under ``encoder.`` or ``decoder.``)."""
    return bool(state_dict) and any(k.startswith("encoder.") for k in state_dict) and \
        all(k.startswith(("encoder.", "decoder.")) for k in state_dict)


def simmim_to_encoder(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The encoder's weights of a SimMIM checkpoint, for fine-tuning a classifier.

    ``encoder.`` prefixes are removed; the decoder and ``mask_token`` are dropped; the continuous position
    bias MLP of older V2 files (``rpe_mlp``) gets its current name ``cpb_mlp``.

    Returns:
        The encoder state dict, and the keys dropped.
    """
    dropped = [k for k in state_dict if k.startswith(PRETRAINING_ONLY)]
    encoder = {}
    for key, value in state_dict.items():
        if key in dropped:
            continue
        encoder[key[len("encoder."):].replace(".rpe_mlp.", ".cpb_mlp.")] = value
    return encoder, dropped


def build_simmim(config, build_encoder) -> SimMIM:
    """The SimMIM model of ``config``: ``build_encoder`` (the registry's builder of MODEL.TYPE) makes the encoder
    from the same config with no head, then the mask token and the decoder are added."""
    encoder_config = config.clone()
    encoder_config.defrost()
    encoder_config.MODEL.NUM_CLASSES = 0  # labels play no part in pretraining; the reference's encoder has no head
    encoder_config.freeze()
    norm = config.MODEL.SIMMIM.NORM_TARGET
    return SimMIM(build_encoder(encoder_config), norm.PATCH_SIZE if norm.ENABLE else None)

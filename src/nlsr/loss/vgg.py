"""Perceptual loss: MSE between VGG19 feature maps (VGG22: conv2_2, VGG54: conv5_4), as in EDSR/SRGAN.

Needs torchvision and its ImageNet VGG19 weights (downloaded by torchvision on first use); without
them the run stops with a UserError saying so instead of a traceback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlsr.errors import UserError

# Layers of torchvision's vgg19().features up to (and including the ReLU after) conv2_2 / conv5_4.
_DEPTH = {'22': 8, '54': 35}


class VGG(nn.Module):
    def __init__(self, conv_index: str, rgb_range: float = 1) -> None:
        super().__init__()
        try:
            from torchvision.models import VGG19_Weights, vgg19
        except ImportError:
            raise UserError(f'--loss VGG{conv_index} needs torchvision (pip install torchvision) '
                            'and its ImageNet VGG19 weights') from None
        try:
            features = vgg19(weights=VGG19_Weights.IMAGENET1K_V1).features
        except Exception as e:  # download or cache problems: tell the user what is missing
            raise UserError(f'--loss VGG{conv_index}: cannot load the ImageNet VGG19 weights of torchvision '
                            f'({type(e).__name__}: {e})') from None
        self.vgg = nn.Sequential(*list(features)[:_DEPTH[conv_index]])
        self.vgg.requires_grad_(False)
        self.rgb_range = rgb_range
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) == 1:  # grayscale training (--n_colors 1): VGG wants three channels
            x = x.expand(-1, 3, -1, -1)
        return self.vgg((x / self.rgb_range - self.mean) / self.std)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self._features(hr.detach())
        return F.mse_loss(self._features(sr), target)

    def train(self, mode: bool = True) -> VGG:
        super().train(mode)
        self.vgg.eval()  # fixed feature extractor
        return self

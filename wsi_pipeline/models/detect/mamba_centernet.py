"""Mamba CenterNet: a VM-UNet encoder-decoder (the project's VSS blocks, SS2D four-order scans)
predicting per-class centre heatmaps and a sub-pixel centre offset (CenterNet, Zhou et al. 2019).

    images (B, 3, H, W)
      -> stem: two 3x3 convs at full resolution (B, stem_ch, H, W)   local detail: edges, dots
      -> body: VMUNet(out_channels=body_ch)   (B, body_ch, H, W)      context: global 2-D scans
      -> head: concat -> 3x3 conv -> GELU -> 1x1 conv -> (B, n_classes + 2, H, W)

Why a conv stem beside the Mamba body: the body works on 4x4-pixel patches (VM-UNet's embedding),
so a centre is only known to a patch; the stem's full-resolution features let the head place the
peak on the right pixel, the offset channels place it inside the pixel. The heatmap bias starts
at -2.19 (sigmoid 0.1), CenterNet's prior, so the focal loss does not begin by fighting an
all-positive map.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..seg.vmunet import VMUNet
from .registry import register_detector

METADATA = {"input_size_px": None, "patch_size_px": 4, "out_dim": "n_classes", "license": "Apache-2.0",
            "reference": "Zhou et al. 2019 (CenterNet, Objects as Points) on Ruan & Xiang 2024 (VM-UNet)"}
HEATMAP_PRIOR = 0.1


class MambaCenterNet(nn.Module):
    """images (B, in_channels, H, W) -> (B, n_classes + 2, H, W): heatmap logits, then (dx, dy)."""

    def __init__(self, n_classes: int = 3, in_channels: int = 3, dims: tuple[int, ...] = (16, 32, 64),
                 depths: tuple[int, ...] = (1, 1, 1), patch_size: int = 4, d_state: int = 8,
                 stem_ch: int = 16, body_ch: int = 16, head_ch: int = 32, backend: str | None = None,
                 input_mean: tuple[float, ...] = (0.5, 0.5, 0.5), input_std: tuple[float, ...] = (0.25, 0.25, 0.25)):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.n_classes, self.in_channels = int(n_classes), int(in_channels)
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_ch, 3, padding=1), nn.GELU(),
            nn.Conv2d(stem_ch, stem_ch, 3, padding=1), nn.GELU())
        self.body = VMUNet(in_channels=in_channels, out_channels=body_ch, dims=dims, depths=depths,
                           patch_size=patch_size, d_state=d_state, backend=backend,
                           input_mean=input_mean, input_std=input_std)
        self.head = nn.Sequential(
            nn.Conv2d(stem_ch + body_ch, head_ch, 3, padding=1), nn.GELU(),
            nn.Conv2d(head_ch, self.n_classes + 2, 1))
        with torch.no_grad():
            self.head[-1].bias[:self.n_classes].fill_(-math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
            self.head[-1].bias[self.n_classes:].zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) images, got {tuple(images.shape)}")
        out = self.head(torch.cat([self.stem(images), self.body(images)], dim=1))
        # Offsets bounded to the pixel: tanh keeps them in (-0.5, 0.5).
        return torch.cat([out[:, :self.n_classes], 0.5 * torch.tanh(out[:, self.n_classes:])], dim=1)


@register_detector("mamba_centernet_tiny", **METADATA)
def mamba_centernet_tiny(**kwargs) -> MambaCenterNet:
    """~0.13M parameters: three VSS stages (16, 32, 64), one block each. CPU-sized (tests, demo)."""
    return MambaCenterNet(**{"dims": (16, 32, 64), "depths": (1, 1, 1), "patch_size": 4, "d_state": 8,
                             "stem_ch": 16, "body_ch": 16, "head_ch": 32, **kwargs})


@register_detector("mamba_centernet_small", **METADATA)
def mamba_centernet_small(**kwargs) -> MambaCenterNet:
    """Four VSS stages (32 .. 256), two blocks each, d_state 16: GPU-sized."""
    return MambaCenterNet(**{"dims": (32, 64, 128, 256), "depths": (2, 2, 2, 2), "patch_size": 4,
                             "d_state": 16, "stem_ch": 32, "body_ch": 32, "head_ch": 64, **kwargs})

"""Small generated slides and a local 'dark dot' detector for the detection tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.slides.tiff_writer import build_pyramid, write_aperio_tiff


class DarkDotDetector(nn.Module):
    """A local detector (receptive field 5x5 px): heatmap = blurred darkness. Its output at a pixel
    depends only on nearby pixels, so tiled inference must reproduce untiled inference exactly."""

    def __init__(self):
        super().__init__()
        self.n_classes, self.in_channels = 1, 3
        self.input_mean, self.input_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        g = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        self.register_buffer("kernel", (g[:, None] * g[None, :] / 256.0).view(1, 1, 5, 5))

    def forward(self, images):
        dark = 1.0 - images.mean(dim=1, keepdim=True)
        blurred = F.conv2d(dark, self.kernel, padding=2)
        logits = 40.0 * (blurred - 0.25)
        return torch.cat([logits, torch.zeros_like(logits), torch.zeros_like(logits)], dim=1)


def dot_image(width: int, height: int, centres_xy, radius_px: float = 2.5) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    rgb = np.full((height, width, 3), 245, dtype=np.uint8)
    for x, y in centres_xy:
        rgb[(xx - x) ** 2 + (yy - y) ** 2 <= radius_px ** 2] = 30
    return rgb


def write_slide(path, rgb, mpp=0.5):
    write_aperio_tiff(path, build_pyramid(rgb, min_size_px=64), mpp=mpp, compression="none")
    return path


@pytest.fixture
def dark_dot_model():
    return DarkDotDetector().eval()

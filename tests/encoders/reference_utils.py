"""Helpers for tests that compare an encoder with its official definition."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def randomise_(model: nn.Module, seed: int) -> nn.Module:
    """Fill every float parameter and buffer with random values, so that no norm, bias or running
    statistic stays at an identity-like init and hides a layout mistake. Integer buffers (relative
    position indices, BatchNorm step counts) and attention masks keep their values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or name.endswith("attn_mask"):
                continue
            values = torch.randn(tensor.shape, generator=gen) * 0.1
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.rsplit(".", 1)[-1] == "weight" and tensor.ndim == 1:  # norm scales around 1
                values = values + 1.0
            tensor.copy_(values)
    return model


def smooth_rgb_patches(n: int, side_px: int, seed: int) -> torch.Tensor:
    """(n, 3, side, side) uint8 patches with tissue-like structure: blurred noise plus stained blobs
    and sharp edges, so resampling is exercised at edges as well as in flat regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side_px, 0:side_px] / side_px
    out = np.empty((n, 3, side_px, side_px), np.uint8)
    for i in range(n):
        base = np.zeros((3, side_px, side_px))
        for _ in range(12):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.2)
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2).astype(float)
            base += blob[None] * rng.uniform(-90, 90, size=(3, 1, 1))
        noise = rng.normal(0, 12, size=(3, side_px, side_px))
        img = 190 + base + noise + 20 * np.sin(7 * xx + 3 * yy)[None]
        out[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


def official_pil_transform(*, resize_px: int, interpolation: str, crop_px: int | None, mean, std,
                           antialias: bool = True) -> dict:
    """The authors' torchvision transform, applied as they apply it: to a PIL image. Returns
    ``resize`` (uint8 CHW tensor after Resize [+ CenterCrop]) and ``full`` (+ ToTensor, Normalize)."""
    from PIL import Image
    from torchvision import transforms

    mode = {"bilinear": transforms.InterpolationMode.BILINEAR,
            "bicubic": transforms.InterpolationMode.BICUBIC}[interpolation]
    geometric = [transforms.Resize(resize_px, interpolation=mode, antialias=antialias)]
    if crop_px is not None:
        geometric.append(transforms.CenterCrop(crop_px))
    geometric = transforms.Compose(geometric)
    full = transforms.Compose([geometric, transforms.ToTensor(), transforms.Normalize(mean, std)])

    def to_pil(chw_uint8: torch.Tensor):
        return Image.fromarray(chw_uint8.permute(1, 2, 0).numpy())

    return {"resize": lambda p: torch.from_numpy(np.asarray(geometric(to_pil(p))).copy()).permute(2, 0, 1),
            "full": lambda p: full(to_pil(p))}

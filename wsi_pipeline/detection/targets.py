"""Training targets and loss: Gaussian centre heatmaps sized in µm, CenterNet focal loss, offset L1.

Pixel convention: pixel i covers [i, i + 1) and its centre is i + 0.5. A point at x lands in pixel
floor(x); its offset target is x - (floor(x) + 0.5), in [-0.5, 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_targets(xy_px: np.ndarray, cls: np.ndarray, n_classes: int, height: int, width: int,
                     sigma_um: float, mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets for one image.

    xy_px: (N, 2) centres (x, y) in this image's pixels; cls: (N,) class indices; sigma_um: the
    Gaussian's sigma in µm (so the target covers the same tissue at any resolution), mpp: µm/px.
    Returns heatmap (n_classes, H, W) float32 (max over objects, exactly 1 at each centre pixel),
    offset (2, H, W) float32 (dx, dy at centre pixels), offset_mask (H, W) bool.
    """
    if sigma_um <= 0 or mpp <= 0:
        raise ValueError("sigma_um and mpp must be > 0")
    sigma_px = sigma_um / mpp
    heat = np.zeros((n_classes, height, width), dtype=np.float32)
    offset = np.zeros((2, height, width), dtype=np.float32)
    mask = np.zeros((height, width), dtype=bool)
    r = int(np.ceil(3 * sigma_px))
    for (x, y), c in zip(np.asarray(xy_px, dtype=np.float64).reshape(-1, 2), np.asarray(cls).reshape(-1)):
        ix, iy = int(np.floor(x)), int(np.floor(y))
        if not (0 <= ix < width and 0 <= iy < height):
            continue
        x0, x1, y0, y1 = max(0, ix - r), min(width, ix + r + 1), max(0, iy - r), min(height, iy + r + 1)
        gx = np.exp(-((np.arange(x0, x1) + 0.5 - x) ** 2) / (2 * sigma_px ** 2))
        gy = np.exp(-((np.arange(y0, y1) + 0.5 - y) ** 2) / (2 * sigma_px ** 2))
        np.maximum(heat[c, y0:y1, x0:x1], gy[:, None] * gx[None, :], out=heat[c, y0:y1, x0:x1])
        heat[c, iy, ix] = 1.0
        offset[:, iy, ix] = (x - ix - 0.5, y - iy - 0.5)
        mask[iy, ix] = True
    return heat, offset, mask


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0,
               per_class: bool = True) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss. logits, target: (B, C, H, W); target 1 at centres.

    per_class: normalise each class by its own number of centres (at least 1) and average over
    classes, so a rare class (mitoses) weighs as much as a common one (nuclei); else CenterNet's
    single normalisation by all centres.
    """
    logp = F.logsigmoid(logits)
    log1mp = F.logsigmoid(-logits)
    p = logp.exp()
    pos = target.eq(1).float()
    neg_w = (1 - target).clamp(min=0).pow(beta) * (1 - pos)
    pos_loss = -(1 - p).pow(alpha) * logp * pos
    neg_loss = -p.pow(alpha) * log1mp * neg_w
    if per_class:
        dims = (0, 2, 3)
        n_pos = pos.sum(dims).clamp(min=1)
        return ((pos_loss.sum(dims) + neg_loss.sum(dims)) / n_pos).mean()
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


def offset_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 on (B, 2, H, W) offsets at centre pixels (mask (B, H, W) bool), mean over centres."""
    m = mask.unsqueeze(1).float()
    return (torch.abs(pred - target) * m).sum() / (2 * m.sum()).clamp(min=1)

"""Points from heatmaps: local maxima above a threshold, with score, class and sub-pixel offset."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def find_peaks(heat: torch.Tensor, offset: torch.Tensor, min_score: float, nms_px: int = 1,
               groups: list[list[int]] | None = None,
               group_nms_px: list[int] | None = None) -> list[tuple[np.ndarray, ...]]:
    """Peaks of each class group (default: one group of all classes), concatenated per image.

    Within a group the classes compete (one object, one class); groups are independent, so a rare
    class that looks like a common one (a mitosis beside tumour nuclei) is not hidden by its
    neighbour's stronger score when it is its own group. group_nms_px: each group's own suppression
    radius (default nms_px for all): a mitosis is a scattered clump of chromatin, several local
    maxima a few µm apart that are one object, while nuclei sit closer together than that.
    """
    if groups is None:
        return _find_peaks(heat, offset, min_score, nms_px)
    if group_nms_px is None:
        group_nms_px = [nms_px] * len(groups)
    if len(group_nms_px) != len(groups):
        raise ValueError("group_nms_px needs one radius per class group")
    parts = []
    for group, radius in zip(groups, group_nms_px):
        found = _find_peaks(heat[:, group], offset, min_score, radius)
        parts.append([(ixy, xy, s, np.asarray(group, dtype=np.int64)[c]) for ixy, xy, s, c in found])
    return [tuple(np.concatenate([p[i][k] for p in parts]) for k in range(4)) for i in range(heat.shape[0])]


def _find_peaks(heat: torch.Tensor, offset: torch.Tensor, min_score: float, nms_px: int = 1
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """heat: (B, C, H, W) probabilities; offset: (B, 2, H, W) (dx, dy) px.

    A peak is a pixel whose best class score is >= min_score and is the maximum of the best-class
    map in its (2 nms_px + 1)^2 window (class-agnostic: one object, one class, the argmax). Ties on
    a plateau keep one pixel (the first in raster order), so a flat peak is not reported twice.
    Returns per image (ixy (N, 2) int64 peak pixel (x, y), xy (N, 2) float64 sub-pixel centre with the
    pixel-centre convention x = ix + 0.5 + dx, score (N,) float32, cls (N,) int64).
    """
    best, cls = heat.max(dim=1)                                       # (B, H, W)
    k = 2 * int(nms_px) + 1
    pooled = F.max_pool2d(best.unsqueeze(1), k, stride=1, padding=int(nms_px)).squeeze(1)
    is_peak = (best >= pooled) & (best >= min_score)
    # Plateau tie-break: drop a pixel when an earlier (raster order) pixel in its window has the same value.
    b, h, w = best.shape
    index = torch.arange(h * w, device=best.device, dtype=torch.float32).view(1, h, w).expand(b, h, w)
    neg_index = torch.where(best >= pooled, -index, torch.full_like(index, -float(h * w)))
    first = -F.max_pool2d(neg_index.unsqueeze(1), k, stride=1, padding=int(nms_px)).squeeze(1)
    is_peak &= first == index
    out = []
    for i in range(b):
        iy, ix = torch.nonzero(is_peak[i], as_tuple=True)
        dx = offset[i, 0, iy, ix].float()
        dy = offset[i, 1, iy, ix].float()
        xy = torch.stack([ix.float() + 0.5 + dx, iy.float() + 0.5 + dy], dim=1).double().cpu().numpy()
        ixy = torch.stack([ix, iy], dim=1).cpu().numpy().astype(np.int64)
        out.append((ixy, xy, best[i, iy, ix].float().cpu().numpy(), cls[i, iy, ix].cpu().numpy().astype(np.int64)))
    return out

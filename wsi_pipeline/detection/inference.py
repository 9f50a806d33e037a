"""Whole-slide tiled detection: tissue-only core tiles with context margins and one owner per object.

The slide at `work_mpp` is cut into square cores of `core_px`; each is read with a margin of
`margin_px` on every side (neighbouring windows overlap by 2 * margin_px, which callers set to at
least twice the largest object). A detection is kept only by the tile whose core contains its peak
pixel: cores partition the slide, so an object on a seam is reported exactly once, and every kept
peak had at least `margin_px` of real context on each side. Cores without tissue are skipped.

Detections go to `sink(xy_level0 (N, 2), score (N,), cls (N,))` batch by batch, so memory stays
flat in the slide's size; the caller streams them to disk.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch

from ..slides.slide import Slide
from ..tiling.grid import tissue_fractions
from .peaks import find_peaks
from .region import read_work_region, work_size


def core_grid(slide: Slide, work_mpp: float, core_px: int, tissue_mask: np.ndarray | None = None,
              mask_mpp: float | None = None) -> np.ndarray:
    """(N, 2) int64 top-left (x, y) of the cores, in work pixels, row-major; tissue cores only
    when `tissue_mask` (at `mask_mpp` µm/px) is given."""
    ww, wh = work_size(slide, work_mpp)
    ys, xs = np.arange(0, wh, core_px), np.arange(0, ww, core_px)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    cores = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)
    if tissue_mask is not None:
        scale = mask_mpp / work_mpp                      # work px per mask cell
        frac = tissue_fractions(cores, core_px, tissue_mask, (scale, scale))
        cores = cores[frac > 0]
    return cores


def normalise(images_uint8: np.ndarray, model, device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float normalised with the model's input_mean / input_std."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(model.input_mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(model.input_std, device=device).view(1, -1, 1, 1)
    return (x - mean) / std


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_maps(model, images_uint8: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(heat (B, C, H, W) probabilities, offset (B, 2, H, W)) float32 for uint8 images (B, H, W, 3)."""
    device = torch.device(device)
    with _autocast(device):
        out = model(normalise(images_uint8, model, device)).float()
    n = model.n_classes
    return torch.sigmoid(out[:, :n]), out[:, n:]


def detect_slide(model, slide: Slide, sink: Callable[[np.ndarray, np.ndarray, np.ndarray], None], *,
                 work_mpp: float, core_px: int, margin_px: int, min_score: float, nms_px: int,
                 tissue_mask: np.ndarray | None = None, mask_mpp: float | None = None,
                 batch_size: int = 4, device: str | torch.device = "cpu", progress: bool = False,
                 class_groups: list[list[int]] | None = None, group_nms_px: list[int] | None = None) -> dict:
    """Detect objects over the slide's tissue; returns {"n_tiles", "n_detections", "work_mpp"}.

    group_nms_px: a suppression radius per class group (find_peaks); callers keep every radius within
    margin_px, so a peak owned by a core sees its whole suppression window (tiled equals untiled;
    the config checks nms_um, rare_nms_um <= max_object_um)."""
    if core_px < 1 or margin_px < 0:
        raise ValueError("core_px must be >= 1 and margin_px >= 0")
    model.eval()
    device = torch.device(device)
    cores = core_grid(slide, work_mpp, core_px, tissue_mask, mask_mpp)
    ww, wh = work_size(slide, work_mpp)
    to_level0 = work_mpp / slide.mpp
    side = core_px + 2 * margin_px
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(cores), desc=f"detect {slide.slide_id}", unit="tile", leave=False)
    n_det = 0
    for batch in _batches(cores, batch_size):
        images = np.stack([read_work_region(slide, int(x) - margin_px, int(y) - margin_px, side, side, work_mpp)
                           for x, y in batch])
        heat, offset = predict_maps(model, images, device)
        peaks = find_peaks(heat, offset, min_score, nms_px, class_groups, group_nms_px)
        for (cx, cy), (ixy, xy, score, cls) in zip(batch, peaks):
            gx, gy = ixy[:, 0] + cx - margin_px, ixy[:, 1] + cy - margin_px
            own = (gx >= cx) & (gx < cx + core_px) & (gy >= cy) & (gy < cy + core_px) & (gx < ww) & (gy < wh)
            if own.any():
                level0 = (xy[own] + np.array([cx - margin_px, cy - margin_px])) * to_level0
                sink(level0, score[own], cls[own])
                n_det += int(own.sum())
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return {"n_tiles": int(len(cores)), "n_detections": n_det, "work_mpp": work_mpp}


def _batches(items: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + size]

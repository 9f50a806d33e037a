"""Sliding-window inference with overlap blending: a whole working-resolution slide -> probability map.

    image (H, W, C) --windows of window_px, stride window_px·(1 - overlap)--> predict(batch)
    -> each window's output x blending window, summed; divided by the summed blending weights

The blending window is a separable raised cosine (Hann) or Gaussian that is largest at the window
centre and small (never zero) at its edges, so each pixel is taken mostly from the windows that see
it with the most context, and window borders leave no seams. Because the result is a weighted mean,
a predictor that returns a constant returns that constant everywhere. The last window in each row
and column is aligned with the image edge, so every pixel is covered; an image smaller than the
window is predicted in one piece at its own size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

BLEND_KINDS = ("cosine", "gaussian")
# Blending weight at a window's very edge, relative to its centre: small, so edges count little,
# but positive, so pixels seen by one window only (image borders) are still defined.
_EDGE_WEIGHT = 1e-3


def blending_window(height: int, width: int, kind: str = "cosine") -> np.ndarray:
    """(height, width) float64 separable weights in (0, 1], 1 near the centre."""
    if kind not in BLEND_KINDS:
        raise ValueError(f"blend must be one of {BLEND_KINDS}, got {kind!r}")

    def profile(n: int) -> np.ndarray:
        t = (np.arange(n) + 0.5) / n                           # pixel centres in (0, 1)
        if kind == "cosine":
            w = np.sin(np.pi * t) ** 2
        else:
            w = np.exp(-0.5 * ((t - 0.5) / 0.125) ** 2)        # sigma = window / 8
        return np.maximum(w / w.max(), _EDGE_WEIGHT)

    return np.outer(profile(height), profile(width))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start positions covering [0, length): every `stride`, the last one flush with the end."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def sliding_window_predict(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *,
                           window_px: int = 128, overlap: float = 0.5, batch_size: int = 8,
                           blend: str = "cosine") -> np.ndarray:
    """Blend `predict` over overlapping windows of `image` (H, W, C).

    predict: (B, h, w, C) windows (image dtype) -> (B, h, w) float outputs.
    Returns (H, W) float32.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got {image.shape}")
    if window_px < 1 or not 0.0 <= overlap < 1.0 or batch_size < 1:
        raise ValueError("need window_px >= 1, 0 <= overlap < 1, batch_size >= 1")
    height, width = image.shape[:2]
    win_h, win_w = min(window_px, height), min(window_px, width)
    stride_h = max(1, int(round(win_h * (1.0 - overlap))))
    stride_w = max(1, int(round(win_w * (1.0 - overlap))))
    weights = blending_window(win_h, win_w, blend)
    total = np.zeros((height, width), dtype=np.float64)
    norm = np.zeros((height, width), dtype=np.float64)
    positions = [(y, x) for y in window_starts(height, win_h, stride_h) for x in window_starts(width, win_w, stride_w)]
    for i in range(0, len(positions), batch_size):
        chunk = positions[i:i + batch_size]
        batch = np.stack([image[y:y + win_h, x:x + win_w] for y, x in chunk])
        out = np.asarray(predict(batch), dtype=np.float64)
        if out.shape != (len(chunk), win_h, win_w):
            raise ValueError(f"predict returned {out.shape}, expected {(len(chunk), win_h, win_w)}")
        for (y, x), window_out in zip(chunk, out):
            total[y:y + win_h, x:x + win_w] += window_out * weights
            norm[y:y + win_h, x:x + win_w] += weights
    return (total / norm).astype(np.float32)


def images_to_tensor(batch: np.ndarray, mean, std, device):
    """(B, h, w, C) uint8 -> normalised float (B, C, h, w) tensor on `device`."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def segmenter_predictor(model, device=None) -> Callable[[np.ndarray], np.ndarray]:
    """predict(batch (B, h, w, 3) uint8) -> (B, h, w) lesion probabilities from a 1-channel segmenter
    (sigmoid of its logits), in eval mode without gradients."""
    import torch

    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def predict(batch: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                logits = model(images_to_tensor(batch, model.input_mean, model.input_std, device))
        finally:
            model.train(was_training)
        return torch.sigmoid(logits[:, 0]).float().cpu().numpy()

    return predict


def predict_probability_map(model, image: np.ndarray, *, window_px: int = 128, overlap: float = 0.5,
                            batch_size: int = 8, blend: str = "cosine", tissue: np.ndarray | None = None,
                            device=None) -> np.ndarray:
    """Lesion probability (H, W) float32 of a working-resolution `image` (H, W, 3) uint8; 0 outside
    `tissue` when given (glass is never lesion)."""
    prob = sliding_window_predict(segmenter_predictor(model, device), image, window_px=window_px,
                                  overlap=overlap, batch_size=batch_size, blend=blend)
    if tissue is not None:
        prob = np.where(np.asarray(tissue, dtype=bool), prob, 0.0).astype(np.float32)
    return prob

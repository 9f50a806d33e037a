"""Stain augmentation in optical-density space (HED jitter, Tellez et al. 2018): scanner/lab shift.

RGB -> optical density OD = -ln(I) -> stain concentrations with Ruifrok & Johnston's HED matrix ->
each stain scaled by alpha ~ U(1 - sigma, 1 + sigma) and shifted by beta ~ U(-bias, bias) -> back.
"""

from __future__ import annotations

import numpy as np

RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.02) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) uint8 with the H, E and D concentrations jittered."""
    if sigma == 0 and bias == 0:
        return rgb
    od = -np.log(np.clip(rgb.astype(np.float64), 1.0, 255.0) / 255.0)
    hed = od.reshape(-1, 3) @ HED_FROM_RGB
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-bias, bias, 3)
    out = 255.0 * np.exp(-(hed @ RGB_FROM_HED))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8).reshape(rgb.shape)

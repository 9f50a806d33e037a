"""CAM map -> soft pseudo-labels with per-pixel loss weights (FMaMIL stage 2's supervision).

    cam (h, w) in [0, 1], NaN = no CAM;  tissue (h, w) bool
      cam >= cam_high              target 1, weight 1               (confident lesion)
      cam <= cam_low               target 0, weight 1               (confident background)
      cam_low < cam < cam_high     target (cam - low) / (high - low), weight `soft_weight`
      outside tissue               target 0, weight 1               (glass is never lesion)
      tissue without a CAM value   weight 0                         (no evidence either way)
      a slide known to be negative target 0, weight 1 everywhere     (its label says: no lesion)

The soft band is rescaled to [0, 1] so the target is continuous in the CAM across both thresholds;
its lower weight lets the network's own evidence outweigh an uncertain CAM, and self-correction
(`segmentation.train`) later revises these pixels where the network is confident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PseudoLabels:
    target: np.ndarray      # (h, w) float32 in [0, 1]
    weight: np.ndarray      # (h, w) float32 >= 0

    def __post_init__(self):
        if self.target.shape != self.weight.shape:
            raise ValueError(f"target {self.target.shape} and weight {self.weight.shape} differ in shape")


def make_pseudo_labels(cam: np.ndarray, *, cam_low: float, cam_high: float, tissue: np.ndarray | None = None,
                       soft_weight: float = 0.3, negative: bool = False) -> PseudoLabels:
    """Pseudo-labels from a CAM map (see the module docstring). `tissue` None: where the CAM is defined."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim != 2:
        raise ValueError(f"cam must be (h, w), got {cam.shape}")
    if not 0.0 <= cam_low <= cam_high <= 1.0:
        raise ValueError(f"need 0 <= cam_low <= cam_high <= 1, got {cam_low}, {cam_high}")
    if soft_weight < 0:
        raise ValueError(f"soft_weight must be >= 0, got {soft_weight}")
    defined = np.isfinite(cam)
    tissue = defined if tissue is None else np.asarray(tissue, dtype=bool)
    if tissue.shape != cam.shape:
        raise ValueError(f"tissue {tissue.shape} and cam {cam.shape} differ in shape")
    if negative:
        return PseudoLabels(np.zeros(cam.shape, np.float32), np.ones(cam.shape, np.float32))

    values = np.where(defined, cam, 0.0)
    target = np.zeros(cam.shape, dtype=np.float32)
    weight = np.ones(cam.shape, dtype=np.float32)
    high = defined & (values >= cam_high)
    low = defined & (values <= cam_low)
    soft = defined & ~high & ~low
    target[high] = 1.0
    if soft.any():  # implies cam_high > cam_low
        target[soft] = (values[soft] - cam_low) / (cam_high - cam_low)
        weight[soft] = soft_weight
    target[~tissue] = 0.0
    weight[~tissue] = 1.0
    weight[tissue & ~defined] = 0.0
    return PseudoLabels(target, weight)

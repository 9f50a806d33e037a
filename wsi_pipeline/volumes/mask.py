"""Body masks: the voxels worth making instances of (air and the scanner table excluded).

CT: HU above `min_hu` (default -500: soft tissue and bone, not air or lung-free background);
MR: above the Otsu threshold of the intensity histogram. Then the largest connected component
(drops the table and noise) with holes filled per axial slice (keeps lungs and bowel gas inside).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .volume import Volume


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold maximising the between-class variance of the histogram of `values`."""
    values = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centres) / np.maximum(weight_low, 1)
    mean_high = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def body_mask(volume: Volume, min_hu: float = -500.0) -> np.ndarray:
    """(I, J, K) bool body mask (see the module docstring)."""
    threshold = min_hu if volume.modality == "CT" else otsu_threshold(volume.data)
    mask = volume.data > threshold
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == (int(np.argmax(sizes)) + 1)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask

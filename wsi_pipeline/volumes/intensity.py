"""Intensities: CT in Hounsfield units through windows (one channel each), MRI normalised.

A window (centre, width) in HU maps [centre - width/2, centre + width/2] linearly onto [0, 1],
clipping outside: the radiologist's display window, here an input channel of the encoder.
"""

from __future__ import annotations

import numpy as np

# (centre, width) HU, the usual display presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_CT_WINDOWS = ("soft_tissue", "liver", "bone")


def window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """HU → [0, 1] float32 through the window (centre, width)."""
    if not width > 0:
        raise ValueError(f"window width must be > 0 HU, got {width}")
    low = centre - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / width, 0.0, 1.0)


def ct_windows(hu: np.ndarray, windows=DEFAULT_CT_WINDOWS) -> np.ndarray:
    """(C, ...) float32 in [0, 1]: one channel per window (a preset name or a (centre, width) pair)."""
    out = []
    for w in windows:
        centre, width = CT_WINDOWS[w] if isinstance(w, str) else w
        out.append(window(hu, centre, width))
    return np.stack(out)


def normalise_mri(values: np.ndarray, mask: np.ndarray | None = None, method: str = "percentile",
                  percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """MR intensities (arbitrary scanner units) → float32, statistics from `mask` (the body) if given.

    "percentile": the `percentiles` of the body map to 0 and 1, clipped to [0, 1].
    "zscore": (x - mean) / std of the body, then mapped to [0, 1] as 0.5 + z / 6 (±3 SD), clipped.
    """
    values = np.asarray(values, dtype=np.float32)
    sample = values[mask] if mask is not None and mask.any() else values.ravel()
    if method == "percentile":
        low, high = np.percentile(sample, percentiles)
        return np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)
    if method == "zscore":
        z = (values - sample.mean()) / max(float(sample.std()), 1e-6)
        return np.clip(0.5 + z / 6.0, 0.0, 1.0)
    raise ValueError(f"MRI normalisation must be 'percentile' or 'zscore', got {method!r}")

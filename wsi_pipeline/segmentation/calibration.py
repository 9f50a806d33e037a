"""CAM thresholds calibrated on the slides known to be negative (their manifest label).

    negative slides' patch CAM scores --quantile q--> level
    cam_high = max(segment.cam_high, level)      pseudo-label "lesion" only above what normal tissue reaches
    gate     = max(segment.cam_gate, level)      with segment.gate_negatives, else segment.cam_gate:
                                                 stage-2 mask only where the CAM map is >= gate (0: none)
    (not calibrated: cam_high and cam_gate as configured)
    cam_low  = segment.cam_low                   (<= cam_high already)

Why: a CAM's absolute level means little by itself. A model trained with rare lesions can give
normal patches 0.6 (instance probabilities of the hard demo's FMaMIL reach 0.78 on normal slides)
and a per-slide min-max score gives every slide's top patch 1.0; fixed thresholds then mark part of
every slide. Slides labelled with another class than the lesion class show, by their label, how
high a score normal tissue gets, so thresholds are set above that (the 99.9th percentile by
default: a few outlying patches do not set the level). Only the run's own labelled slides are
used, the ones the segmenter trains on; no ground-truth mask is.

The gate follows the level, not cam_high: where the segmenter sees lesions the CAM missed (a
patch that a lesion covers only in part scores low), a gate at cam_high would cut them off again,
while the level of normal slides only removes what normal tissue also reaches. It is still opt-in:
on a demo slide whose lesion the segmenter outlines well (tests/seg), the gate at the level cut
Dice 0.79 -> 0.67, while on the hard demo it is what brings normal tissue marked under 1%.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class CamThresholds:
    cam_low: float
    cam_high: float
    gate: float                    # 0: no gate
    negative_level: float | None   # the quantile of the negative slides' scores; None: not calibrated
    n_negative_slides: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate_thresholds(negative_scores: Sequence[np.ndarray], *, cam_low: float, cam_high: float,
                         cam_gate: float, quantile: float, gate_negatives: bool = False) -> CamThresholds:
    """Thresholds from the configured ones and the negative slides' per-patch CAM scores (see the
    module docstring); `quantile` 0 or no negative patches: the configured thresholds."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    scores = [np.asarray(s, dtype=np.float64).reshape(-1) for s in negative_scores]
    pooled = np.concatenate(scores) if scores else np.zeros(0)
    if quantile == 0.0 or pooled.size == 0:
        return CamThresholds(cam_low, cam_high, cam_gate, None, len(scores))
    level = float(np.quantile(pooled, quantile))
    high = max(cam_high, level)
    gate = max(cam_gate, level) if gate_negatives else cam_gate
    return CamThresholds(min(cam_low, high), high, gate, level, len(scores))

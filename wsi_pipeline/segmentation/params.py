"""The segmenter's training parameters that users set in the config's `segment` section.

Plain dataclass, no numpy/torch: `config.SegmentConfig` derives from it (the YAML keys stay
`segment.epochs`, `segment.lr`, ...) and `train.TrainParams` adds the trainer's internal knobs, so
the two never drift apart and nothing is copied field by field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SegmenterFitParams:
    epochs: int = 10
    steps_per_epoch: int = 20
    batch_size: int = 8
    # Training crop side in working pixels.
    crop_px: int = 64
    lr: float = 1e-3
    # Self-correction after each epoch from this one on (1-based); 0: never.
    correct_from_epoch: int = 5
    correct_confidence: float = 0.9
    correct_blend: float = 0.5
    # Sliding-window inference: window side (working px) and overlap fraction.
    window_px: int = 128
    overlap: float = 0.5
    seed: int = 0

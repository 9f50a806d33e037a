"""Training the segmenter on CAM pseudo-labels, with self-correction of the labels (FMaMIL stage 2).

    slides: [TrainingSlide(image (h, w, 3) uint8, labels: PseudoLabels, tissue (h, w) bool)]
    each step: `batch_size` random crops of `crop_px` (half centred on pseudo-lesion pixels, so small
               lesions are seen), random flips / 90° rotations / mild colour gain
    loss     = soft BCE (per-pixel weights) + dice_weight x soft Dice (weighted, over the batch)
    after epoch e >= correct_from_epoch (1-based; 0 = never), for every slide:
        p      = sliding-window probability map of the current network
        revise = tissue & (p > conf or p < 1 - conf) & |round(p) - cam_label| >= 0.5
        labels = cam_label, and (1 - blend) x cam_label + blend x round(p) where revised

Self-correction moves a label towards the network's answer only where the network is confident and
contradicts the CAM. Each round starts again from the CAM labels (the network's answers are not
accumulated), so a label can move at most `blend` of the way, and a revision the network stops
being sure of is undone in the next round: the network cannot talk itself into a drift, which a
compounding update (revising the revised labels) allows. Pixel weights are kept, so revised
soft-band pixels stay down-weighted. Labels are revised in place (the `TrainingSlide` objects hold
the last round's labels afterwards).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .inference import images_to_tensor, predict_probability_map
from .params import SegmenterFitParams
from .pseudo_labels import PseudoLabels

log = logging.getLogger("wsi_pipeline")


@dataclass
class TrainingSlide:
    slide_id: str
    image: np.ndarray           # (h, w, 3) uint8 on the working grid
    labels: PseudoLabels        # revised in place by self-correction
    tissue: np.ndarray          # (h, w) bool: only tissue pixels are ever revised
    cam_target: np.ndarray | None = field(default=None, repr=False)  # the CAM labels; set from labels

    def __post_init__(self):
        if self.image.ndim != 3 or self.image.shape[:2] != self.labels.target.shape:
            raise ValueError(f"{self.slide_id}: image {self.image.shape} does not match labels "
                             f"{self.labels.target.shape}")
        if self.tissue.shape != self.labels.target.shape:
            raise ValueError(f"{self.slide_id}: tissue {self.tissue.shape} does not match labels")
        if self.cam_target is None:
            self.cam_target = self.labels.target.copy()


@dataclass(frozen=True)
class TrainParams(SegmenterFitParams):
    """The config's segment training parameters (`SegmenterFitParams`) plus the trainer's own."""
    weight_decay: float = 1e-4
    dice_weight: float = 1.0
    # Fraction of crops centred on a pixel whose current target is >= 0.5 (when there are any).
    positive_fraction: float = 0.5

    def __post_init__(self):
        if min(self.epochs, self.steps_per_epoch, self.batch_size, self.crop_px, self.window_px) < 1:
            raise ValueError("epochs, steps_per_epoch, batch_size, crop_px and window_px must be >= 1")
        if not 0.5 < self.correct_confidence < 1.0:
            raise ValueError(f"correct_confidence must be in (0.5, 1), got {self.correct_confidence}")
        if not 0.0 < self.correct_blend <= 1.0:
            raise ValueError(f"correct_blend must be in (0, 1], got {self.correct_blend}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)          # mean training loss per epoch
    corrections: list[dict] = field(default_factory=list)    # per round: epoch, revised_px, revised_fraction


def segmentation_loss(logits, target, weight, dice_weight: float = 1.0):
    """Weighted soft BCE + dice_weight x weighted soft Dice; all (B, 1, h, w) tensors."""
    import torch.nn.functional as F

    w_sum = weight.sum().clamp_min(1.0)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / w_sum
    prob = logits.sigmoid()
    inter = (weight * prob * target).sum()
    dice = 1.0 - (2.0 * inter + 1.0) / ((weight * prob).sum() + (weight * target).sum() + 1.0)
    return bce + dice_weight * dice


class _CropSampler:
    """Random training crops (image, target, weight) from the slides' current labels."""

    def __init__(self, slides: Sequence[TrainingSlide], crop_px: int, positive_fraction: float, rng):
        self.slides, self.crop, self.positive_fraction, self.rng = list(slides), crop_px, positive_fraction, rng
        self.refresh()

    def refresh(self) -> None:
        """Recompute where crops may be centred (after labels change)."""
        self.anywhere, self.positive = [], []
        for s in self.slides:
            informative = (s.labels.weight > 0) & s.tissue
            self.anywhere.append(np.flatnonzero(informative if informative.any() else s.labels.weight > 0))
            self.positive.append(np.flatnonzero(informative & (s.labels.target >= 0.5)))
        counts = np.array([len(a) for a in self.anywhere], dtype=np.float64)
        if counts.sum() == 0:
            raise ValueError("no pixel with a non-zero label weight in any training slide")
        self.slide_p = counts / counts.sum()
        pos_counts = np.array([len(p) for p in self.positive], dtype=np.float64)
        self.pos_p = pos_counts / pos_counts.sum() if pos_counts.sum() > 0 else None

    def _crop(self, array: np.ndarray, top: int, left: int, fill) -> np.ndarray:
        c = self.crop
        out = array[top:top + c, left:left + c]
        pad_h, pad_w = c - out.shape[0], c - out.shape[1]
        if pad_h or pad_w:
            pad = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (array.ndim - 2)
            out = np.pad(out, pad, mode="edge") if fill is None else np.pad(out, pad, constant_values=fill)
        return out

    def sample(self):
        rng, c = self.rng, self.crop
        use_positive = self.pos_p is not None and rng.random() < self.positive_fraction
        i = int(rng.choice(len(self.slides), p=self.pos_p if use_positive else self.slide_p))
        pool = self.positive[i] if use_positive else self.anywhere[i]
        s = self.slides[i]
        h, w = s.labels.target.shape
        r, col = divmod(int(pool[rng.integers(len(pool))]), w)
        # Centre jittered by up to a quarter crop, so positives do not always sit at the centre.
        r += int(rng.integers(-c // 4, c // 4 + 1))
        col += int(rng.integers(-c // 4, c // 4 + 1))
        top = int(np.clip(r - c // 2, 0, max(0, h - c)))
        left = int(np.clip(col - c // 2, 0, max(0, w - c)))
        image = self._crop(s.image, top, left, None)
        target = self._crop(s.labels.target, top, left, 0.0)
        weight = self._crop(s.labels.weight, top, left, 0.0)  # padding carries no loss
        k = int(rng.integers(4))
        image, target, weight = (np.rot90(a, k) for a in (image, target, weight))
        if rng.random() < 0.5:
            image, target, weight = (a[:, ::-1] for a in (image, target, weight))
        # Mild per-channel gain and offset: stain and scanner variation between slides.
        gain = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
        offset = rng.uniform(-8.0, 8.0, size=3).astype(np.float32)
        image = np.clip(image.astype(np.float32) * gain + offset, 0.0, 255.0)
        return image, np.ascontiguousarray(target), np.ascontiguousarray(weight)


def self_correct(slides: Sequence[TrainingSlide], prob_maps: Sequence[np.ndarray], *,
                 confidence: float, blend: float) -> int:
    """Recompute each slide's labels from its CAM labels and the network's current answers (in
    place): blended where the network is confident and disagrees, the CAM label elsewhere.
    Returns the number of pixels revised."""
    revised = 0
    for s, prob in zip(slides, prob_maps):
        anchor = s.cam_target
        hard = (prob > 0.5).astype(np.float32)
        confident = (prob > confidence) | (prob < 1.0 - confidence)
        revise = s.tissue & confident & (np.abs(hard - anchor) >= 0.5)
        t = s.labels.target
        t[...] = anchor
        t[revise] = (1.0 - blend) * anchor[revise] + blend * hard[revise]
        revised += int(revise.sum())
    return revised


def train_segmenter(model, slides: Sequence[TrainingSlide], params: TrainParams, *, device="cpu",
                    progress: bool = False) -> TrainHistory:
    """Train `model` (a 1-channel segmenter, see `models.seg`) in place on `slides`' pseudo-labels.

    Seeds torch and numpy from `params.seed` for sampling; initialise the model (and seed) before.
    Returns the loss per epoch and the self-correction rounds; the model is left in eval mode.
    """
    import torch

    if not slides:
        raise ValueError("train_segmenter: no training slides")
    device = torch.device(device)
    model.to(device).train()
    rng = np.random.default_rng(params.seed)
    torch.manual_seed(params.seed)
    sampler = _CropSampler(slides, params.crop_px, params.positive_fraction, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    total_steps = params.epochs * params.steps_per_epoch
    # Cosine decay to 5 % of the learning rate over the run.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    history = TrainHistory()
    tissue_px = max(1, sum(int(s.tissue.sum()) for s in slides))
    for epoch in range(1, params.epochs + 1):
        model.train()
        losses = []
        for _ in range(params.steps_per_epoch):
            crops = [sampler.sample() for _ in range(params.batch_size)]
            images = images_to_tensor(np.stack([c[0] for c in crops]), model.input_mean, model.input_std, device)
            target = torch.from_numpy(np.stack([c[1] for c in crops])[:, None]).to(device)
            weight = torch.from_numpy(np.stack([c[2] for c in crops])[:, None]).to(device)
            loss = segmentation_loss(model(images), target, weight, params.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        history.loss.append(float(np.mean(losses)))
        message = f"segment train: epoch {epoch}/{params.epochs} loss {history.loss[-1]:.4f}"
        if params.correct_from_epoch and params.correct_from_epoch <= epoch < params.epochs:
            probs = [predict_probability_map(model, s.image, window_px=params.window_px, overlap=params.overlap,
                                             batch_size=params.batch_size, device=device) for s in slides]
            revised = self_correct(slides, probs, confidence=params.correct_confidence, blend=params.correct_blend)
            sampler.refresh()
            history.corrections.append({"epoch": epoch, "revised_px": revised,
                                        "revised_fraction": revised / tissue_px})
            message += f"; self-correction revised {revised} px ({100.0 * revised / tissue_px:.2f}% of tissue)"
        (log.info if progress else log.debug)(message)
    model.eval()
    return history

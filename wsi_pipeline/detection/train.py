"""Detector training: crops centred on rare classes + random tissue + mined hard negatives, HED
stain jitter, Gaussian targets in µm, focal loss, patient-level validation, early stopping.

Slides are read at `work_mpp` (whole, when small enough; else region by region). Each batch holds
  rare_fraction           crops centred (± a quarter crop) on a random rare-class object (mitoses);
  hard_negative_fraction  crops centred on mined hard negatives: rare-class peaks the model itself
                          produced in earlier batches where no rare object is (mitosis imposters);
  the rest                crops centred on random tissue;
each flipped / rotated by multiples of 90° and stain-jittered in optical-density (HED) space.
Validation crops (same mix, fixed seed) come from the validation patients' slides only; the best
epoch's weights are kept and training stops after `patience` epochs without improvement.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..models.detect import create_detector
from ..slides import open_slide
from .annotations import Points
from .checkpoint import save_detector
from .params import DetectTrainParams
from .matching import MIDOG_RADIUS_UM
from .peaks import find_peaks
from .region import read_work_region, slide_tissue, work_size
from .stain import hed_jitter
from .targets import focal_loss, gaussian_targets, offset_loss

log = logging.getLogger("wsi_pipeline.detect")


@dataclass
class TrainSlide:
    """One annotated slide: its file, id, patient and truth (level-0 px)."""
    slide_id: str
    path: Path
    patient_id: str
    truth: Points
    mpp: float | None = None


class _SlideData:
    """A slide at work_mpp: pixels (cached whole when small), tissue cells, truth in work px."""

    CACHE_MAX_PX = 48_000_000

    def __init__(self, item: TrainSlide, work_mpp: float, tissue_mpp: float = 8.0):
        self.item = item
        self.slide = open_slide(item.path, slide_id=item.slide_id, mpp_override=item.mpp)
        self.work_mpp = work_mpp
        self.size = work_size(self.slide, work_mpp)
        self.to_work = self.slide.mpp / work_mpp
        self.xy = item.truth.xy * self.to_work
        self.cls = item.truth.cls
        mask, mask_mpp = slide_tissue(self.slide, tissue_mpp)
        cells = np.argwhere(mask)
        if len(cells) == 0:
            cells = np.argwhere(np.ones_like(mask))
        self.tissue_cells_work = (cells[:, ::-1] + 0.5) * (mask_mpp / work_mpp)   # (x, y) work px
        self.image = None
        if self.size[0] * self.size[1] <= self.CACHE_MAX_PX:
            self.image = read_work_region(self.slide, 0, 0, self.size[0], self.size[1], work_mpp)

    def crop(self, x0: int, y0: int, side: int) -> np.ndarray:
        if self.image is None:
            return read_work_region(self.slide, x0, y0, side, side, self.work_mpp)
        out = np.full((side, side, 3), 255, dtype=np.uint8)
        h, w = self.image.shape[:2]
        sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = self.image[sy0:sy1, sx0:sx1]
        return out

    def points_in(self, x0: int, y0: int, side: int) -> tuple[np.ndarray, np.ndarray]:
        local = self.xy - np.array([x0, y0])
        keep = (local[:, 0] >= 0) & (local[:, 0] < side) & (local[:, 1] >= 0) & (local[:, 1] < side)
        return local[keep], self.cls[keep]


def patient_split(items: Sequence[TrainSlide], val_fraction: float, seed: int) -> tuple[list, list]:
    """Train / validation slides with no patient on both sides (at least one patient each)."""
    patients = sorted({it.patient_id for it in items})
    if len(patients) < 2:
        raise ConfigError(f"train-detector: a patient-level validation split needs slides of >= 2 patients, "
                          f"got {len(items)} slide(s) of {patients or 'none'}: add slides of another patient "
                          f"or name validation slides with --val-slides")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(patients))
    n_val = min(len(patients) - 1, max(1, int(round(val_fraction * len(patients)))))
    val = set(order[:n_val])
    return [i for i in items if i.patient_id not in val], [i for i in items if i.patient_id in val]


class _Sampler:
    def __init__(self, slides: list[_SlideData], params: DetectTrainParams, rng: np.random.Generator):
        self.slides, self.p, self.rng = slides, params, rng
        rare = [params.classes.index(c) for c in params.rare_classes if c in params.classes]
        self.rare_index = [(s, j) for s, d in enumerate(slides) for j in np.flatnonzero(np.isin(d.cls, rare))]
        self.hard: list[tuple[int, float, float]] = []     # (slide, x, y) work px

    def centres(self, n: int) -> list[tuple[int, float, float, str]]:
        p, rng = self.p, self.rng
        out = []
        for _ in range(n):
            u = rng.random()
            if u < p.rare_fraction and self.rare_index:
                s, j = self.rare_index[rng.integers(len(self.rare_index))]
                x, y = self.slides[s].xy[j]
                kind = "rare"
            elif u < p.rare_fraction + p.hard_negative_fraction and self.hard:
                s, x, y = self.hard[rng.integers(len(self.hard))]
                kind = "hard"
            else:
                s = int(rng.integers(len(self.slides)))
                cells = self.slides[s].tissue_cells_work
                x, y = cells[rng.integers(len(cells))]
                kind = "random"
            jitter = rng.uniform(-p.crop_px / 4, p.crop_px / 4, 2)
            out.append((s, x + jitter[0], y + jitter[1], kind))
        return out

    def batch(self, centres, augment: bool):
        p, side = self.p, self.p.crop_px
        imgs, heats, offs, masks, origins = [], [], [], [], []
        for s, cx, cy, _ in centres:
            d = self.slides[s]
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
            img = d.crop(x0, y0, side)
            xy, cls = d.points_in(x0, y0, side)
            if augment:
                img, xy = _flip_rotate(img, xy, self.rng)
                img = hed_jitter(img, self.rng, p.stain_sigma, p.stain_bias)
            heat, off, mask = gaussian_targets(xy, cls, len(p.classes), side, side, p.sigma_um, p.work_mpp)
            imgs.append(img)
            heats.append(heat)
            offs.append(off)
            masks.append(mask)
            origins.append((s, x0, y0, augment))
        return (np.stack(imgs), torch.from_numpy(np.stack(heats)), torch.from_numpy(np.stack(offs)),
                torch.from_numpy(np.stack(masks)), origins)


def _flip_rotate(img: np.ndarray, xy: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    side = img.shape[0]
    xy = xy.copy()
    if rng.random() < 0.5:
        img = img[:, ::-1]
        xy[:, 0] = side - xy[:, 0]
    k = int(rng.integers(4))
    for _ in range(k):  # rot90 counter-clockwise: (x, y) -> (y, side - x)
        img = np.rot90(img)
        xy = np.stack([xy[:, 1], side - xy[:, 0]], axis=1) if len(xy) else xy
    return np.ascontiguousarray(img), xy


def _loss(model, images, heat, off, mask, params, device):
    from .inference import normalise
    out = model(normalise(images, model, device))
    n = len(params.classes)
    return out, (focal_loss(out[:, :n], heat.to(device))
                 + params.offset_weight * offset_loss(out[:, n:], off.to(device), mask.to(device)))


def _mine_hard_negatives(sampler: _Sampler, out: torch.Tensor, origins, params: DetectTrainParams) -> None:
    """Rare-class peaks >= 0.5 with no rare object within the match radius -> hard-negative pool."""
    rare = [params.classes.index(c) for c in params.rare_classes if c in params.classes]
    if not rare:
        return
    n = len(params.classes)
    with torch.no_grad():
        heat = torch.sigmoid(out[:, rare].max(dim=1, keepdim=True).values.detach().float())
        peaks = find_peaks(heat, out[:, n:].detach().float(), 0.5, nms_px=2)
    radius_px = MIDOG_RADIUS_UM / params.work_mpp
    for (ixy, _xy, _score, _cls), (s, x0, y0, augmented) in zip(peaks, origins):
        if augmented or not len(ixy):   # augmented crops are flipped: positions not in slide frame
            continue
        d = sampler.slides[s]
        truth = d.xy[np.isin(d.cls, rare)]
        for x, y in ixy + np.array([x0, y0]) + 0.5:
            if not len(truth) or np.min(np.hypot(truth[:, 0] - x, truth[:, 1] - y)) > radius_px:
                sampler.hard.append((s, float(x), float(y)))
    del sampler.hard[:-500]


def cosine_factor(step_fraction: float, elapsed_s: float, limit_s: float) -> float:
    """Learning-rate factor of the cosine schedule at the progress of whichever budget is further
    spent: steps, or wall-clock time when there is a limit. On a crowded machine the wall-clock limit
    ends training before the last epoch; a step-only schedule would stop with the rate still high and
    never anneal, so progress follows the clock when it runs out first."""
    progress = step_fraction if not limit_s > 0 else max(step_fraction, elapsed_s / limit_s)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def _init_from(model: torch.nn.Module, params: DetectTrainParams) -> dict:
    """Load the weights of the checkpoint `params.init_from` into `model`; returns what to record
    (folder, hash, and the slides it was trained and validated on)."""
    from .checkpoint import checkpoint_hash, load_detector

    source, cfg = load_detector(params.init_from)
    mine = {"detector": params.detector, "model_args": dict(params.model_args), "classes": list(params.classes)}
    theirs = {k: cfg.get(k) for k in mine}
    if theirs["model_args"] is None:
        theirs["model_args"] = {}
    if mine != theirs:
        raise ConfigError(f"detect.train.init_from: {params.init_from} is {theirs}, training needs {mine}")
    model.load_state_dict(source.state_dict())
    inherited = cfg.get("init_from", {})
    return {"folder": str(params.init_from), "checkpoint": checkpoint_hash(params.init_from),
            "train_slides": sorted(set(cfg.get("train_slides", [])) | set(inherited.get("train_slides", []))),
            "val_slides": sorted(set(cfg.get("val_slides", [])) | set(inherited.get("val_slides", [])))}


def train_detector(train_items: Sequence[TrainSlide], val_items: Sequence[TrainSlide], params: DetectTrainParams,
                   out_dir: str | Path, *, progress: bool = False) -> dict:
    """Train, keep the best validation epoch, save model.safetensors + config.json in `out_dir`."""
    if not train_items or not val_items:
        raise ConfigError("train-detector: need at least one training and one validation slide")
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    device = torch.device(params.device)
    train = _Sampler([_SlideData(i, params.work_mpp) for i in train_items], params, rng)
    val = _Sampler([_SlideData(i, params.work_mpp) for i in val_items], params, np.random.default_rng(params.seed + 1))
    val_batches = [val.batch(val.centres(min(params.batch_size, params.val_crops - k)), augment=False)
                   for k in range(0, params.val_crops, params.batch_size)]
    model = create_detector(params.detector, n_classes=len(params.classes), **params.model_args).to(device)
    parent = _init_from(model, params) if params.init_from else None
    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=1e-4)
    total = params.epochs * params.steps_per_epoch
    started = time.monotonic()
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: cosine_factor(t / total, time.monotonic() - started, 60 * params.time_limit_min))
    best, best_state, history, stale = math.inf, None, [], 0
    for epoch in range(1, params.epochs + 1):
        model.train()
        losses = []
        for _ in range(params.steps_per_epoch):
            centres = train.centres(params.batch_size)
            # Half the batches un-augmented, so their peaks can be mapped back for hard-negative mining.
            augment = rng.random() < 0.5
            images, heat, off, mask, origins = train.batch(centres, augment=augment)
            out, loss = _loss(model, images, heat, off, mask, params, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if params.hard_negative_fraction > 0:
                _mine_hard_negatives(train, out, origins, params)
        model.eval()
        with torch.no_grad():
            val_loss = float(np.mean([float(_loss(model, *b[:4], params, device)[1]) for b in val_batches]))
        history.append({"epoch": epoch, "train_loss": round(float(np.mean(losses)), 5),
                        "val_loss": round(val_loss, 5), "hard_negatives": len(train.hard)})
        log.info("detector epoch %d: train %.4f val %.4f", epoch, np.mean(losses), val_loss)
        if progress:
            print(f"epoch {epoch}: train {np.mean(losses):.4f} val {val_loss:.4f} hard {len(train.hard)}", flush=True)
        if val_loss < best - 1e-5:
            best, stale = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= params.patience:
                break
        if params.time_limit_min and time.monotonic() - started >= 60 * params.time_limit_min:
            log.info("detector: time limit of %.1f min reached after epoch %d", params.time_limit_min, epoch)
            break
    model.load_state_dict(best_state)
    config = {"detector": params.detector, "model_args": dict(params.model_args), "classes": list(params.classes),
              "work_mpp": params.work_mpp, "sigma_um": params.sigma_um, "params": asdict(params),
              "train_slides": [i.slide_id for i in train_items], "val_slides": [i.slide_id for i in val_items],
              "best_val_loss": best, "history": history}
    if parent is not None:
        config["init_from"] = parent
    save_detector(out_dir, model.cpu(), config)
    return config


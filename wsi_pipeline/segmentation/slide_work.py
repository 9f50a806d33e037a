"""Segmentation of one slide of a run (FMaMIL stage 2), on top of the array-level modules:
its patch CAMs (from RUN/segment/cams/, else the fold ensemble: `CamProvider`), its working data
(image, tissue, CAM map, pseudo-labels: `load_slide_work`), and masks + exports + evaluation against
ground truth where the demo cohort wrote one (`segment_slide`). Paths come from `RunFolder`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, SlideError
from ..run.config import Config
from ..run.folder import RunFolder
from ..run.manifest import SlideRecord

METRIC_COLUMNS = ("dice_cam", "iou_cam", "dice", "iou", "truth_lesion_um2")
# CAM sources of the ensemble path: per-patch lesion-class probabilities (models with instance
# logits), or min-max instance scores times the slide probability (models without, or any model
# with segment.cam_score: instance_scores); the old unscaled rule is redone.
LOGIT_SOURCE = "ensemble:instance_logits"
SLIDE_SCALED_SOURCE = "ensemble:instance_scores*slide_prob"
OLD_RELATIVE_SOURCE = "ensemble:instance_scores"
CHOSEN_SCALED_SOURCE = "ensemble:cam_score=instance_scores*slide_prob"   # segment.cam_score: instance_scores


class CamProvider:
    """RUN/segment/cams/{slide_id}.npz, computed from the fold ensemble when missing or stale."""

    def __init__(self, cfg: Config, run: RunFolder, model_name: str, model_dir: str | Path | None):
        from ..training.ensemble import EnsembleCache

        self.cfg, self.run, self.model_name = cfg, run, model_name
        self.model_dir = Path(model_dir) if model_dir else None
        self.ensembles = EnsembleCache(cfg.train.device)

    def model_dir_for(self, record: SlideRecord) -> Path:
        return self.model_dir or self.run.mil_dir(self.model_name, record.cohort)

    def checkpoints_hash(self, model_dir: Path) -> str:
        from ..training.ensemble import checkpoints_digest

        return checkpoints_digest(self.ensembles.hashes(model_dir))

    def current_sources(self) -> tuple[str, ...]:
        """The CAM sources the ensemble path gives under the config's segment.cam_score."""
        if self.cfg.segment.cam_score == "auto":
            return (LOGIT_SOURCE, SLIDE_SCALED_SOURCE)
        return (CHOSEN_SCALED_SOURCE,)

    def cached(self, record: SlideRecord, current: str):
        """The slide's CAM file when it can be used as it is, else None (missing or stale)."""
        from . import load_patch_cams

        path = self.run.segment_cams(record.slide_id)
        if not path.is_file():
            return None
        try:
            cams = load_patch_cams(path)
        except (OSError, ValueError) as exc:
            raise SlideError(record.slide_id, f"unreadable CAM file {path}: {exc}") from None
        # CAMs an ensemble made are redone when that ensemble has changed or they were made by
        # another rule (segment.cam_score, or the old unscaled min-max scores); others are kept.
        stale = cams.source.startswith("ensemble") and current and (
            cams.model_hash != current or cams.source not in self.current_sources())
        return None if stale else cams

    def training(self, model_dir: Path) -> dict | None:
        """What the ensemble in `model_dir` was trained on (first fold's config.json), or None."""
        from ..errors import PipelineError
        from ..features.provenance import model_training_features
        from ..training.checkpoints import fold_dirs, read_fold_meta

        dirs = fold_dirs(model_dir) if Path(model_dir).is_dir() else []
        try:
            return model_training_features(read_fold_meta(dirs[0]), self.cfg.extract.encoder) if dirs else None
        except PipelineError:
            return None

    def check_inputs(self, records) -> None:
        """The features of every slide whose CAMs the ensemble will compute, against the ensemble's
        training features and the manifest's file, before anything is written (ProvenanceError)."""
        from ..features.provenance import check_features

        trainings = {}

        def training_of(record):
            model_dir = self.model_dir_for(record)
            try:
                if self.cached(record, self.checkpoints_hash(model_dir)) is not None:
                    return None  # its CAM file is used as it is: no features read
            except SlideError:
                return None  # reported per slide
            if model_dir not in trainings:
                trainings[model_dir] = self.training(model_dir)
            return trainings[model_dir]

        check_features("segment", self.run, records, training_of)

    def __call__(self, record: SlideRecord):
        path = self.run.segment_cams(record.slide_id)
        model_dir = self.model_dir_for(record)
        current = self.checkpoints_hash(model_dir)
        cams = self.cached(record, current)
        if cams is not None:
            return cams
        if not current:
            raise SlideError(record.slide_id, f"no CAMs at {path} and no trained fold ensemble at {model_dir}: "
                                              f"run the train stage (e.g. model fmamil) or write the CAM file")
        cams = self.compute(record, model_dir, current)
        from . import save_patch_cams

        save_patch_cams(path, cams)
        return cams

    def compute(self, record: SlideRecord, model_dir: Path, checkpoints_hash: str):
        from ..training.bags import read_bag
        from ..training.ensemble import ensemble_patch_scores
        from . import PatchCams

        from ..features.provenance import locate_features, model_training_features

        ensemble = self.ensembles.models(model_dir)
        meta = ensemble[0][1] if isinstance(ensemble[0], (tuple, list)) else {}
        encoder = meta.get("encoder") or self.cfg.extract.encoder
        features_path = self.run.features_h5(encoder, record.slide_id)
        if meta and features_path.is_file():  # the ensemble's kind of features, of this file
            locate_features(self.run, record, model_training_features(meta, encoder))
        features, coords, attrs = read_bag(features_path, record.slide_id)
        patch_size_level0 = attrs.get("patch_size_level0")
        if patch_size_level0 is None:
            raise SlideError(record.slide_id, "features file lacks the patch_size_level0 attribute")
        try:
            out = ensemble_patch_scores(ensemble, features, coords)
        except ValueError as exc:
            raise SlideError(record.slide_id, str(exc)) from None
        wanted = self.cfg.segment.lesion_class or out.classes[-1]
        if wanted not in out.classes:
            raise ConfigError(f"segment.lesion_class {wanted!r} is not among the model's classes {out.classes}")
        if out.class_probs is not None and self.cfg.segment.cam_score == "auto":
            scores = out.class_probs[:, out.classes.index(wanted)]
            source = LOGIT_SOURCE
        else:
            # Min-max scores are relative: every slide's top patch reaches 1, a normal slide's too.
            # Scaled by the ensemble's slide probability of the lesion class they become "lesion
            # here and in this slide": low everywhere on a slide the model calls normal.
            slide_prob = float(out.slide_probs[out.classes.index(wanted)])
            scores = np.clip(out.instance, 0.0, 1.0) * slide_prob
            source = SLIDE_SCALED_SOURCE if self.cfg.segment.cam_score == "auto" else CHOSEN_SCALED_SOURCE
        return PatchCams(coords, scores, float(patch_size_level0), lesion_class=wanted, source=source,
                         model_hash=checkpoints_hash)


@dataclass
class SlideWork:
    record: SlideRecord
    grid: object            # segmentation.SlideGrid (working resolution)
    image: np.ndarray       # (h, w, 3) uint8
    tissue: np.ndarray      # (h, w) bool
    cam: np.ndarray         # (h, w) float32, NaN where no patch
    labels: object          # segmentation.PseudoLabels
    negative: bool          # all-background labels from the slide's label
    app_mag: float | None
    gate: float = 0.0       # stage-2 mask only where cam >= gate (0: no gate)


def is_negative(record: SlideRecord, lesion_class: str, cfg: Config) -> bool:
    return bool(cfg.segment.negatives_background and record.label and lesion_class
                and record.label != lesion_class)


def load_slide_work(record: SlideRecord, cams, cfg: Config, thresholds=None) -> SlideWork:
    """The slide's working data; `thresholds` (`calibration.CamThresholds`): the run's calibrated
    cam_low / cam_high / gate, else the config's (no gate)."""
    from ..slides import open_slide
    from ..tiling.tissue import detect_tissue
    from . import SlideGrid, cam_map, make_pseudo_labels, read_grid_image

    if not record.path.is_file():
        raise SlideError(record.slide_id, f"file not found: {record.path}")
    with open_slide(record.path, slide_id=record.slide_id, backend=cfg.slides.backend,
                    mpp_override=record.mpp) as slide:
        grid = SlideGrid.for_mpp(slide.dimensions, slide.mpp, cfg.segment.work_mpp)
        image = read_grid_image(slide, grid)
        mag = slide.properties.get("openslide.objective-power") or slide.properties.get("aperio.AppMag")
    w0, h0 = grid.level0_wh
    if len(cams.coords) and ((cams.coords < 0).any() or (cams.coords[:, 0] >= w0).any()
                             or (cams.coords[:, 1] >= h0).any()):
        raise SlideError(record.slide_id, f"CAM patch coordinates fall outside the {w0}x{h0} slide "
                                          f"(CAMs of another slide?)")
    t = cfg.tissue
    tissue = detect_tissue(image, grid.mpp, saturation_threshold=t.saturation_threshold,
                           min_saturation=t.min_saturation, median_kernel_um=t.median_kernel_um,
                           closing_um=t.closing_um, min_tissue_area_um2=t.min_tissue_area_um2,
                           min_hole_area_um2=t.min_hole_area_um2, keep_holes=t.keep_holes)
    cam = cam_map(cams.coords, cams.scores, cams.patch_size_level0, grid)
    negative = is_negative(record, cams.lesion_class, cfg)
    s = cfg.segment
    low, high, gate = ((thresholds.cam_low, thresholds.cam_high, thresholds.gate) if thresholds is not None
                       else (s.cam_low, s.cam_high, 0.0))
    labels = make_pseudo_labels(cam, cam_low=low, cam_high=high, tissue=tissue,
                                soft_weight=s.soft_weight, negative=negative)
    try:
        app_mag = float(mag) if mag else None
    except ValueError:
        app_mag = None
    return SlideWork(record, grid, image, tissue, cam, labels, negative, app_mag, gate)


def load_truth(slide_path: Path) -> tuple[np.ndarray, float] | None:
    """(lesion mask (h, w) bool, level-0 px per mask px) from `{stem}.truth.json` beside the slide
    (the demo cohort's ground truth), or None when there is none."""
    from PIL import Image

    sidecar = Path(f"{slide_path.with_suffix('')}.truth.json")
    if not sidecar.is_file():
        return None
    truth = json.loads(sidecar.read_text(encoding="utf-8"))
    if not truth.get("lesion_mask") or not truth.get("lesion_mask_downsample"):
        return None
    with Image.open(sidecar.parent / truth["lesion_mask"]) as im:
        mask = np.asarray(im.convert("L")) > 0
    return mask, float(truth["lesion_mask_downsample"])


def segment_slide(work: SlideWork, model, cfg: Config, run: RunFolder, device) -> dict:
    """Inference, exports and (with ground truth) evaluation of one slide; returns its done record."""
    from ..exports.qupath import write_geojson
    from . import (SlideGrid, lesion_geojson, lesion_mask, predict_probability_map, score_mask,
                   write_mask_tiff)

    s, grid, sid = cfg.segment, work.grid, work.record.slide_id
    prob = predict_probability_map(model, work.image, window_px=s.window_px, overlap=s.overlap,
                                   batch_size=s.batch_size, tissue=work.tissue, device=device)
    if work.gate > 0:
        # No lesion where the CAM does not support one (NaN: no patch there, no evidence).
        with np.errstate(invalid="ignore"):
            prob = np.where(work.cam >= work.gate, prob, 0.0).astype(np.float32)
    mask_grid = SlideGrid.for_mpp(grid.level0_wh, grid.slide_mpp, s.mask_mpp)
    mask = lesion_mask(prob, grid, mask_grid, threshold=s.threshold, min_area_um2=s.min_lesion_area_um2)
    collection = lesion_geojson(mask, mask_grid)
    write_geojson(run.segment_geojson(sid), collection)
    write_mask_tiff(run.segment_tif(sid), mask, mask_grid, app_mag=work.app_mag,
                    description_fields={"Slide": sid})
    metrics = None
    truth = load_truth(work.record.path)
    if truth is not None:
        truth_mask, truth_downsample = truth
        cam_prob = np.where(np.isfinite(work.cam) & work.tissue, work.cam, 0.0).astype(np.float32)
        cam_mask = lesion_mask(cam_prob, grid, mask_grid, threshold=s.threshold,
                               min_area_um2=s.min_lesion_area_um2)
        cam_scores = score_mask(cam_mask, mask_grid.downsample, truth_mask, truth_downsample)
        seg_scores = score_mask(mask, mask_grid.downsample, truth_mask, truth_downsample)
        metrics = {"dice_cam": cam_scores["dice"], "iou_cam": cam_scores["iou"],
                   "dice": seg_scores["dice"], "iou": seg_scores["iou"],
                   "truth_lesion_um2": float(truth_mask.sum() * (truth_downsample * grid.slide_mpp) ** 2)}
    return {
        "n_lesions": len(collection["features"]),
        "lesion_area_um2": float(mask.sum() * mask_grid.mpp ** 2),
        "mask_downsample": int(mask_grid.downsample),
        "mask_mpp": float(mask_grid.mpp),
        "work_mpp": float(grid.mpp),
        "slide_mpp": float(grid.slide_mpp),
        "negative_label": work.negative,
        "cam_gate": float(work.gate),
        "metrics": metrics,
    }

"""Stage 4b — segment: patch CAMs -> soft pseudo-labels -> a VM-UNet-style segmenter trained with
self-correction -> per-slide lesion masks (FMaMIL stage 2).

Inputs, per slide of the manifest:
  RUN/segment/cams/{slide_id}.npz   per-patch lesion scores (`segmentation.cam`: coords, scores,
                                    patch_size_level0, lesion_class, ...). Written here from the fold
                                    ensemble when missing (or made by an older ensemble): features
                                    RUN/features/{encoder}/{slide_id}.h5 + RUN/mil/{model}/{cohort}/
                                    (or --model-dir); the score is the ensemble's per-patch softmax
                                    probability of the lesion class when the model has instance
                                    logits (fmamil), else its min-max normalised instance score.
                                    Any other CAM source can write this file instead.
  the slide itself                  read once at segment.work_mpp (the working grid).
Outputs (RUN/segment/):
  model/model.safetensors, model/config.json   one segmenter trained on all slides' pseudo-labels;
                                    config.json (written last) records what it was trained on, so a
                                    rerun retrains only when the CAMs, labels or config change.
  {slide_id}.tif                    lesion mask as a pyramidal TIFF on the slide's level-0 geometry and
                                    mpp (255 = lesion; one mask pixel per segment.mask_mpp).
  {slide_id}.geojson                QuPath annotations "Lesion", polygons in level-0 px.
  {slide_id}.done.json              written last: identity of the inputs, outputs, metrics.
  metrics.csv                       slide_id, dice_cam, iou_cam, dice, iou, truth_lesion_um2 for slides with ground
                                    truth ({slide path stem}.truth.json with `lesion_mask` and
                                    `lesion_mask_downsample`, as the demo cohort writes): CAM-only
                                    (CAM >= threshold) vs stage 2, both through the same mask step.

Training holds every slide's working-resolution image, CAM map, tissue mask and labels in memory
(about 20 bytes per working pixel: ~30 MB for a 50k x 30k slide at 0.25 µm/px with an 8 µm/px
working grid), and each self-correction round predicts every training slide once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from wsi_pipeline.config import Config
from wsi_pipeline.errors import ConfigError, PipelineError, SlideError
from wsi_pipeline.io import remove_stale_temps, sha256_file, write_csv_atomic, write_json_atomic
from wsi_pipeline.manifest import Manifest, SlideRecord
from wsi_pipeline.names import check_name
from wsi_pipeline.run_folder import RunFolder

from .batch import BatchReport, run_batch

STAGE = "segment"
DONE_FORMAT_VERSION = 1
METRIC_COLUMNS = ("dice_cam", "iou_cam", "dice", "iou", "truth_lesion_um2")
log = logging.getLogger("wsi_pipeline")


def add_arguments(p) -> None:
    p.add_argument("--manifest", required=True, help="slide manifest CSV (labels used for negatives)")
    p.add_argument("--run", required=True, help="run folder (features/ and mil/, or segment/cams/)")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--model", default=None, help="MIL model whose CAMs are used (default: train.model)")
    p.add_argument("--model-dir", default=None,
                   help="fold ensemble folder (fold_*/); default RUN/mil/MODEL/{slide's cohort}")
    p.add_argument("--slides", default=None, help="comma-separated slide_ids (default: all)")
    p.add_argument("--exclude-slides", default=None, metavar="A,B",
                   help="comma-separated slide_ids to leave out (e.g. slides whose extraction failed)")
    p.add_argument("--force", action="store_true", help="retrain and redo every slide")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cli(args) -> int:
    from wsi_pipeline.config import load_config
    from wsi_pipeline.manifest import load_manifest

    cfg = load_config(args.config)
    manifest = load_manifest(args.manifest)
    if args.exclude_slides:
        manifest = manifest.without(s.strip() for s in args.exclude_slides.split(","))
    slides = [s.strip() for s in args.slides.split(",") if s.strip()] if args.slides else None
    result = run_segment(manifest, cfg, args.run, model_dir=args.model_dir, model=args.model, slides=slides,
                         force=args.force, progress=not args.no_progress)
    print(result.report.summary())
    with_lesion = [m for m in result.metrics.values() if m["truth_lesion_um2"] > 0]
    if with_lesion:
        # Slides without a true lesion score 1.0 or 0.0 (empty masks); the mean is over the others.
        mean = {k: float(np.mean([m[k] for m in with_lesion])) for k in ("dice_cam", "dice")}
        print(f"segment: mean Dice vs ground truth over {len(with_lesion)} slide(s) with a lesion: CAM only "
              f"{mean['dice_cam']:.3f}, stage 2 {mean['dice']:.3f} (per slide: {result.metrics_csv})")
    if result.report.failed:
        print(f"failed slides are listed in {args.run}/failures.csv", file=sys.stderr)
    return 0 if result.report.ok else 1


# --------------------------------------------------------------------------------------------
# Paths and identities
# --------------------------------------------------------------------------------------------


class SegmentPaths:
    """RUN/segment/ layout. Paths built from a slide_id go through the run folder's checks (a safe
    name, inside RUN), like RunFolder's own."""

    def __init__(self, run: RunFolder):
        self.run = run
        self.root = run.segment_dir

    def _slide_file(self, folder: Path, slide_id: str, suffix: str) -> Path:
        return self.run.inside(folder / f"{self.run.name(slide_id, 'slide_id')}{suffix}")

    @property
    def cams_dir(self) -> Path:
        return self.root / "cams"

    def cams(self, slide_id: str) -> Path:
        return self._slide_file(self.cams_dir, slide_id, ".npz")

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    def tif(self, slide_id: str) -> Path:
        return self._slide_file(self.root, slide_id, ".tif")

    def geojson(self, slide_id: str) -> Path:
        return self._slide_file(self.root, slide_id, ".geojson")

    def done(self, slide_id: str) -> Path:
        return self._slide_file(self.root, slide_id, ".done.json")

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _checkpoints_hash(model_dir: Path) -> str:
    files = sorted(p for p in model_dir.glob("fold_*/**/*") if p.is_file())
    return _hash_json({p.relative_to(model_dir).as_posix(): sha256_file(p) for p in files}) if files else ""


# Keys that only shape the masks drawn from the probability map: changing them redoes the slides'
# outputs but keeps the trained segmenter.
INFERENCE_ONLY_KEYS = ("mask_mpp", "threshold", "min_lesion_area_um2")


def training_config(cfg: Config) -> dict:
    """What the trained segmenter depends on: the segment section (less inference-only keys), tissue
    detection (pseudo-labels use it) and the slide reader."""
    segment = {k: v for k, v in dataclasses.asdict(cfg.segment).items() if k not in INFERENCE_ONLY_KEYS}
    return {"segment": segment, "tissue": dataclasses.asdict(cfg.tissue), "slides": dataclasses.asdict(cfg.slides)}


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"segment.device {name!r}: no CUDA device available (use auto or cpu)")
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# CAMs
# --------------------------------------------------------------------------------------------


class CamProvider:
    """RUN/segment/cams/{slide_id}.npz, computed from the fold ensemble when missing or stale."""

    def __init__(self, cfg: Config, run: RunFolder, paths: SegmentPaths, model_name: str,
                 model_dir: str | Path | None):
        self.cfg, self.run, self.paths, self.model_name = cfg, run, paths, model_name
        self.model_dir = Path(model_dir) if model_dir else None
        self._hashes: dict[Path, str] = {}
        self._ensembles: dict[Path, list] = {}

    def model_dir_for(self, record: SlideRecord) -> Path:
        return self.model_dir or self.run.mil_dir(self.model_name, record.cohort)

    def checkpoints_hash(self, model_dir: Path) -> str:
        if model_dir not in self._hashes:
            self._hashes[model_dir] = _checkpoints_hash(model_dir) if model_dir.is_dir() else ""
        return self._hashes[model_dir]

    def __call__(self, record: SlideRecord):
        from wsi_pipeline.segmentation import load_patch_cams

        path = self.paths.cams(record.slide_id)
        model_dir = self.model_dir_for(record)
        current = self.checkpoints_hash(model_dir)
        if path.is_file():
            try:
                cams = load_patch_cams(path)
            except (OSError, ValueError) as exc:
                raise SlideError(record.slide_id, f"unreadable CAM file {path}: {exc}") from None
            # CAMs an ensemble made are redone when that ensemble has changed; others are kept.
            if not (cams.source.startswith("ensemble") and current and cams.model_hash != current):
                return cams
        if not current:
            raise SlideError(record.slide_id, f"no CAMs at {path} and no trained fold ensemble at {model_dir}: "
                                              f"run the train stage (e.g. model fmamil) or write the CAM file")
        cams = self.compute(record, model_dir, current)
        from wsi_pipeline.segmentation import save_patch_cams

        save_patch_cams(path, cams)
        return cams

    def compute(self, record: SlideRecord, model_dir: Path, checkpoints_hash: str):
        from wsi_pipeline.segmentation import PatchCams
        from wsi_pipeline.training.bags import load_bag
        from wsi_pipeline.training.checkpoints import load_ensemble
        from wsi_pipeline.training.inference import ensemble_predict

        if model_dir not in self._ensembles:
            models = load_ensemble(model_dir, device=_resolve_device(self.cfg.train.device))
            if not models:
                raise PipelineError(f"no models loaded from {model_dir}")
            self._ensembles[model_dir] = models
        ensemble = self._ensembles[model_dir]
        meta = ensemble[0][1] if isinstance(ensemble[0], (tuple, list)) else {}
        encoder = meta.get("encoder") or self.cfg.extract.encoder
        features, coords, attrs = load_bag(self.run.features_h5(encoder, record.slide_id), record.slide_id)
        patch_size_level0 = attrs.get("patch_size_level0")
        if patch_size_level0 is None:
            raise SlideError(record.slide_id, "features file lacks the patch_size_level0 attribute")
        out = ensemble_predict(ensemble, features, coords)
        classes = [str(c) for c in out.classes]
        wanted = self.cfg.segment.lesion_class or classes[-1]
        if wanted not in classes:
            raise ConfigError(f"segment.lesion_class {wanted!r} is not among the model's classes {classes}")
        logits = out.instance_logits
        if logits is not None and len(classes) > 1:
            logits = np.asarray(logits, dtype=np.float64).reshape(len(coords), -1)
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            scores = (z / z.sum(axis=1, keepdims=True))[:, classes.index(wanted)]
            source = "ensemble:instance_logits"
        else:
            # Relative scores (min-max per slide): every slide's top patches reach 1.
            scores = np.clip(np.asarray(out.instance_scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
            source = "ensemble:instance_scores"
        return PatchCams(coords, scores, float(patch_size_level0), lesion_class=wanted, source=source,
                         model_hash=checkpoints_hash)


# --------------------------------------------------------------------------------------------
# Per-slide working data
# --------------------------------------------------------------------------------------------


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


def is_negative(record: SlideRecord, lesion_class: str, cfg: Config) -> bool:
    return bool(cfg.segment.negatives_background and record.label and lesion_class
                and record.label != lesion_class)


def load_slide_work(record: SlideRecord, cams, cfg: Config) -> SlideWork:
    from wsi_pipeline.segmentation import SlideGrid, cam_map, make_pseudo_labels, read_grid_image
    from wsi_pipeline.slides import open_slide
    from wsi_pipeline.tissue import detect_tissue

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
    labels = make_pseudo_labels(cam, cam_low=s.cam_low, cam_high=s.cam_high, tissue=tissue,
                                soft_weight=s.soft_weight, negative=negative)
    try:
        app_mag = float(mag) if mag else None
    except ValueError:
        app_mag = None
    return SlideWork(record, grid, image, tissue, cam, labels, negative, app_mag)


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


# --------------------------------------------------------------------------------------------
# The segmenter
# --------------------------------------------------------------------------------------------


def train_params(cfg: Config):
    from wsi_pipeline.segmentation import TrainParams

    s = cfg.segment
    return TrainParams(epochs=s.epochs, steps_per_epoch=s.steps_per_epoch, batch_size=s.batch_size,
                       crop_px=s.crop_px, lr=s.lr, correct_from_epoch=s.correct_from_epoch,
                       correct_confidence=s.correct_confidence, correct_blend=s.correct_blend,
                       window_px=s.window_px, overlap=s.overlap, seed=s.seed)


def build_segmenter(cfg: Config):
    import torch

    from wsi_pipeline.models.seg import create_segmenter

    torch.manual_seed(cfg.segment.seed)
    try:
        return create_segmenter(cfg.segment.model, **cfg.segment.model_args)
    except KeyError as exc:
        raise ConfigError(f"segment.model: {exc.args[0]}") from None
    except TypeError as exc:
        raise ConfigError(f"segment.model_args: {exc}") from None


def model_is_current(paths: SegmentPaths, identity: str) -> bool:
    meta_path = paths.model_dir / "config.json"
    if not (meta_path.is_file() and (paths.model_dir / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")).get("identity") == identity
    except (OSError, json.JSONDecodeError):
        return False


def save_segmenter(model, paths: SegmentPaths, meta: dict) -> None:
    from safetensors.torch import save_model

    from wsi_pipeline.io import atomic_path

    paths.model_dir.mkdir(parents=True, exist_ok=True)
    (paths.model_dir / "config.json").unlink(missing_ok=True)
    with atomic_path(paths.model_dir / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    write_json_atomic(paths.model_dir / "config.json", meta)


def load_segmenter(cfg: Config, paths: SegmentPaths, device):
    from safetensors.torch import load_model

    model = build_segmenter(cfg)
    load_model(model, str(paths.model_dir / "model.safetensors"), device=str(device))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclass
class SegmentResult:
    report: BatchReport
    metrics: dict                   # slide_id -> {dice_cam, iou_cam, dice, iou, truth_lesion_um2} (with truth)
    metrics_csv: Path
    trained: bool


def _remove_stale_temps(paths: SegmentPaths, slide_id: str) -> None:
    """Temp files a dead run left for exactly this slide's outputs ({id}.tif, .geojson, .done.json):
    other slides' jobs share the folder, and slide `X`'s names must not match slide `X.done`'s."""
    remove_stale_temps(paths.root, [paths.tif(slide_id), paths.geojson(slide_id), paths.done(slide_id)])


def segment_slide(work: SlideWork, model, cfg: Config, paths: SegmentPaths, device) -> dict:
    """Inference, exports and (with ground truth) evaluation of one slide; returns its done record."""
    from wsi_pipeline.exports.qupath import write_geojson
    from wsi_pipeline.segmentation import (SlideGrid, lesion_geojson, lesion_mask, predict_probability_map,
                                           score_mask, write_mask_tiff)

    s, grid, sid = cfg.segment, work.grid, work.record.slide_id
    prob = predict_probability_map(model, work.image, window_px=s.window_px, overlap=s.overlap,
                                   batch_size=s.batch_size, tissue=work.tissue, device=device)
    mask_grid = SlideGrid.for_mpp(grid.level0_wh, grid.slide_mpp, s.mask_mpp)
    mask = lesion_mask(prob, grid, mask_grid, threshold=s.threshold, min_area_um2=s.min_lesion_area_um2)
    collection = lesion_geojson(mask, mask_grid)
    write_geojson(paths.geojson(sid), collection)
    write_mask_tiff(paths.tif(sid), mask, mask_grid, app_mag=work.app_mag,
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
        "metrics": metrics,
    }


def run_segment(manifest: Manifest, cfg: Config, run_dir: str | os.PathLike, *,
                model_dir: str | os.PathLike | None = None, model: str | None = None,
                slides: Iterable[str] | None = None, force: bool = False,
                progress: bool = True) -> SegmentResult:
    """CAMs -> pseudo-labels -> one segmenter trained on all slides -> masks for every slide of
    `manifest` (or the `slides` subset) in RUN/segment/; per-slide failures are recorded."""
    model_name = check_name(model, "--model") if model else cfg.train.model
    if slides is not None:
        manifest = manifest.select(slides)
    run = RunFolder(run_dir)
    paths = SegmentPaths(run)
    paths.root.mkdir(parents=True, exist_ok=True)
    # Leftovers of dead writers only: a second segment run on RUN may be writing here right now.
    remove_stale_temps(paths.cams_dir)
    remove_stale_temps(paths.model_dir)
    provider = CamProvider(cfg, run, paths, model_name, model_dir)
    report = BatchReport(STAGE)

    # 1. CAMs (from the file, else from the ensemble).
    cams: dict[str, object] = {}

    def get_cams(record: SlideRecord) -> str:
        cams[record.slide_id] = provider(record)
        return "done"

    first = run_batch(STAGE, manifest, run, get_cams, progress=False)
    report.failed.update(first.failed)
    report.problems.extend(first.problems)
    records = [r for r in manifest if r.slide_id in cams]
    metrics_csv = paths.metrics_csv
    if not records:
        return SegmentResult(report, {}, metrics_csv, trained=False)

    cam_hashes = {r.slide_id: sha256_file(paths.cams(r.slide_id)) for r in records}
    model_identity = _hash_json({
        "config": training_config(cfg),
        "slides": {r.slide_id: {"path": str(r.path), "mpp": r.mpp, "cams": cam_hashes[r.slide_id],
                                "negative": is_negative(r, cams[r.slide_id].lesion_class, cfg)}
                   for r in records},
    })
    need_training = force or not model_is_current(paths, model_identity)

    device = _resolve_device(cfg.segment.device)
    works: dict[str, SlideWork] = {}

    def load_work(record: SlideRecord) -> str:
        works[record.slide_id] = load_slide_work(record, cams[record.slide_id], cfg)
        return "done"

    # 2. Train one segmenter on every slide's pseudo-labels (unless an identical one exists).
    if need_training:
        loaded = run_batch(STAGE, records, run, load_work, progress=progress)
        report.failed.update(loaded.failed)
        report.problems.extend(loaded.problems)
        records = [r for r in records if r.slide_id in works]
        if not records:
            return SegmentResult(report, {}, metrics_csv, trained=False)
        from wsi_pipeline.segmentation import TrainingSlide, train_segmenter

        segmenter = build_segmenter(cfg)
        params = train_params(cfg)
        training = [TrainingSlide(sid, w.image, w.labels, w.tissue) for sid, w in works.items()]
        history = train_segmenter(segmenter, training, params, device=device, progress=progress)
        save_segmenter(segmenter, paths, {
            "identity": model_identity,
            "segmenter": cfg.segment.model,
            "model_args": cfg.segment.model_args,
            "input_mean": list(segmenter.input_mean),
            "input_std": list(segmenter.input_std),
            "work_mpp": cfg.segment.work_mpp,
            "train": dataclasses.asdict(params),
            "history": dataclasses.asdict(history),
            "slides": sorted(works),
        })
    segmenter = load_segmenter(cfg, paths, device)
    model_sha = sha256_file(paths.model_dir / "model.safetensors")
    config_hash = cfg.section_hash("segment", "tissue", "slides")

    # 3. Masks, exports and evaluation per slide.
    def identity(record: SlideRecord) -> dict:
        return {"format_version": DONE_FORMAT_VERSION, "slide_id": record.slide_id, "slide_path": str(record.path),
                "slide_mpp_override": record.mpp, "cams": cam_hashes[record.slide_id], "model": model_sha,
                "segment_config_hash": config_hash}

    def is_complete(record: SlideRecord) -> bool:
        sid = record.slide_id
        done = paths.done(sid)
        if not (done.is_file() and paths.tif(sid).is_file() and paths.geojson(sid).is_file()):
            return False
        try:
            return json.loads(done.read_text(encoding="utf-8")).get("identity") == identity(record)
        except (OSError, json.JSONDecodeError):
            return False

    def process(record: SlideRecord) -> str:
        sid = record.slide_id
        if not force and is_complete(record):
            return "skipped"
        paths.done(sid).unlink(missing_ok=True)
        _remove_stale_temps(paths, sid)
        work = works.pop(sid, None) or load_slide_work(record, cams[sid], cfg)
        result = segment_slide(work, segmenter, cfg, paths, device)
        write_json_atomic(paths.done(sid), {
            "identity": identity(record),
            "outputs": {"tif": paths.tif(sid).name, "geojson": paths.geojson(sid).name},
            "cam_source": cams[sid].source,
            **result,
        })
        return "done"

    last = run_batch(STAGE, records, run, process, progress=progress)
    report.done.extend(last.done)
    report.skipped.extend(last.skipped)
    report.failed.update(last.failed)
    report.problems.extend(last.problems)

    metrics = {}
    for record in manifest:
        done = paths.done(record.slide_id)
        if record.slide_id in report.failed or not done.is_file():
            continue
        m = json.loads(done.read_text(encoding="utf-8")).get("metrics")
        if m:
            metrics[record.slide_id] = m
    write_csv_atomic(metrics_csv, ["slide_id", *METRIC_COLUMNS],
                     [[sid, *(f"{m[k]:.4f}" if k != "truth_lesion_um2" else f"{m[k]:.0f}" for k in METRIC_COLUMNS)]
                      for sid, m in metrics.items()])
    run.write_failures_csv()
    return SegmentResult(report, metrics, metrics_csv, trained=need_training)

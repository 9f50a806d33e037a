"""Stage 4b — segment: patch CAMs -> soft pseudo-labels -> a VM-UNet-style segmenter trained with
self-correction -> per-slide lesion masks (FMaMIL stage 2).

Inputs, per slide of the manifest:
  RUN/segment/cams/{slide_id}.npz   per-patch lesion scores (`segmentation.cam`: coords, scores,
                                    patch_size_level0, lesion_class, ...). Written here from the fold
                                    ensemble when missing (or made by an older ensemble): features
                                    RUN/features/{encoder}/{slide_id}.h5 + RUN/mil/{model}/{cohort}/
                                    (or --model-dir); the score is the ensemble's per-patch softmax
                                    probability of the lesion class when the model has instance
                                    logits (fmamil), else its min-max normalised instance score
                                    times its slide probability of the lesion class.
                                    Any other CAM source can write this file instead. Features the
                                    ensemble cannot use (made otherwise than its training features,
                                    or from another file than the manifest's) refuse the command
                                    before anything is written (exit 2; wsi_pipeline/features/provenance.py).
  the slide itself                  read once at segment.work_mpp (the working grid).
CAM thresholds: segment.cam_high (and with segment.gate_negatives the gate) raised above the CAM
scores that the slides labelled negative reach (segment.negative_quantile; `segmentation.calibration`);
the stage-2 mask is kept only where the CAM map is >= the gate (segment.cam_gate; 0: no gate).
Recorded in model/config.json and each done.json.
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
import json
import os
from typing import Iterable

from wsi_pipeline.io import remove_stale_temps, sha256_file, write_json_atomic
from wsi_pipeline.run.config import Config
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import Manifest, SlideRecord
from wsi_pipeline.run.names import check_name
from wsi_pipeline.segmentation.outputs import collect_metrics, hash_json, remove_slide_temps
from wsi_pipeline.segmentation.slide_work import CamProvider, is_negative, load_slide_work

from .base import CONFIG, check_model_arg, EXCLUDE, MANIFEST, NO_PROGRESS, SLIDES, Stage, StageReport, arg
from .batch import run_batch

__all__ = ["SEGMENT", "remove_slide_temps", "run_segment"]

STAGE = "segment"
DONE_FORMAT_VERSION = 1


def run_segment(manifest: Manifest, cfg: Config, run_dir: str | os.PathLike, *,
                model_dir: str | os.PathLike | None = None, model: str | None = None,
                slides: Iterable[str] | None = None, force: bool = False,
                progress: bool = True) -> StageReport:
    """CAMs -> pseudo-labels -> one segmenter trained on all slides -> masks for every slide of
    `manifest` (or the `slides` subset) in RUN/segment/; per-slide failures are recorded. The
    report's details: metrics ({slide_id: dice_cam, iou_cam, dice, iou, truth_lesion_um2} for
    slides with ground truth), metrics_csv, trained (whether the segmenter was (re)trained)."""
    from wsi_pipeline.devices import resolve_device
    from wsi_pipeline.segmentation.segmenter_store import (build_segmenter, load_segmenter, model_is_current,
                                                           save_segmenter, train_params, training_config)

    model_name = check_name(model, "--model") if model else cfg.train.model
    if slides is not None:
        manifest = manifest.select(slides)
    run = RunFolder(run_dir)
    provider = CamProvider(cfg, run, model_name, model_dir)
    provider.check_inputs(manifest)  # features the ensemble cannot use: refused before anything is written
    run.segment_dir.mkdir(parents=True, exist_ok=True)
    # Leftovers of dead writers only: a second segment run on RUN may be writing here right now.
    remove_stale_temps(run.segment_cams_dir)
    remove_stale_temps(run.segment_model_dir)
    report = StageReport(STAGE, details={"metrics": {}, "metrics_csv": run.segment_metrics_csv, "trained": False})

    # 1. CAMs (from the file, else from the ensemble).
    cams: dict[str, object] = {}

    def get_cams(record: SlideRecord) -> str:
        cams[record.slide_id] = provider(record)
        return "done"

    first = run_batch(STAGE, manifest, run, get_cams, progress=False)
    report.failed.update(first.failed)
    report.problems.extend(first.problems)
    records = [r for r in manifest if r.slide_id in cams]
    if not records:
        return report

    cam_hashes = {r.slide_id: sha256_file(run.segment_cams(r.slide_id)) for r in records}
    thresholds = cam_thresholds(records, cams, cfg)
    report.details["cam_thresholds"] = thresholds.as_dict()
    if thresholds.negative_level is not None and thresholds.negative_level > cfg.segment.cam_high:
        report.notes.append(
            f"segment: CAM scores on {thresholds.n_negative_slides} negative slide(s) reach "
            f"{thresholds.negative_level:.3f} (quantile {cfg.segment.negative_quantile}); cam_high raised to "
            f"{thresholds.cam_high:.3f}, gate {thresholds.gate:.3f}")
    model_identity = hash_json({
        "config": training_config(cfg),
        "slides": {r.slide_id: {"path": str(r.path), "mpp": r.mpp, "cams": cam_hashes[r.slide_id],
                                "negative": is_negative(r, cams[r.slide_id].lesion_class, cfg)}
                   for r in records},
    })
    need_training = force or not model_is_current(run.segment_model_dir, model_identity)
    device = resolve_device(cfg.segment.device, "segment.device")
    works: dict[str, object] = {}

    def load_work(record: SlideRecord) -> str:
        works[record.slide_id] = load_slide_work(record, cams[record.slide_id], cfg, thresholds)
        return "done"

    # 2. Train one segmenter on every slide's pseudo-labels (unless an identical one exists).
    if need_training:
        loaded = run_batch(STAGE, records, run, load_work, progress=progress)
        report.failed.update(loaded.failed)
        report.problems.extend(loaded.problems)
        records = [r for r in records if r.slide_id in works]
        if not records:
            return report
        from wsi_pipeline.segmentation import TrainingSlide, train_segmenter

        segmenter = build_segmenter(cfg)
        params = train_params(cfg)
        training = [TrainingSlide(sid, w.image, w.labels, w.tissue) for sid, w in works.items()]
        history = train_segmenter(segmenter, training, params, device=device, progress=progress)
        save_segmenter(segmenter, run.segment_model_dir, {
            "identity": model_identity, "segmenter": cfg.segment.model, "model_args": cfg.segment.model_args,
            "input_mean": list(segmenter.input_mean), "input_std": list(segmenter.input_std),
            "cam_thresholds": thresholds.as_dict(),
            "work_mpp": cfg.segment.work_mpp, "train": dataclasses.asdict(params),
            "history": dataclasses.asdict(history), "slides": sorted(works),
        })
    report.details["trained"] = need_training
    segmenter = load_segmenter(cfg, run.segment_model_dir, device)
    model_sha = sha256_file(run.segment_model_dir / "model.safetensors")
    config_hash = cfg.section_hash("segment", "tissue", "slides")

    # 3. Masks, exports and evaluation per slide.
    def identity(record: SlideRecord) -> dict:
        return {"format_version": DONE_FORMAT_VERSION, "slide_id": record.slide_id, "slide_path": str(record.path),
                "slide_mpp_override": record.mpp, "cams": cam_hashes[record.slide_id], "model": model_sha,
                "segment_config_hash": config_hash, "cam_thresholds": thresholds.as_dict()}

    def is_complete(record: SlideRecord) -> bool:
        sid = record.slide_id
        done = run.segment_done(sid)
        if not (done.is_file() and run.segment_tif(sid).is_file() and run.segment_geojson(sid).is_file()):
            return False
        try:
            return json.loads(done.read_text(encoding="utf-8")).get("identity") == identity(record)
        except (OSError, json.JSONDecodeError):
            return False

    def process(record: SlideRecord) -> str:
        from wsi_pipeline.segmentation.slide_work import segment_slide

        sid = record.slide_id
        if not force and is_complete(record):
            return "skipped"
        run.segment_done(sid).unlink(missing_ok=True)
        remove_slide_temps(run, sid)
        work = works.pop(sid, None) or load_slide_work(record, cams[sid], cfg, thresholds)
        result = segment_slide(work, segmenter, cfg, run, device)
        write_json_atomic(run.segment_done(sid), {
            "identity": identity(record),
            "outputs": {"tif": run.segment_tif(sid).name, "geojson": run.segment_geojson(sid).name},
            "cam_source": cams[sid].source,
            **result,
        })
        return "done"

    report.merge(run_batch(STAGE, records, run, process, progress=progress))
    outputs, metrics, note = collect_metrics(run, [r.slide_id for r in manifest], report.failed)
    report.outputs.update(outputs)
    report.details["metrics"].update(metrics)
    run.write_failures_csv()
    if note:
        report.notes.append(note)
    return report


def cam_thresholds(records, cams: dict, cfg: Config):
    """`calibration.CamThresholds` of this run: the config's, raised above the CAM scores of the
    slides whose label marks them negative (`segment.negative_quantile`)."""
    from wsi_pipeline.segmentation import calibrate_thresholds

    s = cfg.segment
    negatives = [cams[r.slide_id].scores for r in records
                 if is_negative(r, cams[r.slide_id].lesion_class, cfg)]
    return calibrate_thresholds(negatives, cam_low=s.cam_low, cam_high=s.cam_high, cam_gate=s.cam_gate,
                                quantile=s.negative_quantile, gate_negatives=s.gate_negatives)


SEGMENT = Stage(
    name=STAGE, sections=("segment", "tissue"), run=run_segment, run_arg=("run",),
    help="stage 4b: weakly supervised lesion segmentation from CAMs (FMaMIL stage 2)",
    args=(MANIFEST, arg("--run", required=True, help="run folder (features/ and mil/, or segment/cams/)"),
          CONFIG, arg("--model", default=None, help="MIL model whose CAMs are used (default: train.model)"),
          arg("--model-dir", default=None,
              help="fold ensemble folder (fold_*/); default RUN/mil/MODEL/{slide's cohort}"),
          SLIDES, EXCLUDE, arg("--force", action="store_true", help="retrain and redo every slide"), NO_PROGRESS),
    options=lambda a: {"model": a.model, "model_dir": a.model_dir}, check_args=check_model_arg)

"""Per-slide detection job and run-level evaluation: what `stages/detect.py` calls.

A slide's outputs are made in two steps, each resumable:
1. inference -> {slide}.candidates.csv (every peak >= min_score; streamed, atomic), recorded with
   what it was made from (checkpoint hash, inference settings, slide path and file identity: size
   and fingerprint, slides/identity.py) in {slide}.done.json;
2. thresholds -> csv / geojson / midog.json / summary.json and the density maps
   ({slide}.{class}.density.png / .tif, density.py) from the candidates (cheap).
A rerun skips a slide whose done file matches; when only the thresholds changed (eval-detect chose
new ones) it redoes step 2 alone. A slide file replaced at the same path, or another detector
checkpoint, redoes step 1 (a done file from before identities were recorded, inference version 3, is
redone once). eval-detect refuses candidates whose done file names another checkpoint or file
(`check_candidates`, through `wsi_pipeline.features.provenance`).
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

from ..errors import PipelineError
from ..features.provenance import checkpoint_mismatch, identity_difference, source_identity
from ..io import write_json_atomic
from ..run.folder import RunFolder
from ..slides import open_slide
from .annotations import AnnotationError, read_truth
from .density import DENSITY_EXPORTS, density_paths, write_slide_densities
from .inference import detect_slide
from .matching import choose_thresholds, evaluate
from .outputs import CandidateWriter, read_candidates, write_outputs
from .region import slide_tissue

OUTPUT_SUFFIXES = {"csv": "csv", "geojson": "geojson", "midog": "midog.json", "summary": "summary.json"}


def resolve_thresholds(classes, configured: dict, thresholds_file: Path) -> dict[str, float]:
    chosen = json.loads(thresholds_file.read_text(encoding="utf-8")) if thresholds_file.is_file() else {}
    return {c: float(chosen.get(c, configured.get(c, 0.5))) for c in classes}


def class_groups(classes, rare_classes) -> list[list[int]]:
    """Common classes compete for each peak; every rare class (mitosis) is peaked on its own."""
    rare = [i for i, c in enumerate(classes) if c in rare_classes]
    common = [i for i in range(len(classes)) if i not in rare]
    return [g for g in [common, *([i] for i in rare)] if g]


def detect_one(record, run: RunFolder, model_name: str, model, ckpt: dict, ckpt_hash: str, dcfg, tissue_cfg, *,
               device, backend: str = "auto", force: bool = False, progress: bool = False,
               heatmap_cfg=None) -> str:
    """Detect on one manifest slide; returns "done", "refreshed" (outputs only: thresholds or density
    settings changed) or "skipped". heatmap_cfg: colormap / alpha / png_max_px of the density maps
    (a HeatmapConfig; default its defaults)."""
    if heatmap_cfg is None:
        from ..run.config import HeatmapConfig
        heatmap_cfg = HeatmapConfig()
    classes = ckpt["classes"]
    thresholds = resolve_thresholds(classes, dcfg.thresholds, run.detect_dir(model_name) / "thresholds.json")
    work_mpp = float(ckpt["work_mpp"])
    inference_key = {"version": 4, "checkpoint": ckpt_hash, "slide": str(record.path),
                     "slide_identity": source_identity(record), "mpp": record.mpp, "tile_px": dcfg.tile_px,
                     "max_object_um": dcfg.max_object_um, "min_score": dcfg.min_score, "nms_um": dcfg.nms_um,
                     "rare_nms_um": dcfg.rare_nms_um,
                     "tissue": tissue_cfg.__dict__.copy()}
    done_path = run.detect_file(model_name, record.slide_id, "done.json")
    cand = run.detect_file(model_name, record.slide_id, "candidates.csv")
    paths = {k: run.detect_file(model_name, record.slide_id, v) for k, v in OUTPUT_SUFFIXES.items()}
    dens_paths = {c: {e: run.detect_file(model_name, record.slide_id, f"{c}.density.{e}") for e in DENSITY_EXPORTS}
                  for c in dcfg.density_classes}
    density_key = {"classes": list(dcfg.density_classes), "sigma_um": dcfg.density_sigma_um,
                   "colormap": heatmap_cfg.colormap, "alpha": heatmap_cfg.alpha, "png_max_px": heatmap_cfg.png_max_px}
    all_paths = [*paths.values(), *(p for d in dens_paths.values() for p in d.values())]
    done = json.loads(done_path.read_text(encoding="utf-8")) if done_path.is_file() else None
    same_inference = (not force and done is not None and done.get("inference") == inference_key and cand.is_file())
    if (same_inference and done.get("thresholds") == thresholds and done.get("density") == density_key
            and all(p.is_file() for p in all_paths)):
        return "skipped"
    with open_slide(record.path, slide_id=record.slide_id, backend=backend, mpp_override=record.mpp) as slide:
        t = tissue_cfg
        # The mask is needed by the density maps too, when only the outputs are refreshed (cheap: a thumbnail).
        mask, mask_mpp = slide_tissue(slide, t.mask_mpp, saturation_threshold=t.saturation_threshold,
                                      min_saturation=t.min_saturation, median_kernel_um=t.median_kernel_um,
                                      closing_um=t.closing_um, min_tissue_area_um2=t.min_tissue_area_um2,
                                      min_hole_area_um2=t.min_hole_area_um2, keep_holes=t.keep_holes)
        if same_inference:
            tissue_mm2 = done["tissue_area_mm2"]
        else:
            tissue_mm2 = float(mask.sum()) * mask_mpp ** 2 / 1e6
            done_path.unlink(missing_ok=True)   # the old record no longer describes the outputs
            rare = ckpt.get("params", {}).get("rare_classes", [])
            groups = class_groups(classes, rare)
            nms_px, rare_nms_px = (max(1, int(round(um / work_mpp))) for um in (dcfg.nms_um, dcfg.rare_nms_um))
            writer = CandidateWriter(cand, classes)
            try:
                detect_slide(model, slide, writer, work_mpp=work_mpp, core_px=dcfg.tile_px,
                             margin_px=int(math.ceil(dcfg.max_object_um / work_mpp)), min_score=dcfg.min_score,
                             nms_px=nms_px, tissue_mask=mask,
                             mask_mpp=mask_mpp, batch_size=dcfg.batch_size, device=device, progress=progress,
                             class_groups=groups,
                             group_nms_px=[rare_nms_px if classes[g[0]] in rare else nms_px for g in groups])
            except BaseException:
                writer.abort()
                raise
            writer.commit()
        summary = write_outputs(cand, paths, slide_id=record.slide_id, classes=classes, thresholds=thresholds,
                                slide_mpp=slide.mpp, tissue_area_mm2=tissue_mm2,
                                mitosis_class=dcfg.mitosis_class or None)
        density_max = write_slide_densities(cand, slide, mask, mask_mpp, slide_id=record.slide_id,
                                            thresholds=thresholds, paths=dens_paths, sigma_um=dcfg.density_sigma_um,
                                            colormap=heatmap_cfg.colormap, alpha=heatmap_cfg.alpha,
                                            png_max_px=heatmap_cfg.png_max_px)
    write_json_atomic(done_path, {"inference": inference_key, "thresholds": thresholds, "density": density_key,
                                  "tissue_area_mm2": tissue_mm2, "counts": summary["counts"],
                                  "density_max_per_mm2": {c: round(v, 4) for c, v in density_max.items()}})
    return "refreshed" if same_inference else "done"


ANNOTATION_SUFFIXES = (".csv", ".geojson", ".json")


def check_candidates(records, run: RunFolder, model_name: str, ckpt_hash: str) -> None:
    """Every slide's candidates must come from the detector checkpoint `ckpt_hash` and from the
    manifest's file (their done.json says what they were made from); raises one PipelineError
    listing each slide that does not, before anything is evaluated or written."""
    fix = f"run `wsi-pipeline detect --run {run.root} --model {model_name}` on these slides again (it redoes them)"
    problems = []
    for r in records:
        cand = run.detect_file(model_name, r.slide_id, "candidates.csv")
        if not cand.is_file():
            continue  # evaluate_run names it
        done_path = run.detect_file(model_name, r.slide_id, "done.json")
        try:
            inference = json.loads(done_path.read_text(encoding="utf-8")).get("inference", {})
        except (OSError, json.JSONDecodeError, AttributeError):
            inference = {}
        what = f"detections of slide {r.slide_id!r} ({cand})"
        problem = checkpoint_mismatch(what, inference.get("checkpoint"), ckpt_hash, fix)
        if problem is None and inference.get("slide_identity"):
            diff = identity_difference(inference["slide_identity"], source_identity(r))
            if diff:
                problem = f"{what} were made from another file than the manifest's {r.path} ({diff}): {fix}"
        if problem:
            problems.append(problem)
    if len(problems) == 1:
        raise PipelineError(f"eval-detect: {problems[0]}")
    if problems:
        raise PipelineError(f"eval-detect: {len(problems)} slide(s) have detections of another detector or file, "
                            f"nothing was evaluated\n" + "\n".join(f"  - {p}" for p in problems))


def _annotation_files(folder: Path, slide_ids) -> dict[str, Path]:
    """slide_id -> its file in the annotations folder; a file that matches no slide_id of the
    manifest, or a second file for one slide, is an AnnotationError naming the file(s)."""
    if not folder.is_dir():
        raise AnnotationError(f"detect.annotations: {folder} is not a folder")
    ids, found = set(slide_ids), {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in ANNOTATION_SUFFIXES or not path.is_file():
            continue
        if path.stem not in ids:
            close = ([i for i in sorted(ids) if i.lower() == path.stem.lower()]
                     or difflib.get_close_matches(path.stem, sorted(ids), n=1))
            raise AnnotationError(f"{path}: matches no slide_id of the manifest (files are named "
                                  f"{{slide_id}}{', {slide_id}'.join(ANNOTATION_SUFFIXES)}"
                                  + (f"; did you mean {close[0]}{path.suffix}?)" if close else ")"))
        if path.stem in found:
            raise AnnotationError(f"{path}: slide {path.stem!r} also has {found[path.stem].name}; keep one")
        found[path.stem] = path
    return found


def place_truths(records, dcfg, classes, slide_ids) -> dict[str, tuple]:
    """The truth of every record, each object placed on its slide: slide_id -> (Points in level-0 px,
    slide µm/px). The one check train-detector and eval-detect share, so both accept or refuse the same
    annotations: every annotation file must match a slide of the manifest (`slide_ids`, all of its
    slide_ids), every object must lie inside its slide, every COCO box must be under a listed image
    (annotations.py); otherwise an AnnotationError naming the file and row, before any work."""
    files = _annotation_files(Path(dcfg.annotations), slide_ids) if dcfg.annotations else None
    out = {}
    for r in records:
        ann = None
        if files is not None:
            if r.slide_id not in files:
                raise AnnotationError(f"{dcfg.annotations}: no annotation file for slide {r.slide_id!r} "
                                      f"(looked for {r.slide_id}{f', {r.slide_id}'.join(ANNOTATION_SUFFIXES)})")
            ann = files[r.slide_id]
        with open_slide(r.path, slide_id=r.slide_id, mpp_override=r.mpp) as slide:
            mpp, wh = slide.mpp, slide.dimensions
        out[r.slide_id] = (read_truth(r.path, classes, annotations=ann, slide_wh=wh, class_map=dcfg.class_map,
                                      ignore=dcfg.ignore_classes), mpp)
    return out


def evaluate_run(records_val, records_test, run: RunFolder, model_name: str, classes, dcfg,
                 slide_ids=None) -> dict:
    """Thresholds chosen on the validation slides' candidates, then MIDOG metrics on the test slides.
    slide_ids: every slide_id of the manifest (annotation files must match one; default: val + test)."""
    if slide_ids is None:
        slide_ids = [r.slide_id for r in (*records_val, *records_test)]
    def load(records):
        out = {}
        truths = place_truths(records, dcfg, classes, slide_ids)
        for r in records:
            truth, mpp = truths[r.slide_id]
            cand = run.detect_file(model_name, r.slide_id, "candidates.csv")
            if not cand.is_file():
                raise PipelineError(f"slide {r.slide_id!r}: no detections {cand}; run `wsi-pipeline detect` first")
            pxy, score, pcls = read_candidates(cand, classes)
            out[r.slide_id] = (pxy * mpp, score, pcls, truth.xy * mpp, truth.cls)
        return out
    val, test = load(records_val), load(records_test)
    thresholds = choose_thresholds(val, classes, dcfg.match_radius_um)
    result = {"val_slides": sorted(val), "test_slides": sorted(test),
              "val": evaluate(val, classes, thresholds, dcfg.match_radius_um),
              "test": evaluate(test, classes, thresholds, dcfg.match_radius_um)}
    write_json_atomic(run.detect_dir(model_name) / "thresholds.json", thresholds)
    write_json_atomic(run.detect_dir(model_name) / "eval.json", result)
    return result


def nucleus_f1(metrics: dict, names=("nucleus-normal", "nucleus-tumour")) -> float | None:
    """Micro F1 over the nucleus classes together (their counts summed; each class matched on its own);
    None when they have no truth object (undefined, as per class)."""
    tp = sum(metrics["classes"][n]["tp"] for n in names if n in metrics["classes"])
    fp = sum(metrics["classes"][n]["fp"] for n in names if n in metrics["classes"])
    fn = sum(metrics["classes"][n]["fn"] for n in names if n in metrics["classes"])
    return 2 * tp / (2 * tp + fp + fn) if tp + fn else None

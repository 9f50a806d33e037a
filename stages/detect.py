"""Stage — detect: dense cell and mitosis detection, with the two commands around it.

Three stages of the usual shape (stages/base.py), all reading the `detect:` config section:
  train-detector   RUN/detect/{model}/model/model.safetensors + config.json (the detector)
  detect           RUN/detect/{model}/{slide_id}.candidates.csv, .csv, .geojson, .midog.json,
                   .summary.json, .{class}.density.png/.tif, .done.json (the workflow's rule,
                   workflow/rules/detect.smk)
  eval-detect      RUN/detect/{model}/thresholds.json, eval.json (thresholds chosen on validation
                   slides, metrics on held-out ones)
Wiring only; the work is in `wsi_pipeline.detection`. RunFolder checks every name. torch is
imported inside `run`, so `wsi-pipeline --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.run.config import Config
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import Manifest

from .base import CONFIG, FORCE, MANIFEST, NO_PROGRESS, SLIDES, Stage, StageReport, arg, split_list
from .batch import run_batch

RUN = arg("--run", required=True, help="run folder (outputs under RUN/detect/MODEL/)")
MODEL = arg("--model", default=None, help="output/model name (default: detect.train.detector)")


def _model_name(cfg: Config, run_dir, model: str | None) -> str:
    return RunFolder(run_dir).name(model or cfg.detect.train.detector, "--model")


def _check_model(cfg: Config, args: argparse.Namespace) -> None:
    _model_name(cfg, args.run, args.model)   # before anything is written


def _check_truths(cfg: Config, args: argparse.Namespace, slide_lists, classes) -> None:
    """The annotations of the slides a command will read, placed before anything is written (the
    run places them again: slide headers and annotation files only)."""
    from wsi_pipeline.detection.pipeline import place_truths
    from wsi_pipeline.run.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    wanted = [s for ids in slide_lists if ids for s in ids]
    records = manifest.select(list(dict.fromkeys(wanted))) if wanted else manifest
    place_truths(records, cfg.detect, classes, [r.slide_id for r in manifest])


def _check_train_detector(cfg: Config, args: argparse.Namespace) -> None:
    from wsi_pipeline.detection.train import patient_split

    _check_model(cfg, args)
    train, val = split_list(args.train_slides), split_list(args.val_slides)
    _check_truths(cfg, args, [train, val] if train else [], cfg.detect.train.classes)
    if not val:
        from wsi_pipeline.run.manifest import load_manifest

        manifest = load_manifest(args.manifest)
        patient_split(manifest.select(train) if train else manifest, cfg.detect.train.val_fraction,
                      cfg.detect.train.seed)


def _check_eval_detect(cfg: Config, args: argparse.Namespace) -> None:
    _check_model(cfg, args)
    ckpt_config = RunFolder(args.run).detect_dir(_model_name(cfg, args.run, args.model)) / "model" / "config.json"
    if ckpt_config.is_file():   # else run_eval_detect names what is missing
        classes = json.loads(ckpt_config.read_text(encoding="utf-8")).get("classes", cfg.detect.train.classes)
        _check_truths(cfg, args, [split_list(args.val_slides), split_list(args.test_slides)], classes)


def _device(name: str) -> str:
    from wsi_pipeline.devices import resolve_device

    return str(resolve_device(name, "detect.device"))


def run_train_detector(manifest: Manifest, cfg: Config, run_dir: str | Path, *, model: str | None = None,
                       train_slides: list[str] | None = None, val_slides: list[str] | None = None,
                       progress: bool = True) -> StageReport:
    """Train one detector on `train_slides` (default: all of the manifest); validation on
    `val_slides` or a patient-level split of detect.train.val_fraction."""
    from wsi_pipeline.detection.pipeline import place_truths
    from wsi_pipeline.detection.train import TrainSlide, patient_split, train_detector

    run, model_name, params = RunFolder(run_dir), _model_name(cfg, run_dir, model), cfg.detect.train
    slide_ids = [r.slide_id for r in manifest]

    def items(records):
        # the same placement check as eval-detect's (pipeline.place_truths): all annotations or an error
        truths = place_truths(records, cfg.detect, params.classes, slide_ids)
        return [TrainSlide(r.slide_id, r.path, r.patient_id, truths[r.slide_id][0], r.mpp) for r in records]

    train_items = items(manifest.select(train_slides) if train_slides else manifest)
    if val_slides:
        val_ids = set(val_slides)
        val_items = items(manifest.select(val_ids))
        train_items = [i for i in train_items if i.slide_id not in val_ids]
        overlap = {i.patient_id for i in train_items} & {i.patient_id for i in val_items}
        if overlap:
            raise ConfigError(f"--val-slides share patients with the training slides: {sorted(overlap)}")
        if not train_items:
            raise ConfigError("train-detector: no training slide left once --val-slides are taken out")
    else:
        train_items, val_items = patient_split(train_items, params.val_fraction, params.seed)
    out = run.detect_dir(model_name) / "model"
    config = train_detector(train_items, val_items, params, out, progress=progress)
    report = StageReport("train-detector", done=[model_name], outputs={model_name: out}, details=config,
                         failures_csv=False)
    report.notes.append(f"detector {model_name}: {len(config['history'])} epochs, best val loss "
                        f"{config['best_val_loss']:.4f}; {out}")
    return report


def run_detect(manifest: Manifest, cfg: Config, run_dir: str | Path, *, model: str | None = None,
               force: bool = False, progress: bool = True) -> StageReport:
    """Whole-slide detection of every slide of `manifest` with the trained detector `model`."""
    from wsi_pipeline.detection.checkpoint import checkpoint_hash, load_detector
    from wsi_pipeline.detection.pipeline import detect_one

    run, model_name = RunFolder(run_dir), _model_name(cfg, run_dir, model)
    device = _device(cfg.detect.device)
    ckpt_dir = run.detect_dir(model_name) / "model"
    detector, ckpt = load_detector(ckpt_dir, device)
    ckpt_hash = checkpoint_hash(ckpt_dir)

    def process(record) -> str:
        status = detect_one(record, run, model_name, detector, ckpt, ckpt_hash, cfg.detect, cfg.tissue,
                            device=device, backend=cfg.slides.backend, force=force, progress=progress,
                            heatmap_cfg=cfg.heatmap)
        return "skipped" if status == "skipped" else "done"

    return run_batch("detect", manifest, run, process, progress=progress)


def run_eval_detect(manifest: Manifest, cfg: Config, run_dir: str | Path, *, val_slides: list[str],
                    test_slides: list[str], model: str | None = None, progress: bool = True) -> StageReport:
    """Thresholds chosen on `val_slides`, MIDOG-style metrics on the held-out `test_slides`."""
    from wsi_pipeline.detection.checkpoint import checkpoint_hash
    from wsi_pipeline.detection.matching import format_metric
    from wsi_pipeline.detection.pipeline import check_candidates, evaluate_run, nucleus_f1

    run, model_name = RunFolder(run_dir), _model_name(cfg, run_dir, model)
    val, test = list(val_slides), list(test_slides)
    if set(val) & set(test):
        raise ConfigError(f"--val-slides and --test-slides overlap: {sorted(set(val) & set(test))}")
    ckpt_config = run.detect_dir(model_name) / "model" / "config.json"
    if not ckpt_config.is_file() or not (ckpt_config.parent / "model.safetensors").is_file():
        raise ConfigError(f"no detector in {ckpt_config.parent}: run train-detector and detect first")
    ckpt = json.loads(ckpt_config.read_text(encoding="utf-8"))
    parent = ckpt.get("init_from", {})    # a fine-tuned detector also saw its parent's slides
    used = (set(ckpt.get("train_slides", [])) | set(ckpt.get("val_slides", []))
            | set(parent.get("train_slides", [])) | set(parent.get("val_slides", [])))
    if used & set(test):
        raise ConfigError(f"test slides were used in training: {sorted(used & set(test))}")
    # Candidates of another checkpoint (a retrained detector) or another slide file are not scored.
    check_candidates([*manifest.select(val), *manifest.select(test)], run, model_name,
                     checkpoint_hash(ckpt_config.parent))
    result = evaluate_run(manifest.select(val), manifest.select(test), run, model_name, ckpt["classes"], cfg.detect,
                          slide_ids=[r.slide_id for r in manifest])
    report = StageReport("eval-detect", done=[model_name], outputs={model_name: result}, details=result,
                         failures_csv=False)
    for name, m in result["test"]["classes"].items():
        scores = (f"F1 {format_metric(m['f1'])}" if m["f1"] is None else
                  f"F1 {m['f1']:.3f}  P {m['precision']:.3f}  R {m['recall']:.3f}")
        report.notes.append(f"test {name:16s} {scores}  "
                            f"(tp {m['tp']} fp {m['fp']} fn {m['fn']}; threshold {result['test']['thresholds'][name]})")
    report.notes.append(f"test nuclei (both classes) F1 {format_metric(nucleus_f1(result['test']))}; "
                        f"{run.detect_dir(model_name)}/eval.json")
    return report


# train-detector and eval-detect pick their slides themselves (--val-slides from the whole
# manifest), so their --slides is not the generic slide filter of `invoke`: another dest.
TRAIN_DETECTOR = Stage(
    name="train-detector", sections=("detect",), run=run_train_detector, run_arg=("run",),
    help="train a cell/mitosis detector (Mamba CenterNet) on annotated slides",
    args=(MANIFEST, RUN, CONFIG, MODEL,
          arg("--slides", dest="train_slides", default=None,
              help="comma-separated slide_ids to train on (default: all in the manifest)"),
          arg("--val-slides", default=None,
              help="validation slide_ids (default: a patient-level split of detect.train.val_fraction)"),
          arg("--epochs", type=int, default=None, help="override detect.train.epochs")),
    overrides={"epochs": "detect.train.epochs"}, check=_check_train_detector, record_root_config=True,
    options=lambda a: {"model": a.model, "train_slides": split_list(a.train_slides),
                       "val_slides": split_list(a.val_slides)})

DETECT = Stage(
    name="detect", sections=("detect", "tissue", "heatmap"), run=run_detect, run_arg=("run",),
    help="whole-slide cell/mitosis detection: QuPath GeoJSON, CSV, MIDOG JSON, summary with hotspot",
    args=(MANIFEST, RUN, CONFIG, MODEL, SLIDES, FORCE, NO_PROGRESS),
    check=_check_model, record_root_config=True, options=lambda a: {"model": a.model})

EVAL_DETECT = Stage(
    name="eval-detect", sections=("detect",), run=run_eval_detect, run_arg=("run",),
    help="MIDOG-style evaluation: thresholds on validation slides, F1 on held-out slides",
    args=(MANIFEST, RUN, CONFIG, MODEL,
          arg("--slides", dest="unused_slides", default=None, help="unused (use --val-slides / --test-slides)"),
          arg("--val-slides", required=True, help="slide_ids the thresholds are chosen on"),
          arg("--test-slides", required=True, help="held-out slide_ids the metrics are reported on")),
    check=_check_eval_detect, record_root_config=True,
    options=lambda a: {"model": a.model, "val_slides": split_list(a.val_slides),
                       "test_slides": split_list(a.test_slides)})

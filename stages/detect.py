"""Stage — detect: dense cell and mitosis detection (train-detector, detect, eval-detect).

Wiring only; the work is in `wsi_pipeline.detection` (training, tiled inference, outputs, MIDOG
evaluation). Paths, all under RUN/detect/{model}/ (RunFolder checks every name):
  model/model.safetensors + model/config.json   the detector (train-detector)
  {slide_id}.candidates.csv, .csv, .geojson, .midog.json, .summary.json, .done.json   (detect)
  thresholds.json, eval.json   thresholds chosen on validation slides, test metrics (eval-detect)
torch is imported inside the commands, so `wsi-pipeline --help` stays fast.
"""

from __future__ import annotations

import sys

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.run_folder import RunFolder

from .batch import run_batch

STAGE = "detect"


def _common(p, slides_help="comma-separated slide_ids (default: all)") -> None:
    p.add_argument("--manifest", required=True, help="slide manifest CSV (see manifests/README.md)")
    p.add_argument("--run", required=True, help="run folder (outputs under RUN/detect/MODEL/)")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults); section detect:")
    p.add_argument("--model", default=None, help="output/model name (default: detect.train.detector)")
    p.add_argument("--slides", default=None, help=slides_help)


def add_train_arguments(p) -> None:
    _common(p, "comma-separated slide_ids to train on (default: all in the manifest)")
    p.add_argument("--val-slides", default=None, help="validation slide_ids (default: a patient-level split "
                                                      "of detect.train.val_fraction)")
    p.add_argument("--epochs", type=int, default=None, help="override detect.train.epochs")


def add_detect_arguments(p) -> None:
    _common(p)
    p.add_argument("--force", action="store_true", help="redo slides whose outputs are complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_arguments(p) -> None:
    _common(p, "unused (use --val-slides / --test-slides)")
    p.add_argument("--val-slides", required=True, help="slide_ids the thresholds are chosen on")
    p.add_argument("--test-slides", required=True, help="held-out slide_ids the metrics are reported on")


def _ids(text):
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _setup(args, **train_overrides):
    import dataclasses

    from wsi_pipeline.config import load_config, save_resolved_config
    from wsi_pipeline.manifest import load_manifest

    cfg = load_config(args.config)
    if any(v is not None for v in train_overrides.values()):
        train = dataclasses.replace(cfg.detect.train, **{k: v for k, v in train_overrides.items() if v is not None})
        cfg = dataclasses.replace(cfg, detect=dataclasses.replace(cfg.detect, train=train))
    run = RunFolder(args.run)
    model_name = run.name(args.model or cfg.detect.train.detector, "--model")
    save_resolved_config(cfg, args.run)
    return cfg, load_manifest(args.manifest), run, model_name


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def train_cli(args) -> int:
    from wsi_pipeline.detection.pipeline import slide_truth
    from wsi_pipeline.detection.train import TrainSlide, patient_split, train_detector

    cfg, manifest, run, model_name = _setup(args, epochs=args.epochs)
    params = cfg.detect.train
    records = manifest.select(_ids(args.slides)) if args.slides else list(manifest)
    items = [TrainSlide(r.slide_id, r.path, r.patient_id, slide_truth(r, cfg.detect, params.classes), r.mpp)
             for r in records]
    if args.val_slides:
        val_ids = set(_ids(args.val_slides))
        val_items = [TrainSlide(r.slide_id, r.path, r.patient_id, slide_truth(r, cfg.detect, params.classes), r.mpp)
                     for r in manifest.select(val_ids)]
        overlap = {i.patient_id for i in items if i.slide_id not in val_ids} & {i.patient_id for i in val_items}
        if overlap:
            raise ConfigError(f"--val-slides share patients with the training slides: {sorted(overlap)}")
        train_items = [i for i in items if i.slide_id not in val_ids]
    else:
        train_items, val_items = patient_split(items, params.val_fraction, params.seed)
    out = run.detect_dir(model_name) / "model"
    config = train_detector(train_items, val_items, params, out, progress=True)
    print(f"detector {model_name}: {len(config['history'])} epochs, best val loss {config['best_val_loss']:.4f}; "
          f"{out}")
    return 0


def detect_cli(args) -> int:
    from wsi_pipeline.detection.checkpoint import checkpoint_hash, load_detector
    from wsi_pipeline.detection.pipeline import detect_one

    cfg, manifest, run, model_name = _setup(args)
    device = _device(cfg.detect.device)
    ckpt_dir = run.detect_dir(model_name) / "model"
    model, ckpt = load_detector(ckpt_dir, device)
    ckpt_hash = checkpoint_hash(ckpt_dir)
    records = manifest.select(_ids(args.slides)) if args.slides else list(manifest)

    def process(record) -> str:
        status = detect_one(record, run, model_name, model, ckpt, ckpt_hash, cfg.detect, cfg.tissue, device=device,
                            backend=cfg.slides.backend, force=args.force, progress=not args.no_progress)
        return "skipped" if status == "skipped" else "done"

    report = run_batch(STAGE, records, run, process, progress=not args.no_progress)
    print(report.summary())
    if report.failed:
        print(f"failed slides are listed in {args.run}/failures.csv", file=sys.stderr)
    return 0 if report.ok else 1


def eval_cli(args) -> int:
    import json

    from wsi_pipeline.detection.pipeline import evaluate_run, nucleus_f1

    cfg, manifest, run, model_name = _setup(args)
    val, test = _ids(args.val_slides), _ids(args.test_slides)
    if set(val) & set(test):
        raise ConfigError(f"--val-slides and --test-slides overlap: {sorted(set(val) & set(test))}")
    ckpt_config = run.detect_dir(model_name) / "model" / "config.json"
    if not ckpt_config.is_file():
        raise ConfigError(f"no detector in {ckpt_config.parent}: run train-detector and detect first")
    ckpt = json.loads(ckpt_config.read_text(encoding="utf-8"))
    used = set(ckpt.get("train_slides", [])) | set(ckpt.get("val_slides", []))
    if used & set(test):
        raise ConfigError(f"test slides were used in training: {sorted(used & set(test))}")
    result = evaluate_run(manifest.select(val), manifest.select(test), run, model_name, ckpt["classes"], cfg.detect)
    for name, m in result["test"]["classes"].items():
        print(f"test {name:16s} F1 {m['f1']:.3f}  P {m['precision']:.3f}  R {m['recall']:.3f}  "
              f"(tp {m['tp']} fp {m['fp']} fn {m['fn']}; threshold {result['test']['thresholds'][name]})")
    print(f"test nuclei (both classes) F1 {nucleus_f1(result['test']):.3f}; {run.detect_dir(model_name)}/eval.json")
    return 0


HELP = {
    "train-detector": "train a cell/mitosis detector (Mamba CenterNet) on annotated slides",
    "detect": "whole-slide cell/mitosis detection: QuPath GeoJSON, CSV, MIDOG JSON, summary with hotspot",
    "eval-detect": "MIDOG-style evaluation: thresholds on validation slides, F1 on held-out slides",
}
COMMANDS = {"train-detector": (add_train_arguments, train_cli), "detect": (add_detect_arguments, detect_cli),
            "eval-detect": (add_eval_arguments, eval_cli)}

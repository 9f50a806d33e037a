"""Stage 3 — train: features.h5 bags → patient-level k-fold CV of one MIL aggregator per cohort.

Reads RUN/features/{encoder}/{slide_id}.h5 and the manifest's labels; writes, per cohort,
RUN/mil/{model}/{cohort}/:
  splits.json                 the folds (reused on rerun while the cohort's rows and split settings
                              are unchanged, else recomputed with a warning: training/splits.py)
  fold_{k}/model.safetensors  best-epoch weights (safetensors, no pickle), with train.standardize the
                              training fold's per-dimension input_mean / input_std tensors
  fold_{k}/config.json        model, in_dim, n_classes, classes, model_args, standardize, encoder,
                              training_features (what the features were made from: encoder, version,
                              weights sha256, µm/px, patch size, coord_dims, modality; wsi_pipeline/
                              features/provenance.py; a cohort whose features differ in them is
                              refused), fold, the
                              train/val/test slide ids, best epoch, loss history, config hash, versions,
                              training_run_id (the training run the fold belongs to)
  predictions.csv             out-of-fold test predictions: slide_id, patient_id, cohort, fold, label,
                              prob_<class>...
  metrics.json                per fold and pooled: AUC, balanced accuracy, macro F1 with patient-level
                              bootstrap 95% CIs, n slides, training_run_id
All files are written atomically. A rerun skips every fold whose checkpoint and config.json exist
with a matching config hash (model, model_args, classes, encoder, train settings, the fold's slide
split and each slide's features hash), then rebuilds predictions.csv and metrics.json — so a killed
run resumes at the fold it was in. A run that changes any fold is a new training run: it first removes
metrics.json and predictions.csv, and stamps its id into every fold it trains or reuses, so a run
killed part-way leaves no stale metrics and an ensemble that `load_ensemble` refuses as mixed
(wsi_pipeline/training/runs.py) until a rerun completes it.

Every input problem (unknown model, bad model_args, labels outside the classes, a cohort too small for
k folds, missing or non-finite features) is a `PipelineError` raised before any training starts.
"""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.run.config import Config
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import Manifest
from wsi_pipeline.training.cv import FOLD_FORMAT_VERSION, fold_config_hash  # noqa: F401 (public names)

from .base import CONFIG, check_model_arg, NO_PROGRESS, Stage, StageReport, arg, split_list

STAGE = "train"


def run_train(manifest: Manifest, cfg: Config, run_dir: str | Path, *, model: str | None = None,
              cohorts: list[str] | None = None, progress: bool = True,
              features_run_dir: str | Path | None = None) -> StageReport:
    """Cross-validate aggregator `model` (default cfg.train.model) on each cohort
    (`wsi_pipeline.training.cv`).

    Features are read from `features_run_dir` (default `run_dir`)/features/{cfg.extract.encoder}/;
    outputs go to run_dir/mil/{model}/{cohort}/. Input problems raise `PipelineError` before any
    training. The report's items are the cohorts: report[cohort]["status"] is "done" (with model_dir,
    splits, folds_trained, folds_skipped, metrics (pooled), predictions, metrics_path) or "failed"
    (error): a cohort failing during training does not stop the others.
    """
    from wsi_pipeline.training.cv import cross_validate

    model_name = model or cfg.train.model
    features_run = RunFolder(features_run_dir if features_run_dir is not None else run_dir)
    results = cross_validate(manifest, cfg, RunFolder(run_dir), features_run, model_name, cohorts, progress)
    report = StageReport(STAGE, outputs=results, failures_csv=False)
    for cohort, result in results.items():
        if result["status"] != "done":
            report.failed[cohort] = result["error"]
            report.warnings.append(f"{model_name} / {cohort}: FAILED: {result['error']}")
            continue
        report.done.append(cohort)
        report.notes.append(f"{model_name} / {cohort}: {format_pooled(result['metrics'])} "
                            f"({len(result['folds_trained'])} fold(s) trained, "
                            f"{len(result['folds_skipped'])} reused)\n    {result['model_dir']}")
    return report


def format_pooled(pooled: dict) -> str:
    """'pooled CV AUC 0.930 [95% CI 0.810, 1.000] over 16 slides'."""
    auc = pooled["auc"]
    if auc["value"] is None:
        text = "pooled CV AUC undefined (one class only)"
    else:
        text = f"pooled CV AUC {auc['value']:.3f}"
        if auc["ci95"]:
            text += f" [95% CI {auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}]"
    return f"{text} over {pooled['n_slides']} slides"


def _check_names(args) -> None:
    from wsi_pipeline.run.names import check_name

    check_model_arg(args)
    for cohort in split_list(args.cohort) or []:
        check_name(cohort, "--cohort")


TRAIN = Stage(
    name=STAGE, sections=("extract", "train"), run=run_train, run_arg=("out", "features"),
    help="stage 3: cross-validated MIL training per cohort (features -> fold models, predictions, metrics)",
    args=(arg("--manifest", required=True, help="slide manifest CSV; every slide needs a label"),
          arg("--features", required=True, metavar="RUN",
              help="run folder holding features/{encoder}/ (mil/ is written here unless --out)"),
          arg("--out", default=None, metavar="RUN", help="run folder to write mil/ into (default: --features)"),
          CONFIG, arg("--model", default=None, help="MIL aggregator (default: train.model)"),
          arg("--cohort", default=None, help="comma-separated cohorts to train (default: all)"),
          arg("--exclude-slides", default=None, metavar="A,B",
              help="comma-separated slide_ids to leave out (e.g. slides whose extraction failed)"),
          arg("--folds", type=int, default=None, help="override train.folds"),
          arg("--epochs", type=int, default=None, help="override train.epochs"),
          arg("--device", default=None, help="override train.device (auto, cpu, cuda, cuda:N)"),
          arg("--no-progress", action="store_true", help="no progress bars")),
    overrides={"model": "train.model", "folds": "train.folds", "epochs": "train.epochs", "device": "train.device"},
    options=lambda a: {"cohorts": split_list(a.cohort), "features_run_dir": a.features},
    require_labels=True, check_args=_check_names)

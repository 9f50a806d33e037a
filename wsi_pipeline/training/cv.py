"""Patient-level k-fold cross-validation of one MIL aggregator per cohort (the train stage's work).

`cross_validate(manifest, cfg, run, features_run, model_name, cohorts, progress)` checks every input
of every requested cohort before any training (`PipelineError` listing all problems), then per
cohort: splits (reused while rows and settings are unchanged), one checkpoint per fold (skipped when
current: its config hash covers settings, split and each slide's features hash), out-of-fold
predictions.csv and metrics.json. File layout and guarantees: stages/train.py's docstring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
from collections import defaultdict
from pathlib import Path

from ..errors import PipelineError, SlideError
from ..features.provenance import features_provenance, merge_provenance
from ..io import STORAGE_ERRNOS, describe_os_error
from ..run.config import Config
from ..run.folder import RunFolder
from ..run.manifest import Manifest, SlideRecord

STAGE = "train"
FOLD_FORMAT_VERSION = 1
log = logging.getLogger("wsi_pipeline")


def cross_validate(manifest: Manifest, cfg: Config, run: RunFolder, features_run: RunFolder, model_name: str,
                   cohorts: list[str] | None = None, progress: bool = True) -> dict:
    """{cohort: result}; result["status"] is "done" (with model_dir, splits, folds_trained,
    folds_skipped, metrics (pooled), predictions, metrics_path) or "failed" (error): a cohort failing
    during training does not stop the others. Input problems raise before any training."""
    plans = _preflight(manifest, cfg, model_name, cohorts, features_run)
    results = {}
    for plan in plans:
        try:
            results[plan["cohort"]] = _train_cohort(plan, cfg, model_name, run, features_run, progress)
        except PipelineError as exc:
            log.error("train %s / %s failed: %s", model_name, plan["cohort"], exc)
            results[plan["cohort"]] = {"status": "failed", "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 — other cohorts still train; keep the traceback
            if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:  # disk full, read-only: one line
                message = describe_os_error(exc)
            else:
                where = run.log_traceback(STAGE, f"{model_name} / cohort {plan['cohort']}")
                message = f"unexpected {type(exc).__name__}: {exc} ({where})"
            log.error("train %s / %s failed: %s", model_name, plan["cohort"], message)
            results[plan["cohort"]] = {"status": "failed", "error": message}
        finally:
            plan["moments"] = None  # the cohort's O(D) per-bag summaries, before the next one
    return results


def _preflight(manifest: Manifest, cfg: Config, model_name: str, cohorts, features_run: RunFolder) -> list[dict]:
    """Check every input of every requested cohort; returns one plan per cohort or raises."""
    from ..models.mil import create_aggregator, list_aggregators
    from ..run.validation import cohort_classes, label_problems
    from .splits import check_cohort_size

    train = cfg.train.for_model(model_name)
    if model_name not in list_aggregators():
        raise PipelineError(f"unknown model {model_name!r}; registered aggregators: {', '.join(list_aggregators())}")
    known = sorted({r.cohort for r in manifest})
    wanted = known if cohorts is None else list(dict.fromkeys(cohorts))
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise PipelineError(f"cohort(s) {', '.join(map(repr, unknown))} not in the manifest; "
                            f"its cohorts: {', '.join(known)}")

    # Cheap checks first (labels, classes, sizes, files), all reported together.
    problems, plans = [], []
    encoder = cfg.extract.encoder
    for cohort in wanted:
        records = sorted((r for r in manifest if r.cohort == cohort), key=lambda r: r.slide_id)
        # The same check `wsi-pipeline train` and `run` make before writing anything (run/validation.py).
        cohort_labels = label_problems(manifest, cfg, model=model_name, cohorts=[cohort])
        if cohort_labels:
            problems += cohort_labels
            continue
        classes = cohort_classes(records, train.classes)
        if len(classes) < 2:
            problems.append(f"cohort {cohort!r}: only one class ({classes[0]!r}); training needs >= 2 "
                            f"(set train.classes or add slides of another class)")
            continue
        try:
            check_cohort_size(records, classes, train.folds, cohort)
        except PipelineError as exc:
            problems.append(str(exc))
        missing = [r for r in records if not features_run.features_h5(encoder, r.slide_id).is_file()]
        if missing:
            folder = features_run.features_dir(encoder)
            hint = "" if folder.is_dir() else f"; the folder {folder} does not exist"
            problems.append(f"cohort {cohort!r}: {len(missing)} slide(s) without features in {folder} "
                            f"(run the extract stage with encoder {encoder!r}{hint}): "
                            f"{', '.join(r.slide_id for r in missing)}")
        plans.append({"cohort": cohort, "records": records, "classes": classes, "refs": None})
    _raise_problems(problems)

    # Then the features' contents, one bag at a time (no stage holds a cohort's bags): each file is
    # checked and described (BagRef) and, with standardisation, summarised for the fold statistics.
    center = train.center_per_slide if train.standardize else ""
    for plan in plans:
        bags, dims, bag_problems, moments = _scan_bags(plan["records"], plan["classes"], encoder,
                                                       features_run, train.standardize, center)
        problems += bag_problems
        if len(dims) > 1:
            by_dim = sorted(dims.items(), key=lambda kv: -len(kv[1]))
            problems.append(f"cohort {plan['cohort']!r}: features of different dimensions: " + "; ".join(
                f"D={d}: {', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}" for d, ids in by_dim))
        plan["in_dim"] = next(iter(dims)) if len(dims) == 1 else None
        # Folds record what their features were made from; a cohort extracted at two settings
        # (another encoder, µm/px, patch size) would train one model on both.
        _, mixed = merge_provenance({sid: b.provenance for sid, b in bags.items()})
        if mixed:
            problems.append(f"cohort {plan['cohort']!r}: {mixed}")
        plan["refs"], plan["moments"] = bags, moments
    _raise_problems(problems)

    for plan in plans:
        try:
            create_aggregator(model_name, plan["in_dim"], len(plan["classes"]), **train.model_args)
        except TypeError as exc:
            raise PipelineError(f"train.model_args {train.model_args!r} do not fit aggregator "
                                f"{model_name!r}: {exc}") from None
        except ValueError as exc:
            raise PipelineError(f"aggregator {model_name!r} rejects its settings "
                                f"(train.model_args {train.model_args!r}): {exc}") from None
    return plans


def _raise_problems(problems: list[str]) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PipelineError(f"train: {len(problems)} problem(s), nothing was trained\n{lines}")


def _scan_bags(records: list[SlideRecord], classes: list[str], encoder: str, features_run: RunFolder,
               moments: bool = False, center: str = ""):
    """Check every slide's bag, one at a time → ({slide_id: BagRef}, {dim: [slide_ids]}, problems,
    {slide_id: standardize.bag_moments(features, center)} (empty unless `moments`)).

    The one streaming pass over a cohort's features: any fold's standardisation statistics are
    merged from the per-bag moments (InputStandardizer.from_moments) without reading a bag again."""
    from .bag_source import BagRef
    from .bags import read_bag
    from .standardize import bag_moments

    class_index = {c: i for i, c in enumerate(classes)}
    refs, dims, problems, summaries = {}, defaultdict(list), [], {}
    for r in records:
        path = features_run.features_h5(encoder, r.slide_id)
        try:
            features, _, attrs = read_bag(path, r.slide_id)
        except SlideError as exc:
            problems.append(str(exc))
            continue
        dims[features.shape[1]].append(r.slide_id)
        refs[r.slide_id] = BagRef(r.slide_id, r.patient_id, class_index[r.label], path, features.shape[0],
                                  features.shape[1], str(features.dtype), str(attrs.get("config_hash", "")),
                                  features_provenance(attrs))
        if moments:
            summaries[r.slide_id] = bag_moments(features, center)
        del features
    return refs, dict(dims), problems, summaries


def fold_config_hash(*, model_name: str, model_args: dict, classes, encoder: str, in_dim: int,
                     train, fold) -> dict:
    """What a fold's checkpoint depends on; hashed into config.json's config_hash."""
    return {
        "model": model_name, "model_args": model_args, "classes": list(classes), "encoder": encoder,
        "in_dim": in_dim, "lr": train.lr, "weight_decay": train.weight_decay, "epochs": train.epochs,
        "patience": train.patience, "min_delta": train.min_delta, "balance": train.balance, "grad_accumulation": train.grad_accumulation,
        "seed": train.seed, "deterministic": train.deterministic, "standardize": train.standardize,
        "warmup_epochs": train.warmup_epochs, "instance_loss_weight": train.instance_loss_weight,
        "instance_topk": train.instance_topk, "fold": fold.fold,
        # mean keeps the key's old value (True), so folds trained before the median option stay valid
        **({"center_per_slide": True if train.center_per_slide == "mean" else train.center_per_slide}
           if train.center_per_slide else {}),
        **({"instance_dropout": train.instance_dropout} if train.instance_dropout else {}),
        **({"lr_schedule": train.lr_schedule} if train.lr_schedule != "constant" else {}),
        **({"shuffle_instances": True} if train.shuffle_instances else {}),
        **({"optimizer": train.optimizer} if train.optimizer != "adamw" else {}),
        **({"min_epochs": train.min_epochs} if train.min_epochs else {}),
        "train": list(fold.train), "val": list(fold.val), "test": list(fold.test),
    }


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fold_hash(fold, model_name: str, train, classes, encoder: str, in_dim: int, bags: dict) -> str:
    """A fold checkpoint's config hash: its settings, its split and each of its slides' features hash."""
    payload = fold_config_hash(model_name=model_name, model_args=train.model_args, classes=classes,
                               encoder=encoder, in_dim=in_dim, train=train, fold=fold)
    payload["features"] = {sid: bags[sid].features_hash for sid in fold.train + fold.val + fold.test}  # BagRefs
    return _hash(payload)


def _train_cohort(plan: dict, cfg: Config, model_name: str, run: RunFolder, features_run: RunFolder,
                  progress: bool) -> dict:
    import numpy as np

    from ..io import remove_stale_temps, write_csv_atomic, write_json_atomic
    from ..models.mil import create_aggregator
    from .checkpoints import (fold_dirs, fold_is_complete, load_fold_model, read_fold_meta,
                              record_training_features, save_fold_model, stamp_training_run)
    from .bag_source import BagSource, cache_bytes_from_config
    from .metrics import classification_metrics
    from .runs import RUN_ID_KEY
    from .splits import load_or_make_splits
    from .standardize import InputStandardizer
    from .trainer import (deterministic_algorithms, predict_probs, resolve_device,
                           seed_everything, train_fold)

    train, encoder = cfg.train.for_model(model_name), cfg.extract.encoder
    cohort, records, classes = plan["cohort"], plan["records"], plan["classes"]
    out_dir = run.mil_dir(model_name, cohort)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    device = resolve_device(train.device)

    splits, split_status = load_or_make_splits(out_dir / "splits.json", records, classes, train.folds,
                                               train.val_fraction, train.seed, cohort)
    log.info("train %s / %s: %d slides, classes %s, %d folds (splits %s)", model_name, cohort,
             len(records), classes, train.folds, split_status)
    for stale in fold_dirs(out_dir):  # a previous run with more folds
        if int(stale.name.split("_")[1]) >= splits.n_folds:
            log.warning("removing %s: not a fold of the current %d-fold split", stale, splits.n_folds)
            shutil.rmtree(stale)

    # Bags are read from disk per pass through one source and its bounded cache (bag_source.py).
    bags = plan["refs"]
    source = BagSource(bags.values(), cache_bytes_from_config(train.bag_cache_gb))
    in_dim = plan["in_dim"]
    by_id = {r.slide_id: r for r in records}
    training_features, _ = merge_provenance({sid: b.provenance for sid, b in bags.items()})

    # Which folds are current is decided before any is touched: a run that will change any of
    # them is a new training run (see _start_training_run).
    hashes = {f.fold: _fold_hash(f, model_name, train, classes, encoder, in_dim, bags) for f in splits.folds}
    current = {k: fold_is_complete(out_dir / f"fold_{k}") and _meta_hash(out_dir / f"fold_{k}", read_fold_meta) == h
               for k, h in hashes.items()}
    run_id = _start_training_run(out_dir, current)

    rows, fold_metrics, trained, skipped = [], [], [], []
    for fold in splits.folds:
        fold_dir = out_dir / f"fold_{fold.fold}"
        remove_stale_temps(fold_dir)
        config_hash = hashes[fold.fold]
        test_bags = source.subset(fold.test)
        desc = f"{cohort} fold {fold.fold}"
        if current[fold.fold]:
            model, meta = load_fold_model(fold_dir, device=device)
            if run_id is not None:  # this run adopts the fold (no write when it is already its own)
                meta = stamp_training_run(fold_dir, run_id)
            if "training_features" not in meta:  # trained before it was recorded: same features (hash)
                meta = record_training_features(fold_dir, training_features)
            skipped.append(fold.fold)
            log.info("%s: checkpoint complete and current, not retrained", desc)
        else:
            seed_everything(train.seed + fold.fold)
            with deterministic_algorithms(train.deterministic):
                model = create_aggregator(model_name, in_dim, len(classes), **train.model_args)
                if train.standardize:  # statistics of the training fold's instances only
                    model = InputStandardizer.from_moments(model, [plan["moments"][s] for s in fold.train],
                                                           center_per_slide=train.center_per_slide)
                result = train_fold(
                    model, source.subset(fold.train), source.subset(fold.val),
                    n_classes=len(classes), lr=train.lr, weight_decay=train.weight_decay,
                    epochs=train.epochs, patience=train.patience, balance=train.balance,
                    grad_accumulation=train.grad_accumulation, seed=train.seed + fold.fold,
                    device=device, progress=progress, desc=desc, warmup_epochs=train.warmup_epochs,
                    instance_loss_weight=train.instance_loss_weight, instance_topk=train.instance_topk,
                    min_delta=train.min_delta, instance_dropout=train.instance_dropout,
                    shuffle_instances=train.shuffle_instances, optimizer=train.optimizer,
                    min_epochs=train.min_epochs, lr_schedule=train.lr_schedule)
            meta = {
                "format_version": FOLD_FORMAT_VERSION,
                "model": model_name, "in_dim": in_dim, "n_classes": len(classes), "classes": classes,
                "model_args": train.model_args, "encoder": encoder, "cohort": cohort,
                "training_features": training_features,
                "fold": fold.fold, "n_folds": splits.n_folds,
                "train_slide_ids": list(fold.train), "val_slide_ids": list(fold.val),
                "test_slide_ids": list(fold.test),
                "best_epoch": result.best_epoch, "best_monitored_loss": result.best_val_loss,
                "monitored": result.monitored, "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early, "history": result.history,
                "config_hash": config_hash, "train_config": _jsonable(train), "device": str(device),
                "versions": _versions(),
                RUN_ID_KEY: run_id,
            }
            save_fold_model(model, fold_dir, meta)
            trained.append(fold.fold)
            log.info("%s: best epoch %d of %d (%s %.4f)", desc, result.best_epoch, result.epochs_run,
                     result.monitored, result.best_val_loss)
        probs = predict_probs(model, test_bags, device)
        for bag, p in zip(test_bags.refs, probs):
            r = by_id[bag.slide_id]
            rows.append([r.slide_id, r.patient_id, cohort, fold.fold, r.label, *[float(x) for x in p]])
        y = test_bags.labels
        fold_metrics.append({"fold": fold.fold, "best_epoch": meta["best_epoch"],
                             **classification_metrics(y, probs, n_bootstrap=train.bootstrap, seed=train.seed,
                                                      groups=[b.patient_id for b in test_bags.refs])})
        del model

    rows.sort(key=lambda row: row[0])
    header = ["slide_id", "patient_id", "cohort", "fold", "label", *[f"prob_{c}" for c in classes]]
    predictions_path = out_dir / "predictions.csv"
    write_csv_atomic(predictions_path, header, rows)

    class_index = {c: i for i, c in enumerate(classes)}
    y_all = np.array([class_index[row[4]] for row in rows])
    probs_all = np.array([row[5:] for row in rows], dtype=np.float64)
    pooled = classification_metrics(y_all, probs_all, n_bootstrap=train.bootstrap, seed=train.seed,
                                     groups=[row[1] for row in rows])
    pooled["n_patients"] = len({row[1] for row in rows})
    metrics = {
        "model": model_name, "cohort": cohort, "encoder": encoder, "classes": classes,
        "n_folds": splits.n_folds, RUN_ID_KEY: run_id,
        "auc": ("ROC AUC of prob_" + classes[-1] if len(classes) == 2 else "one-vs-rest macro ROC AUC"),
        "ci": (f"95% percentile bootstrap over patients, {train.bootstrap} resamples, seed {train.seed}; "
               f"resamples where a metric is undefined are skipped"),
        "pooled": pooled,
        "folds": fold_metrics,
    }
    metrics_path = out_dir / "metrics.json"
    write_json_atomic(metrics_path, metrics)
    return {"status": "done", "model_dir": str(out_dir), "splits": split_status, "folds_trained": trained,
            "folds_skipped": skipped, "metrics": pooled, "predictions": str(predictions_path),
            "metrics_path": str(metrics_path)}


def _start_training_run(out_dir: Path, current: dict[int, bool]) -> str | None:
    """The training run id this pass records in its folds and metrics.json.

    When every fold is current and the folds already share one run id, nothing is retrained and
    that run goes on (None: old checkpoints without ids, left as they are). Otherwise this is a new
    run: metrics.json and predictions.csv describe the folds about to change, so they are removed
    before any training (a retrain killed part-way leaves none, rather than the old run's), and
    each fold gets the new id as it is trained or reused (see training/runs.py).
    """
    from .checkpoints import read_fold_meta
    from .runs import RUN_ID_KEY, new_training_run_id

    if all(current.values()):
        ids = {read_fold_meta(out_dir / f"fold_{k}").get(RUN_ID_KEY) for k in current}
        if len(ids) == 1:
            return ids.pop()
    for name in ("metrics.json", "predictions.csv"):
        (out_dir / name).unlink(missing_ok=True)
    run_id = new_training_run_id()
    log.info("training run %s in %s (%d of %d fold(s) current)", run_id, out_dir,
             sum(current.values()), len(current))
    return run_id


def _meta_hash(fold_dir: Path, read_fold_meta) -> str | None:
    try:
        return read_fold_meta(fold_dir).get("config_hash")
    except PipelineError:
        return None


def _jsonable(section) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(section), default=str))


def _versions() -> dict:
    import h5py
    import numpy as np
    import safetensors
    import sklearn
    import torch

    from wsi_pipeline import __version__

    return {"wsi_pipeline": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scikit_learn": sklearn.__version__, "safetensors": safetensors.__version__,
            "h5py": h5py.__version__, "python": platform.python_version()}

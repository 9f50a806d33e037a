"""Fold checkpoints: `fold_{k}/model.safetensors` (weights) + `fold_{k}/config.json` (how to rebuild).

Weights are safetensors only — never a pickle, so loading a checkpoint runs no code. config.json
holds what `create_aggregator` needs (model, in_dim, n_classes, model_args) plus the classes, the
fold's slides and provenance. It is written after the weights, so a fold folder with a config.json
is complete (both files are written atomically).

Input standardisation (training/standardize.py): a model trained behind an `InputStandardizer` is
saved as the bare aggregator's weights (names unchanged) plus two tensors `input_mean` and
`input_std` (D,) in the same model.safetensors, and config.json records `standardize: true`.
`load_fold_model` wraps the rebuilt aggregator in an `InputStandardizer` whenever the tensors are
there, so whoever loads a fold gets a model that standardises its input. A checkpoint from before
standardisation existed (no tensors, no `standardize` key) loads as it was, with a warning.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import PipelineError
from ..io import atomic_path, write_json_atomic

log = logging.getLogger("wsi_pipeline")

WEIGHTS_FILE = "model.safetensors"
META_FILE = "config.json"
_REQUIRED_META = ("model", "in_dim", "n_classes", "classes", "model_args")
_FOLD_DIR_RE = re.compile(r"^fold_(\d+)$")


def fold_is_complete(fold_dir: str | Path) -> bool:
    fold_dir = Path(fold_dir)
    return (fold_dir / WEIGHTS_FILE).is_file() and (fold_dir / META_FILE).is_file()


def save_fold_model(model, fold_dir: str | Path, meta: dict) -> None:
    """Write the model's weights (safetensors) then `meta` (config.json) into `fold_dir`.

    `meta` must hold model, in_dim, n_classes, classes and model_args (JSON-serialisable). An
    `InputStandardizer` is saved as its aggregator plus `input_mean` / `input_std`, and
    meta["standardize"] is set to whether it was one.
    """
    from safetensors.torch import load_file, save_file, save_model

    from .standardize import CENTER_KEY, unwrap

    def model_center(stats):
        return "median" if float(stats[CENTER_KEY].reshape(-1)[0]) > 1.5 else "mean"

    model, stats = unwrap(model)
    meta = {**meta, "standardize": stats is not None}
    if stats is not None and CENTER_KEY in stats:
        meta["center_per_slide"] = True if model_center(stats) == "mean" else "median"
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"fold meta lacks {missing}")
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    (fold_dir / META_FILE).unlink(missing_ok=True)  # the folder is incomplete until meta is back
    with atomic_path(fold_dir / WEIGHTS_FILE) as tmp:
        # save_model (not save_file) de-duplicates tied weights, which save_file refuses.
        metadata = {"format": "pt", "model": str(meta["model"])}
        save_model(model, str(tmp), metadata=metadata)
        if stats is not None:
            tensors = load_file(str(tmp))  # save_model's de-duplicated tied weights, then the stats
            clash = sorted(set(tensors) & set(stats))
            if clash:
                raise ValueError(f"aggregator {meta['model']!r} has parameters named {clash}")
            save_file({**tensors, **stats}, str(tmp), metadata=metadata)
    write_json_atomic(fold_dir / META_FILE, meta)


def read_fold_meta(fold_dir: str | Path) -> dict:
    fold_dir = Path(fold_dir)
    path = fold_dir / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{fold_dir}: no {META_FILE} (incomplete fold; rerun training)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc})") from None
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise PipelineError(f"{path}: missing key(s) {', '.join(missing)}")
    return meta


def load_fold_model(fold_dir: str | Path, device="cpu"):
    """Rebuild a fold's aggregator from config.json + model.safetensors → (model in eval mode, meta).

    With input statistics in the weights file the model is an `InputStandardizer` around the
    aggregator (module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models.mil import create_aggregator, list_aggregators
    from .standardize import CENTER_KEY, STATS_KEYS, InputStandardizer

    fold_dir = Path(fold_dir)
    meta = read_fold_meta(fold_dir)
    weights = fold_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise PipelineError(f"{fold_dir}: no {WEIGHTS_FILE} (incomplete fold; rerun training)")
    try:
        model = create_aggregator(meta["model"], int(meta["in_dim"]), int(meta["n_classes"]),
                                  **meta["model_args"])
    except KeyError:
        raise PipelineError(f"{fold_dir}: aggregator {meta['model']!r} is not registered in this "
                            f"installation; registered: {', '.join(list_aggregators())}") from None
    except TypeError as exc:
        raise PipelineError(f"{fold_dir}: cannot rebuild {meta['model']!r} from its model_args: {exc}") from None
    try:
        tensors = load_file(str(weights), device=str(device))
        stats = {k: tensors.pop(k) for k in STATS_KEYS if k in tensors}
        center = tensors.pop(CENTER_KEY, None)
        _load_state_strict(model, tensors)
        if stats:
            if len(stats) != len(STATS_KEYS):
                raise ValueError(f"has {sorted(stats)} but not both of {list(STATS_KEYS)}")
            model = InputStandardizer(model, stats["input_mean"].cpu(), stats["input_std"].cpu(),
                                      center_per_slide=_center_of(center))
            if model.input_mean.shape[0] != int(meta["in_dim"]):
                raise ValueError(f"input statistics of dimension {model.input_mean.shape[0]}, "
                                 f"in_dim {meta['in_dim']}")
    except SafetensorError as exc:   # not a safetensors file (a pickle in its place is never unpickled)
        raise PipelineError(f"{weights}: not a readable safetensors file ({exc}); rerun training") from None
    except (RuntimeError, OSError, ValueError) as exc:
        raise PipelineError(f"{weights}: weights do not fit aggregator {meta['model']!r}: {exc}") from None
    if not stats:
        if meta.get("standardize"):
            raise PipelineError(f"{fold_dir}: config.json says the model was trained on standardised "
                                f"inputs but {WEIGHTS_FILE} holds no input_mean/input_std (rerun training)")
        if "standardize" not in meta:
            log.warning("%s: checkpoint without input standardisation statistics (trained by an older "
                        "version); features go in unstandardised, as it was trained. Retrain for "
                        "train.standardize.", fold_dir)
    return model.to(device).eval(), meta


def _load_state_strict(model, tensors: dict) -> None:
    """`load_state_dict` that, like safetensors' load_model, accepts tied weights stored once."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"unexpected tensors {sorted(unexpected)}")
    if missing:
        state = model.state_dict()
        loaded = {state[k].data_ptr() for k in tensors if k in state}
        missing = [k for k in missing if state[k].data_ptr() not in loaded]
        if missing:
            raise ValueError(f"missing tensors {sorted(missing)}")


def fold_dirs(model_dir: str | Path) -> list[Path]:
    """`model_dir/fold_*/` folders, sorted by fold number (fold_10 after fold_9)."""
    model_dir = Path(model_dir)
    found = [(int(m.group(1)), p) for p in model_dir.glob("fold_*")
             if p.is_dir() and (m := _FOLD_DIR_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_ensemble(model_dir: str | Path, device="cpu") -> list:
    """All fold models of a trained cohort → [(model in eval mode, meta), ...] sorted by fold.

    The one loader every consumer (heatmap, segment, predict) goes through. Raises `PipelineError`
    if there is no fold, a fold is incomplete, folds are missing against splits.json or come from
    different training runs (`runs.check_ensemble`), or disagree on the classes, the model or the
    input dimension.
    """
    from .runs import check_ensemble

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PipelineError(f"model folder not found: {model_dir} (expected RUN/mil/{{model}}/{{cohort}})")
    dirs = fold_dirs(model_dir)
    if not dirs:
        raise PipelineError(f"{model_dir}: no fold_*/ checkpoints (train this model and cohort first)")
    check_ensemble(model_dir, dirs, [read_fold_meta(d) for d in dirs])  # before loading any weights
    ensemble = [load_fold_model(d, device=device) for d in dirs]
    first = ensemble[0][1]
    for d, (_, meta) in zip(dirs, ensemble):
        for key in ("model", "in_dim", "classes"):
            if meta[key] != first[key]:
                raise PipelineError(f"{model_dir}: {d.name} has {key} {meta[key]!r} but {dirs[0].name} "
                                    f"has {first[key]!r} (mixed trainings in one folder)")
    return ensemble


def stamp_training_run(fold_dir: str | Path, run_id: str) -> dict:
    """Record in a reused fold's config.json (atomically; weights untouched) that training run
    `run_id` adopted it; returns the updated meta."""
    from .runs import RUN_ID_KEY

    meta = read_fold_meta(fold_dir)
    if meta.get(RUN_ID_KEY) != run_id:
        meta = {**meta, RUN_ID_KEY: run_id}
        write_json_atomic(Path(fold_dir) / META_FILE, meta)
    return meta


def record_training_features(fold_dir: str | Path, training_features: dict) -> dict:
    """Add `training_features` (what the fold's features were made from, features/provenance.py) to a reused
    fold's config.json trained before it was recorded (atomically; weights untouched)."""
    meta = {**read_fold_meta(fold_dir), "training_features": training_features}
    write_json_atomic(Path(fold_dir) / META_FILE, meta)
    return meta


def _center_of(center) -> str:
    """The centring a checkpoint's input_center_per_slide tensor records ("" when absent or 0)."""
    if center is None:
        return ""
    code = float(center.reshape(-1)[0])
    return "median" if code > 1.5 else "mean" if code > 0 else ""

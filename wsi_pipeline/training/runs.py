"""Training runs: which run each fold checkpoint belongs to, and whether an ensemble's folds agree.

A training run is one `train` of one model on one cohort that trains (or re-validates) its folds.
It gets an id (UTC start time + random suffix, `new_training_run_id`), written into every fold's
config.json as `training_run_id` and into metrics.json. A run that resumes after a kill adopts
the folds it reuses by stamping its own id into their config.json (their weights are current:
their config hash says so), so a finished run's folds all carry one id. A run killed part-way
leaves folds with different ids (or fewer folds than splits.json), which `check_ensemble` refuses:
scoring with a mix of old and new folds would exit 0 with a model nobody trained.

Checkpoints from before run ids: accepted with a warning when no fold has an id (nothing to
compare); a mix of folds with and without one is refused like any other mix.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from ..errors import PipelineError

log = logging.getLogger("wsi_pipeline")

RUN_ID_KEY = "training_run_id"
SPLITS_FILE = "splits.json"


def new_training_run_id() -> str:
    """'20250101T120000Z-1a2b3c4d': sortable by start time, unique across hosts."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def retrain_hint(model_dir: Path, meta: dict) -> str:
    """The command that rebuilds `model_dir` (RUN/mil/{model}/{cohort}) as one training run."""
    model = meta.get("model") or model_dir.parent.name
    cohort = meta.get("cohort") or model_dir.name
    run = model_dir.parent.parent.parent if model_dir.parent.parent.name == "mil" else Path("RUN")
    return f"retrain: wsi-pipeline train --manifest MANIFEST --features {run} --model {model} --cohort {cohort}"


def check_ensemble(model_dir: str | Path, fold_dirs: list[Path], metas: list[dict]) -> None:
    """Raise `PipelineError` (one line: the folder, what disagrees, the retrain command) unless the
    folds in `fold_dirs` (with their config.json `metas`) form one complete training run:
    - every fold splits.json lists is there, and no other, each trained on that fold's test slides;
    - every fold carries the same training run id (or, for old checkpoints, none does).
    """
    model_dir = Path(model_dir)
    hint = retrain_hint(model_dir, metas[0] if metas else {})
    problem = _splits_problem(model_dir, fold_dirs, metas) or _run_id_problem(fold_dirs, metas)
    if problem:
        raise PipelineError(f"{model_dir}: the fold ensemble is inconsistent: {problem}; {hint}")
    if metas and all(m.get(RUN_ID_KEY) is None for m in metas):
        log.warning("%s: fold checkpoints record no training run (made by an older version); their "
                    "consistency cannot be checked (%s)", model_dir, hint)


def _fold_number(fold_dir: Path) -> int:
    return int(fold_dir.name.split("_", 1)[1])


def _splits_problem(model_dir: Path, fold_dirs: list[Path], metas: list[dict]) -> str | None:
    path = model_dir / SPLITS_FILE
    if not path.is_file():  # a folder put together by hand: only the run ids can be checked
        return None
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
        tests = {int(f["fold"]): sorted(f["test"]) for f in splits["folds"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{SPLITS_FILE} is unreadable ({type(exc).__name__}: {exc})"
    found = {_fold_number(d): meta for d, meta in zip(fold_dirs, metas)}
    missing = sorted(set(tests) - set(found))
    if missing:
        return (f"{', '.join(f'fold_{k}' for k in missing)} missing ({SPLITS_FILE} has {len(tests)} "
                f"folds; a training run did not finish)")
    extra = sorted(set(found) - set(tests))
    if extra:
        return f"{', '.join(f'fold_{k}' for k in extra)} not among the {len(tests)} folds of {SPLITS_FILE}"
    for k, meta in sorted(found.items()):
        if "test_slide_ids" in meta and sorted(meta["test_slide_ids"]) != tests[k]:
            return f"fold_{k} was trained on another split than {SPLITS_FILE}'s"
    return None


def _run_id_problem(fold_dirs: list[Path], metas: list[dict]) -> str | None:
    ids = [m.get(RUN_ID_KEY) for m in metas]
    if len(set(ids)) <= 1:
        return None
    listed = ", ".join(f"{d.name}: {run_id or 'none recorded'}" for d, run_id in zip(fold_dirs, ids))
    return f"its folds come from different training runs ({listed}), e.g. a retrain that was stopped"

"""Patient-level cross-validation splits for one cohort, persisted to splits.json.

Outer split: sklearn `StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)` over the
cohort's slides sorted by slide_id, stratified by label and grouped by patient, so a patient's slides
are all in one test fold. Each fold's test slides are the out-of-fold predictions.

Inner split: from each fold's training patients, about `val_fraction` of each class's patients
(at least one where the class has two or more, never the last one) are held out for early stopping.
A patient's class for this is the most frequent label among its slides.

Reuse policy: `load_or_make_splits` reuses splits.json when its inputs are unchanged — the
cohort's (slide_id, patient_id, label) rows, classes, folds, val_fraction and seed. If any changed
it recomputes the splits with a warning naming what changed; fold checkpoints record their split in
their config hash, so every fold whose split changed is retrained rather than silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from ..errors import PipelineError
from ..io import write_json_atomic

log = logging.getLogger("wsi_pipeline")

SPLITS_FORMAT_VERSION = 1


class LabelledSlide(Protocol):
    """What splitting needs of a slide (a manifest `SlideRecord` has it)."""
    slide_id: str
    patient_id: str
    label: str


@dataclass(frozen=True)
class Fold:
    fold: int
    train: tuple[str, ...]   # slide ids the model is fitted on
    val: tuple[str, ...]     # slide ids for early stopping (patients disjoint from train)
    test: tuple[str, ...]    # held-out slide ids: this fold's out-of-fold predictions


@dataclass(frozen=True)
class CohortSplits:
    cohort: str
    classes: tuple[str, ...]
    n_folds: int
    val_fraction: float
    seed: int
    fingerprint: str         # hash of the sorted (slide_id, patient_id, label) rows
    slides: dict             # slide_id -> {"patient_id", "label"} at split time
    folds: tuple[Fold, ...]

    def to_dict(self) -> dict:
        return {
            "format_version": SPLITS_FORMAT_VERSION,
            "cohort": self.cohort,
            "classes": list(self.classes),
            "n_folds": self.n_folds,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "method": "StratifiedGroupKFold(shuffle=True) by patient; inner val by patient, per class",
            "fingerprint": self.fingerprint,
            "slides": self.slides,
            "folds": [{"fold": f.fold, "train": list(f.train), "val": list(f.val), "test": list(f.test)}
                      for f in self.folds],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CohortSplits":
        return cls(cohort=d["cohort"], classes=tuple(d["classes"]), n_folds=int(d["n_folds"]),
                   val_fraction=float(d["val_fraction"]), seed=int(d["seed"]),
                   fingerprint=d["fingerprint"], slides=dict(d["slides"]),
                   folds=tuple(Fold(int(f["fold"]), tuple(f["train"]), tuple(f["val"]), tuple(f["test"]))
                               for f in d["folds"]))


def rows_fingerprint(slides: Iterable[LabelledSlide]) -> str:
    rows = sorted([s.slide_id, s.patient_id, s.label] for s in slides)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def check_cohort_size(slides: Iterable[LabelledSlide], classes: Iterable[str], n_folds: int,
                      cohort: str) -> None:
    """Raise `PipelineError` unless every class has >= n_folds distinct patients."""
    patients = defaultdict(set)
    for s in slides:
        patients[s.label].add(s.patient_id)
    short = [f"class {c!r} has {len(patients[c])} patient(s)" for c in classes if len(patients[c]) < n_folds]
    if short:
        raise PipelineError(f"cohort {cohort!r} is too small for {n_folds}-fold cross-validation: "
                            f"{'; '.join(short)}; need >= {n_folds} patients per class "
                            f"(lower train.folds / --folds, or add patients)")


def make_splits(slides: Iterable[LabelledSlide], classes: Iterable[str], n_folds: int,
                val_fraction: float, seed: int, cohort: str) -> CohortSplits:
    """Patient-level stratified k-fold splits with an inner validation split per fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    slides = sorted(slides, key=lambda s: s.slide_id)
    classes = tuple(classes)
    check_cohort_size(slides, classes, n_folds, cohort)
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.array([class_index[s.label] for s in slides])
    groups = np.array([s.patient_id for s in slides])
    ids = np.array([s.slide_id for s in slides])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (train_idx, test_idx) in enumerate(splitter.split(np.zeros(len(slides)), y, groups)):
        train_slides = [slides[i] for i in train_idx]
        val_patients = _inner_val_patients(train_slides, classes, val_fraction,
                                           np.random.default_rng([seed, k]))
        train = tuple(sorted(s.slide_id for s in train_slides if s.patient_id not in val_patients))
        val = tuple(sorted(s.slide_id for s in train_slides if s.patient_id in val_patients))
        folds.append(Fold(k, train, val, tuple(sorted(ids[test_idx].tolist()))))
    return CohortSplits(
        cohort=cohort, classes=classes, n_folds=n_folds, val_fraction=float(val_fraction), seed=seed,
        fingerprint=rows_fingerprint(slides),
        slides={s.slide_id: {"patient_id": s.patient_id, "label": s.label} for s in slides},
        folds=tuple(folds))


def _inner_val_patients(train_slides, classes, val_fraction: float, rng: np.random.Generator) -> set[str]:
    labels_of = defaultdict(list)
    for s in train_slides:
        labels_of[s.patient_id].append(s.label)
    order = {c: i for i, c in enumerate(classes)}
    by_class = defaultdict(list)
    for patient in sorted(labels_of):
        counts = Counter(labels_of[patient])
        # Most frequent label; ties go to the earlier class so the choice is deterministic.
        patient_class = min(counts, key=lambda c: (-counts[c], order[c]))
        by_class[patient_class].append(patient)
    val = set()
    for c in classes:
        patients = by_class.get(c, [])
        if len(patients) < 2:
            continue  # a class's only training patient stays in training
        n_val = min(max(1, int(round(val_fraction * len(patients)))), len(patients) - 1)
        val.update(patients[i] for i in rng.permutation(len(patients))[:n_val])
    return val


def validate_splits(splits: CohortSplits) -> None:
    """Raise `PipelineError` if a patient is in two folds' test sets or in both train and val."""
    patient = {sid: rec["patient_id"] for sid, rec in splits.slides.items()}
    where = f"splits of cohort {splits.cohort!r}"
    tested = [sid for f in splits.folds for sid in f.test]
    if sorted(tested) != sorted(splits.slides):
        raise PipelineError(f"{where}: the test folds do not cover every slide exactly once")
    test_fold = {}
    for f in splits.folds:
        for sid in f.test:
            other = test_fold.setdefault(patient[sid], f.fold)
            if other != f.fold:
                raise PipelineError(f"{where}: patient {patient[sid]!r} is in test folds {other} and {f.fold}")
        parts = [{patient[s] for s in part} for part in (f.train, f.val, f.test)]
        if parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]:
            raise PipelineError(f"{where}: fold {f.fold} shares patients between train, val and test")
        if sorted(f.train + f.val + f.test) != sorted(splits.slides):
            raise PipelineError(f"{where}: fold {f.fold} does not use every slide exactly once")


def load_or_make_splits(path: str | Path, slides: Iterable[LabelledSlide], classes: Iterable[str],
                        n_folds: int, val_fraction: float, seed: int, cohort: str
                        ) -> tuple[CohortSplits, str]:
    """Reuse `path` (splits.json) if its inputs are unchanged, else make and write new splits.

    Returns (splits, status) with status "reused", "created" or "recomputed" (see module docstring).
    """
    path = Path(path)
    slides = list(slides)
    classes = tuple(classes)
    wanted = {"classes": list(classes), "n_folds": n_folds, "val_fraction": float(val_fraction),
              "seed": seed, "fingerprint": rows_fingerprint(slides)}
    status = "created"
    if path.is_file():
        try:
            old = CohortSplits.from_dict(json.loads(path.read_text(encoding="utf-8")))
            validate_splits(old)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, PipelineError) as exc:
            log.warning("%s: unreadable or inconsistent (%s); recomputing the splits", path, exc)
        else:
            have = {"classes": list(old.classes), "n_folds": old.n_folds, "val_fraction": old.val_fraction,
                    "seed": old.seed, "fingerprint": old.fingerprint}
            if have == wanted:
                return old, "reused"
            log.warning("%s: %s; recomputing the splits (folds with a changed split are retrained)",
                        path, _describe_change(old, have, wanted, slides))
        status = "recomputed"
    splits = make_splits(slides, classes, n_folds, val_fraction, seed, cohort)
    validate_splits(splits)
    write_json_atomic(path, splits.to_dict())
    return splits, status


def _describe_change(old: CohortSplits, have: dict, wanted: dict, slides) -> str:
    changes = [f"{k} {have[k]!r} -> {wanted[k]!r}" for k in ("classes", "n_folds", "val_fraction", "seed")
               if have[k] != wanted[k]]
    if have["fingerprint"] != wanted["fingerprint"]:
        now = {s.slide_id: {"patient_id": s.patient_id, "label": s.label} for s in slides}
        added = sorted(set(now) - set(old.slides))
        removed = sorted(set(old.slides) - set(now))
        edited = sorted(s for s in set(now) & set(old.slides) if now[s] != old.slides[s])
        for name, items in (("added", added), ("removed", removed), ("changed patient/label", edited)):
            if items:
                shown = ", ".join(items[:10]) + (f" (+{len(items) - 10} more)" if len(items) > 10 else "")
                changes.append(f"slides {name}: {shown}")
    return "; ".join(changes) or "inputs changed"

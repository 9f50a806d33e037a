"""Patient-level CV splits: no patient leaks across folds or between train and val; reuse policy."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import pytest

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.training.splits import (CohortSplits, check_cohort_size, load_or_make_splits,
                                          make_splits, validate_splits)


@dataclass(frozen=True)
class S:
    slide_id: str
    patient_id: str
    label: str


def slides(n_patients=20, classes=("a", "b"), per_patient=(1, 3, 2)):
    out = []
    for p in range(n_patients):
        for s in range(per_patient[p % len(per_patient)]):
            out.append(S(f"P{p:02d}-S{s}", f"P{p:02d}", classes[(p // 2) % len(classes)]))
    return out


@pytest.mark.parametrize("n_folds, classes", [(3, ("a", "b")), (5, ("a", "b")), (4, ("a", "b", "c"))])
def test_patients_never_in_two_folds_or_in_train_and_val(n_folds, classes):
    data = slides(n_patients=24, classes=classes)
    splits = make_splits(data, classes, n_folds, 0.25, seed=3, cohort="x")
    patient = {s.slide_id: s.patient_id for s in data}
    assert len(splits.folds) == n_folds
    test_fold_of_patient = {}
    for fold in splits.folds:
        train, val, test = ({patient[s] for s in part} for part in (fold.train, fold.val, fold.test))
        assert not train & val and not train & test and not val & test
        assert sorted(fold.train + fold.val + fold.test) == sorted(patient)
        assert val, "every fold has validation patients"
        for p in test:
            assert test_fold_of_patient.setdefault(p, fold.fold) == fold.fold
        # the inner split is stratified: every class is represented in train and in val
        labels = {s.slide_id: s.label for s in data}
        assert {labels[s] for s in fold.train} == set(classes)
        assert {labels[s] for s in fold.val} == set(classes)
    assert sorted(s for f in splits.folds for s in f.test) == sorted(patient)
    validate_splits(splits)  # the library's own check agrees


def test_splits_are_independent_of_row_order_and_seeded():
    data = slides()
    a = make_splits(data, ("a", "b"), 3, 0.2, seed=0, cohort="x")
    b = make_splits(list(reversed(data)), ("a", "b"), 3, 0.2, seed=0, cohort="x")
    c = make_splits(data, ("a", "b"), 3, 0.2, seed=1, cohort="x")
    assert a.folds == b.folds
    assert a.folds != c.folds


def test_too_few_patients_per_class_names_the_class():
    data = [S("s1", "p1", "a"), S("s2", "p2", "a"), S("s3", "p3", "a"),
            S("s4", "p4", "b"), S("s5", "p4", "b"), S("s6", "p5", "b")]  # b: 3 slides, 2 patients
    with pytest.raises(PipelineError, match=r"class 'b' has 2 patient\(s\).*need >= 3 patients per class"):
        check_cohort_size(data, ("a", "b"), 3, "small")


def test_splits_json_reused_then_recomputed_with_warning(tmp_path, caplog):
    path = tmp_path / "splits.json"
    data = slides()
    first, status = load_or_make_splits(path, data, ("a", "b"), 3, 0.2, 0, "x")
    assert status == "created" and path.is_file()
    # Hand-edit the stored split (still valid): a rerun must reuse the file, not recompute.
    stored = json.loads(path.read_text())
    stored["method"] = "edited"
    path.write_text(json.dumps(stored))
    again, status = load_or_make_splits(path, list(reversed(data)), ("a", "b"), 3, 0.2, 0, "x")
    assert status == "reused" and again == CohortSplits.from_dict(stored)
    assert json.loads(path.read_text())["method"] == "edited"  # untouched

    changed = data + [S("NEW-S0", "NEW", "a")]
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        third, status = load_or_make_splits(path, changed, ("a", "b"), 3, 0.2, 0, "x")
    assert status == "recomputed"
    assert "slides added: NEW-S0" in caplog.text
    assert "NEW-S0" in json.loads(path.read_text())["slides"]

    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        _, status = load_or_make_splits(path, changed, ("a", "b"), 4, 0.2, 0, "x")
    assert status == "recomputed" and "n_folds 3 -> 4" in caplog.text


def test_corrupt_splits_json_is_recomputed(tmp_path, caplog):
    path = tmp_path / "splits.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        splits, status = load_or_make_splits(path, slides(), ("a", "b"), 3, 0.2, 0, "x")
    assert status == "recomputed" and "unreadable" in caplog.text
    validate_splits(CohortSplits.from_dict(json.loads(path.read_text())))

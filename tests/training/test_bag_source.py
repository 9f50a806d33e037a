"""Bags streamed from disk (training/bag_source.py): the train stage reads each bag per pass through a
bounded cache, and gives the same predictions and metrics as the in-memory path it replaced (every
bag loaded as float32 up front, fold statistics fitted on the arrays)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from wsi_pipeline.errors import SlideError
from wsi_pipeline.features.features_h5 import write_features_h5
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.training.bag_source import BagRef, BagSource
from wsi_pipeline.training.bags import Bag, load_bag

from .conftest import DIM, ENCODER, planted_bag, small_config, write_manifest

# Instance dropout + shuffling: the trainer's random draws per bag must line up on both paths.
TRAIN = dict(folds=2, epochs=3, patience=3, bootstrap=20, center_per_slide="median",
             instance_dropout=0.25, shuffle_instances=True)


@pytest.fixture(scope="module")
def half_cohort(tmp_path_factory):
    """12 patients, one float16 features.h5 each (bags of 16-40 patches) → (features_run_dir, manifest)."""
    root = tmp_path_factory.mktemp("half")
    rng = np.random.default_rng(3)
    run_dir, rows = root / "features_run", []
    for p in range(12):
        sid = f"c1-P{p:02d}"
        x = planted_bag(rng, p % 2 == 1, int(rng.integers(16, 41))) * np.float32(1 + p % 3)
        coords = np.stack([np.arange(len(x)) * 224, np.zeros(len(x))], axis=1).astype(np.int64)
        write_features_h5(RunFolder(run_dir).features_h5(ENCODER, sid), x, coords,
                          {"encoder": ENCODER, "out_dim": DIM, "config_hash": f"h{p}"}, dtype="float16")
        rows.append({"slide_id": sid, "patient_id": f"P{p:02d}", "label": ("neg", "pos")[p % 2], "cohort": "c1"})
    return run_dir, write_manifest(root / "manifest.csv", rows)


def _train(features_run, manifest_path, out_run, **overrides):
    from stages.train import run_train

    cfg = small_config(**{**TRAIN, **overrides})
    manifest = load_manifest(manifest_path, require_labels=True)
    result = run_train(manifest, cfg, out_run, progress=False, features_run_dir=features_run)
    assert result["c1"]["status"] == "done", result["c1"]
    model_dir = RunFolder(out_run).mil_dir("abmil", "c1")
    with open(model_dir / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return cfg, model_dir, rows, json.loads((model_dir / "metrics.json").read_text())


def _in_memory_reference(cfg, features_run, manifest_path, model_dir):
    """The previous train stage, transliterated: all bags in memory as float32, statistics fitted on
    the arrays of each training fold, lists of Bag through train_fold / predict_probs."""
    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.training.metrics import classification_metrics
    from wsi_pipeline.training.splits import load_or_make_splits
    from wsi_pipeline.training.standardize import InputStandardizer
    from wsi_pipeline.training.trainer import predict_probs, seed_everything, train_fold

    train = cfg.train
    records = sorted(load_manifest(manifest_path, require_labels=True), key=lambda r: r.slide_id)
    classes = ["neg", "pos"]
    bags = {}
    for r in records:
        features, coords, _ = load_bag(RunFolder(features_run).features_h5(ENCODER, r.slide_id), r.slide_id)
        assert features.dtype == np.float32
        bags[r.slide_id] = Bag(r.slide_id, r.patient_id, classes.index(r.label), features, coords, "")
    splits, status = load_or_make_splits(model_dir / "splits.json", records, classes, train.folds,
                                         train.val_fraction, train.seed, "c1")
    assert status == "reused"
    probs, labels, groups = {}, {}, {}
    for fold in splits.folds:
        seed_everything(train.seed + fold.fold)
        model = create_aggregator("abmil", DIM, 2, **train.model_args)
        model = InputStandardizer.fit(model, [bags[s] for s in fold.train], center_per_slide=train.center_per_slide)
        train_fold(model, [bags[s] for s in fold.train], [bags[s] for s in fold.val], n_classes=2, lr=train.lr,
                   weight_decay=train.weight_decay, epochs=train.epochs, patience=train.patience,
                   balance=train.balance, grad_accumulation=train.grad_accumulation, seed=train.seed + fold.fold,
                   device=torch.device("cpu"), instance_dropout=train.instance_dropout,
                   shuffle_instances=train.shuffle_instances)
        test = [bags[s] for s in fold.test]
        for bag, p in zip(test, predict_probs(model, test, torch.device("cpu"))):
            probs[bag.slide_id], labels[bag.slide_id], groups[bag.slide_id] = p, bag.label, bag.patient_id
    ids = sorted(probs)
    pooled = classification_metrics(np.array([labels[s] for s in ids]), np.stack([probs[s] for s in ids]),
                                    n_bootstrap=train.bootstrap, seed=train.seed, groups=[groups[s] for s in ids])
    return probs, pooled


def test_streamed_training_equals_in_memory_path(half_cohort, tmp_path):
    features_run, manifest_path = half_cohort
    # No cache: every pass reads every bag from its file (the cache's own effect: the test below).
    cfg, model_dir, rows, metrics = _train(features_run, manifest_path, tmp_path / "a", bag_cache_gb=0)
    reference, pooled = _in_memory_reference(cfg, features_run, manifest_path, model_dir)

    assert [r["slide_id"] for r in rows] == sorted(reference)
    got = np.array([[float(r["prob_neg"]), float(r["prob_pos"])] for r in rows])  # repr: exact round trip
    assert np.array_equal(got, np.stack([reference[r["slide_id"]] for r in rows]))
    for key in ("auc", "balanced_accuracy"):
        assert metrics["pooled"][key] == pooled[key]
    assert metrics["pooled"]["auc"]["value"] > 0.5  # it learnt the planted signal, so the comparison means something


def _refs(features_run, n=6):
    refs = []
    for p in range(n):
        sid = f"c1-P{p:02d}"
        path = RunFolder(features_run).features_h5(ENCODER, sid)
        features, _, _ = load_bag(path, sid)
        refs.append(BagRef(sid, f"P{p:02d}", p % 2, path, len(features), DIM, "float16", f"h{p}"))
    return refs


def test_cache_is_bounded_and_prefetch_keeps_order(half_cohort):
    features_run, _ = half_cohort
    refs = _refs(features_run)
    budget = sum(r.nbytes for r in refs[:3])
    source = BagSource(refs, cache_bytes=budget, prefetch=2)
    bags = source.subset([r.slide_id for r in refs])
    order = [5, 0, 3, 3, 1, 4, 2, 0]
    got = list(bags.iter(order))
    assert [b.slide_id for b in got] == [refs[i].slide_id for i in order]
    assert all(b.features.dtype == np.float16 for b in got)  # stored dtype until the device
    assert source.cached_bytes() <= budget and source.reads + source.hits == len(order)
    assert source.hits >= 1  # bag 3 twice in a row
    for b, i in zip(got, order):
        assert np.array_equal(b.features.astype(np.float32), load_bag(refs[i].path)[0])
    none = BagSource(refs, cache_bytes=0)
    list(none.subset([r.slide_id for r in refs]).iter(order))
    assert none.reads == len(order) and none.cached_bytes() == 0

    # The same predictions through a warm cache, no cache, and in-memory float32 bags.
    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.training.trainer import predict_probs

    torch.manual_seed(0)
    model = create_aggregator("abmil", DIM, 2, hidden_dim=8, attention_dim=4, dropout=0.0)
    in_memory = [Bag(r.slide_id, r.patient_id, r.label, *load_bag(r.path)[:2], "") for r in refs]
    expected = predict_probs(model, in_memory, torch.device("cpu"))
    for s in (source, none):
        assert np.array_equal(predict_probs(model, s.subset([r.slide_id for r in refs]), torch.device("cpu")),
                              expected)


def test_a_bag_changed_on_disk_names_its_slide(half_cohort, tmp_path):
    features_run, _ = half_cohort
    refs = _refs(features_run, n=3)
    moved = tmp_path / "c1-P01.h5"
    x = np.zeros((5, DIM), np.float32)
    write_features_h5(moved, x, np.zeros((5, 2), np.int64), {"encoder": ENCODER, "out_dim": DIM}, dtype="float16")
    refs[1] = BagRef(**{**refs[1].__dict__, "path": moved})
    bags = BagSource(refs, prefetch=2).subset([r.slide_id for r in refs])
    seen = []
    with pytest.raises(SlideError, match="c1-P01.*changed since it was checked"):
        for bag in bags.iter():
            seen.append(bag.slide_id)
    assert seen == ["c1-P00"]

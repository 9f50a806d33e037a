"""The heatmap stage on a tiny run folder: features.h5 files, a (fake or real) fold ensemble,
per-slide failures, reruns that skip finished slides, and the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import stages.heatmap as heatmap_stage
import wsi_pipeline.exports.heatmaps as heatmap_library
from wsi_pipeline.cli import main
from wsi_pipeline.features.features_h5 import write_features_h5
from wsi_pipeline.run.config import load_config
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import load_manifest

from .conftest import PATCH_LEVEL0, planted_scores, tissue_grid

MODEL = "fakemil"
ENCODER = "test_encoder"
CLASSES = ["normal", "tumor"]
CONFIG = f"""
extract:
  encoder: {ENCODER}
heatmap:
  top_k: 2
  png_max_px: 512
  score: tumor
"""


class FakeTrainingAPI:
    """Stands in for wsi_pipeline.training: instance score = feature 0 (the planted lesion fraction)."""

    def __init__(self):
        self.loaded = []

    def load_ensemble(self, model_dir):
        self.loaded.append(model_dir)
        return [(object(), {"classes": CLASSES}), (object(), {"classes": CLASSES})]

    def ensemble_predict(self, models, features, coords):
        assert len(models) == 2 and len(features) == len(coords)
        f0 = features[:, 0].astype(np.float64)
        return SimpleNamespace(probs=np.array([0.3, 0.7]), instance_scores=f0,
                               instance_logits=np.stack([-4 * f0, 4 * f0], axis=1), classes=CLASSES)


def write_slide_features(run, slide_path, slide_id, dim=4):
    coords = tissue_grid(slide_path)
    features = np.random.default_rng(1).normal(size=(len(coords), dim)).astype(np.float32)
    features[:, 0] = planted_scores(slide_path, coords)
    attrs = {"encoder": ENCODER, "out_dim": dim, "config_hash": "test", "patch_size": 64,
             "patch_size_level0": PATCH_LEVEL0, "target_mpp": 1.0, "slide_mpp": 0.5,
             "level0_width": 2048, "level0_height": 1536}
    write_features_h5(run.features_h5(ENCODER, slide_id), features, coords, attrs)
    return coords, features


def write_fake_folds(model_dir):
    for k in range(2):
        fold = model_dir / f"fold_{k}"
        fold.mkdir(parents=True, exist_ok=True)
        (fold / "model.safetensors").write_bytes(f"weights {k}".encode())
        (fold / "config.json").write_text(json.dumps({"classes": CLASSES}))


@pytest.fixture()
def tiny_run(tmp_path, make_slide, monkeypatch):
    pos = make_slide("heatmap_lesion", positive=True, seed=3)
    neg = make_slide("heatmap_negative", positive=False, seed=4)
    manifest = tmp_path / "manifest.csv"
    rows = [["A", pos, "P1", "tumor", "demo"], ["B", neg, "P2", "normal", "demo"],
            ["NOFEAT", neg, "P3", "normal", "demo"], ["NOMODEL", neg, "P4", "normal", "other"]]
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "path", "patient_id", "label", "cohort"], *rows])
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    run = RunFolder(tmp_path / "run")
    write_slide_features(run, pos, "A")
    write_slide_features(run, neg, "B")
    write_slide_features(run, neg, "NOMODEL")
    write_fake_folds(run.mil_dir(MODEL, "demo"))
    api = FakeTrainingAPI()
    monkeypatch.setattr(heatmap_library, "_load_training_api",
                        lambda device: (api.load_ensemble, api.ensemble_predict))
    return SimpleNamespace(run=run, manifest=manifest, config=config, api=api, root=tmp_path)


def _outputs(out_dir):
    return {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}


def test_stage_writes_everything_records_failures_and_skips_on_rerun(tiny_run):
    cfg = load_config(tiny_run.config)
    manifest = load_manifest(tiny_run.manifest)
    report = heatmap_stage.run_heatmap(manifest, cfg, tiny_run.run.root, model=MODEL, progress=False)
    assert report.done == ["A", "B"]
    assert set(report.failed) == {"NOFEAT", "NOMODEL"}
    assert "no features" in report.failed["NOFEAT"] and "extract" in report.failed["NOFEAT"]
    assert "no trained model" in report.failed["NOMODEL"]
    failures = {r["slide_id"]: r for r in csv.DictReader(open(tiny_run.run.root / "failures.csv"))}
    assert set(failures) == {"NOFEAT", "NOMODEL"} and failures["NOFEAT"]["stage"] == "heatmap"
    assert len(tiny_run.api.loaded) == 1  # one ensemble per model folder, shared by the cohort

    out = tiny_run.run.heatmaps_dir(MODEL)
    for slide_id in ("A", "B"):
        for name in (f"{slide_id}.png", f"{slide_id}.tif", f"{slide_id}.geojson", f"{slide_id}.done.json"):
            assert (out / name).is_file(), name
        assert len(list((out / f"{slide_id}_topk").glob("*.png"))) == 4
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    done = json.loads((out / "A.done.json").read_text())
    assert done["score"] == f"{MODEL} p(tumor)" and done["prediction"]["classes"] == CLASSES
    # The PNG says what the ensemble predicts for the whole slide (its text chunk; also drawn).
    probs = done["prediction"]["probs"]
    best = max(range(len(probs)), key=probs.__getitem__)
    with Image.open(out / "A.png") as png:
        assert png.text["caption"] == f"slide: {CLASSES[best]} {probs[best]:.2f}"
    assert set(done["identity"]["checkpoints"]) == {"fold_0/model.safetensors", "fold_0/config.json",
                                                   "fold_1/model.safetensors", "fold_1/config.json"}
    # heatmap.score "tumor" maps the per-patch tumour probability; every score is a measurement.
    geo = json.loads((out / "A.geojson").read_text())
    m = geo["features"][0]["properties"]["measurements"]
    assert set(m) == {f"{MODEL} p(tumor)", f"{MODEL} score", f"{MODEL} p(normal)", f"{MODEL} p(tumor) (rank)"}

    # Rerun: finished slides are skipped without loading a model or touching a file.
    before = _outputs(out)
    report = heatmap_stage.run_heatmap(manifest, cfg, tiny_run.run.root, model=MODEL, progress=False)
    assert report.skipped == ["A", "B"] and not report.done
    assert len(tiny_run.api.loaded) == 1
    assert _outputs(out) == before

    # New weights in the model folder: the slides are redone.
    (tiny_run.run.mil_dir(MODEL, "demo") / "fold_1" / "model.safetensors").write_bytes(b"retrained")
    report = heatmap_stage.run_heatmap(manifest, cfg, tiny_run.run.root, model=MODEL, slides=["A"],
                                       progress=False)
    assert report.done == ["A"] and report.ok
    # A lost output is rewritten.
    (out / "B.tif").unlink()
    report = heatmap_stage.run_heatmap(manifest, cfg, tiny_run.run.root, model=MODEL, slides=["B"],
                                       progress=False)
    assert report.done == ["B"] and (out / "B.tif").is_file()


def test_cli_runs_the_stage_and_exits_1_on_failures(tiny_run, capsys):
    args = ["heatmap", "--manifest", str(tiny_run.manifest), "--run", str(tiny_run.run.root),
            "--config", str(tiny_run.config), "--model", MODEL, "--no-progress"]
    assert main(args + ["--slides", "A"]) == 0
    assert (tiny_run.run.heatmaps_dir(MODEL) / "A.done.json").is_file()
    assert "1 done" in capsys.readouterr().out
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "1 done, 1 already complete, 2 failed" in out
    # --model-dir overrides the cohort's folder: NOMODEL now has one.
    assert main(args + ["--slides", "NOMODEL", "--model-dir",
                        str(tiny_run.run.mil_dir(MODEL, "demo"))]) == 0
    assert main(args + ["--slides", "nope"]) == 2


def test_stage_with_the_real_fold_ensemble(tmp_path, make_slide):
    torch = pytest.importorskip("torch")
    checkpoints = pytest.importorskip("wsi_pipeline.training.checkpoints")
    from wsi_pipeline.models.mil import create_aggregator

    slide = make_slide("heatmap_lesion", positive=True, seed=3)
    run = RunFolder(tmp_path / "run")
    coords, _ = write_slide_features(run, slide, "A", dim=8)
    torch.manual_seed(0)
    for k in range(2):
        model = create_aggregator("abmil", 8, 2, hidden_dim=8, attention_dim=4)
        checkpoints.save_fold_model(model, run.mil_dir("abmil", "demo") / f"fold_{k}",
                                    {"model": "abmil", "in_dim": 8, "n_classes": 2, "classes": CLASSES,
                                     "model_args": {"hidden_dim": 8, "attention_dim": 4}})
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_id,path,patient_id,label,cohort\nA,{slide},P1,tumor,demo\n")
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, encoder=ENCODER),
                              heatmap=dataclasses.replace(cfg.heatmap, exports=["geojson", "tif"]))
    report = heatmap_stage.run_heatmap(load_manifest(manifest), cfg, run.root, model="abmil", progress=False)
    assert report.done == ["A"], report.failed
    geo = json.loads((run.heatmaps_dir("abmil") / "A.geojson").read_text())
    assert len(geo["features"]) == len(coords)
    scores = [f["properties"]["measurements"]["abmil score"] for f in geo["features"]]
    assert 0 <= min(scores) <= max(scores) <= 1

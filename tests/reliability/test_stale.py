"""Stale results are never trusted (issue 13, item 5).

Tile/extract outputs record the slide file's identity, so the CLI redoes a slide replaced at the same
path; a retrain invalidates the cohort's metrics first, every fold records its training run, and the
one ensemble loader refuses a mix of runs, naming the command that fixes it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from wsi_pipeline.cli import main
from wsi_pipeline.errors import PipelineError
from wsi_pipeline.slides.identity import file_fingerprint, slide_identity
from wsi_pipeline.tiling.coords_h5 import read_slide_identity

TILE_CFG = ("tiling:\n  target_mpp: 2.0\n  patch_size_px: 64\ntissue:\n  mask_mpp: 8.0\n"
            "extract:\n  encoder: stain_texture\n  batch_size: 64\n  num_workers: 0\n")


# -- (a) tile / extract ------------------------------------------------------------------------
@pytest.fixture
def one_slide_run(make_slide, tmp_path):
    """A manifest of one slide S (a copy of slide A), its config, an empty run folder, and a second
    slide B of the same size (another scan) to replace it with."""
    a = make_slide("stale_a", seed=11)
    b = make_slide("stale_b", seed=12, positive=True)
    (tmp_path / "slides").mkdir()
    slide = tmp_path / "slides" / "S.svs"
    shutil.copyfile(a, slide)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_id,path,patient_id,label,cohort\nS,slides/S.svs,P1,tumor,demo\n")
    config = tmp_path / "c.yaml"
    config.write_text(TILE_CFG)
    run = tmp_path / "run"
    return {"slide": slide, "original": a, "other": b, "run": run,
            "tile": ["tile", "--manifest", str(manifest), "--config", str(config), "--out", str(run), "--no-progress"],
            "extract": ["extract", "--manifest", str(manifest), "--config", str(config), "--out", str(run),
                        "--no-progress"]}


def _cli(args, capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().out


def _features_attrs(run):
    with h5py.File(run / "features" / "stain_texture" / "S.h5", "r") as f:
        return dict(f.attrs)


def test_replaced_slide_is_tiled_and_extracted_again_by_the_cli(one_slide_run, capsys):
    s = one_slide_run
    assert _cli(s["tile"], capsys) == (0, "tile: 1 done, 0 already complete, 0 failed\n")
    assert _cli(s["extract"], capsys)[0] == 0
    coords_h5 = s["run"] / "tiles" / "S.coords.h5"
    old_features_hash = _features_attrs(s["run"])["config_hash"]

    # Another scan copied over the slide: same name, same pixel dimensions.
    shutil.copyfile(s["other"], s["slide"])
    rc, out = _cli(s["extract"], capsys)  # before re-tiling: an error naming the fix, not "complete"
    assert rc == 1 and out.endswith("extract: 0 done, 0 already complete, 1 failed\n")
    with open(s["run"] / "failures.csv") as fh:
        error = {r["slide_id"]: r["error"] for r in csv.DictReader(fh)}["S"]
    assert "changed since it was tiled" in error and "re-run the tile stage" in error

    first = read_slide_identity(coords_h5)
    assert _cli(s["tile"], capsys) == (0, "tile: 1 done, 0 already complete, 0 failed\n")
    assert first.fingerprint == file_fingerprint(s["original"], first.size_bytes)
    second = read_slide_identity(coords_h5)
    assert second.fingerprint == file_fingerprint(s["other"], s["other"].stat().st_size) != first.fingerprint
    assert _cli(s["extract"], capsys) == (0, "extract: 1 done, 0 already complete, 0 failed\n")
    attrs = _features_attrs(s["run"])
    assert attrs["slide_fingerprint"] == second.fingerprint and attrs["config_hash"] != old_features_hash
    assert not (s["run"] / "failures.csv").exists() or "S" not in (s["run"] / "failures.csv").read_text()


def test_touched_or_copied_identical_slide_is_not_redone(one_slide_run, capsys):
    s = one_slide_run
    assert main(s["tile"]) == 0 and main(s["extract"]) == 0
    capsys.readouterr()
    stat = s["slide"].stat()
    os.utime(s["slide"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 3_600 * 10**9))  # touched
    copy = s["slide"].with_name("copy.svs")
    shutil.copyfile(s["slide"], copy)
    os.replace(copy, s["slide"])  # restored from a copy: new inode, new mtime, same bytes
    assert _cli(s["tile"], capsys) == (0, "tile: 0 done, 1 already complete, 0 failed\n")
    assert _cli(s["extract"], capsys) == (0, "extract: 0 done, 1 already complete, 0 failed\n")


def test_coords_without_slide_identity_are_redone_by_tile(one_slide_run, capsys):
    """A coords.h5 written before identities were recorded cannot show which file it came from."""
    s = one_slide_run
    assert main(s["tile"]) == 0
    coords_h5 = s["run"] / "tiles" / "S.coords.h5"
    with h5py.File(coords_h5, "r+") as f:
        for key in ("slide_size_bytes", "slide_mtime_ns", "slide_fingerprint", "slide_level_dimensions"):
            del f["coords"].attrs[key]
    assert read_slide_identity(coords_h5) is None
    assert main(s["extract"]) == 0  # extract still accepts it (geometry check only)...
    capsys.readouterr()
    assert _cli(s["tile"], capsys) == (0, "tile: 1 done, 0 already complete, 0 failed\n")  # ...tile redoes it
    assert read_slide_identity(coords_h5) is not None


def test_fingerprint_reads_only_the_ends_and_covers_small_files_whole(tmp_path):
    big = tmp_path / "big.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    big.write_bytes(data)
    base = file_fingerprint(big, len(data))
    assert base.startswith("sha256-ht1m:")
    data[len(data) // 2] ^= 1  # the middle MiB is not read (documented limit)
    big.write_bytes(data)
    assert file_fingerprint(big, len(data)) == base
    data[-1] ^= 1
    big.write_bytes(data)
    assert file_fingerprint(big, len(data)) != base
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: every byte counts
    before = file_fingerprint(small, 1 << 20)
    small.write_bytes(bytes(range(256)) * 2048 + b"\x01" + bytes(range(256)) * 2048)
    assert file_fingerprint(small, small.stat().st_size) != before
    ident = slide_identity(small, [(10, 20), (5, 10)])
    assert ident.matches(dataclasses.replace(ident, mtime_ns=0))
    assert not ident.matches(dataclasses.replace(ident, level_dimensions=((10, 20),)))


# -- (b) train / ensemble consumers ------------------------------------------------------------
def _fold_metas(model_dir):
    from wsi_pipeline.training.checkpoints import fold_dirs, read_fold_meta

    return [read_fold_meta(d) for d in fold_dirs(model_dir)]


def test_killed_retrain_leaves_no_stale_metrics_and_the_mixed_ensemble_is_refused(tmp_path, monkeypatch, capsys):
    import wsi_pipeline.training.trainer as trainer
    from stages.train import run_train
    from tests.training.conftest import make_cohort, small_config
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.manifest import load_manifest
    from wsi_pipeline.training.checkpoints import load_ensemble

    run_dir, manifest_path = make_cohort(tmp_path, n_patients=12)
    manifest = load_manifest(manifest_path, require_labels=True)
    model_dir = RunFolder(run_dir).mil_dir("abmil", "c1")
    cfg = small_config(epochs=2, bootstrap=20)
    assert run_train(manifest, cfg, run_dir, progress=False)["c1"]["status"] == "done"
    first_metas = _fold_metas(model_dir)
    first_metrics = json.loads((model_dir / "metrics.json").read_text())

    # Retrain with other settings, killed while fold 1 trains.
    real, calls = trainer.train_fold, []

    def killed_in_fold_1(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill in fold 1")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_fold", killed_in_fold_1)
    retrain = small_config(epochs=3, bootstrap=20)
    with pytest.raises(KeyboardInterrupt):
        run_train(manifest, retrain, run_dir, progress=False)
    monkeypatch.undo()
    assert calls == ["c1 fold 0", "c1 fold 1"]
    assert not (model_dir / "metrics.json").exists() and not (model_dir / "predictions.csv").exists()
    first_ids = {m["training_run_id"] for m in first_metas}
    assert len(first_ids) == 1 and None not in first_ids and first_metrics["training_run_id"] in first_ids
    ids = [m["training_run_id"] for m in _fold_metas(model_dir)]
    assert ids[0] not in first_ids and ids[1:] == [next(iter(first_ids))] * 2

    fix = f"retrain: wsi-pipeline train --manifest MANIFEST --features {run_dir} --model abmil --cohort c1"
    with pytest.raises(PipelineError) as refused:
        load_ensemble(model_dir)
    message = str(refused.value)
    assert "different training runs" in message and message.endswith(fix) and "\n" not in message
    predict = ["predict", "--manifest", str(manifest_path), "--run", str(run_dir), "--model-dir",
               str(model_dir), "--out", str(tmp_path / "p.csv"), "--no-progress"]
    assert main(predict) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n" and not (tmp_path / "p.csv").exists()

    # The rerun completes it: fold 0 reused (weights kept, adopted by the new run), 1 and 2 trained.
    weights0 = (model_dir / "fold_0" / "model.safetensors").stat().st_mtime_ns
    again = run_train(manifest, retrain, run_dir, progress=False)["c1"]
    assert again["folds_skipped"] == [0] and again["folds_trained"] == [1, 2]
    (final_id,) = {m["training_run_id"] for m in _fold_metas(model_dir)}
    assert final_id not in (ids[0], *first_ids)
    assert (model_dir / "fold_0" / "model.safetensors").stat().st_mtime_ns == weights0
    assert json.loads((model_dir / "metrics.json").read_text())["training_run_id"] == final_id
    assert main(predict) == 0 and (tmp_path / "p.csv").is_file()

    # A rerun with nothing to do keeps the run (no rewrite of any fold, metrics kept).
    before = {p: p.stat().st_mtime_ns for p in model_dir.glob("fold_*/*")}
    again = run_train(manifest, retrain, run_dir, progress=False)["c1"]
    assert again["folds_trained"] == [] and {p: p.stat().st_mtime_ns for p in before} == before


def test_ensemble_missing_a_fold_of_splits_json_is_refused(tmp_path):
    from tests.training.test_checkpoints_inference import meta
    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.training.checkpoints import load_ensemble, save_fold_model

    model_dir = tmp_path / "run" / "mil" / "abmil" / "c1"
    for k in (0, 2):
        save_fold_model(create_aggregator("abmil", 16, 2, hidden_dim=8, attention_dim=4),
                        model_dir / f"fold_{k}", meta(fold=k, training_run_id="r1", test_slide_ids=[f"s{k}"]))
    (model_dir / "splits.json").write_text(json.dumps(
        {"folds": [{"fold": k, "train": [], "val": [], "test": [f"s{k}"]} for k in range(3)]}))
    with pytest.raises(PipelineError, match=r"fold_1 missing \(splits.json has 3 folds.*--cohort c1$"):
        load_ensemble(model_dir)
    save_fold_model(create_aggregator("abmil", 16, 2, hidden_dim=8, attention_dim=4),
                    model_dir / "fold_1", meta(fold=1, training_run_id="r1", test_slide_ids=["s9"]))
    with pytest.raises(PipelineError, match="fold_1 was trained on another split"):
        load_ensemble(model_dir)
    save_fold_model(create_aggregator("abmil", 16, 2, hidden_dim=8, attention_dim=4),
                    model_dir / "fold_1", meta(fold=1, training_run_id="r1", test_slide_ids=["s1"]))
    assert len(load_ensemble(model_dir)) == 3


@pytest.mark.parametrize("run_ids", [("r1", "r2"), ("r1", None)])
def test_heatmap_refuses_a_mixed_ensemble_and_uses_a_consistent_one(tmp_path, make_slide, run_ids):
    import stages.heatmap as heatmap_stage
    from tests.exports.conftest import tissue_grid
    from wsi_pipeline.features.features_h5 import write_features_h5
    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.run.config import load_config
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.manifest import load_manifest
    from wsi_pipeline.training.checkpoints import save_fold_model, stamp_training_run

    slide = make_slide("heatmap_lesion", positive=True, seed=3)
    run = RunFolder(tmp_path / "run")
    coords = tissue_grid(slide)[:12]
    features = np.random.default_rng(0).normal(size=(len(coords), 8)).astype(np.float32)
    write_features_h5(run.features_h5("enc", "A"), features, coords,
                      {"encoder": "enc", "out_dim": 8, "config_hash": "t", "patch_size": 64,
                       "patch_size_level0": 128, "level0_width": 2048, "level0_height": 1536})
    model_dir = run.mil_dir("abmil", "demo")
    for k, run_id in enumerate(run_ids):
        meta = {"model": "abmil", "in_dim": 8, "n_classes": 2, "classes": ["normal", "tumor"],
                "model_args": {"hidden_dim": 8, "attention_dim": 4}, "cohort": "demo", "fold": k}
        if run_id:
            meta["training_run_id"] = run_id
        save_fold_model(create_aggregator("abmil", 8, 2, hidden_dim=8, attention_dim=4), model_dir / f"fold_{k}", meta)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_id,path,patient_id,label,cohort\nA,{slide},P1,tumor,demo\n")
    cfg = load_config(None)
    cfg = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, encoder="enc"),
                              heatmap=dataclasses.replace(cfg.heatmap, exports=["geojson"]))
    report = heatmap_stage.run_heatmap(load_manifest(manifest), cfg, run.root, model="abmil", progress=False)
    assert list(report.failed) == ["A"] and not report.done
    assert "different training runs" in report.failed["A"]
    assert report.failed["A"].endswith(f"--features {run.root} --model abmil --cohort demo")
    assert not (run.heatmaps_dir("abmil") / "A.geojson").exists()

    for k in range(len(run_ids)):
        stamp_training_run(model_dir / f"fold_{k}", "r1")
    report = heatmap_stage.run_heatmap(load_manifest(manifest), cfg, run.root, model="abmil", progress=False)
    assert report.done == ["A"], report.failed

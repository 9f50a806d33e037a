"""The detect stage end to end on a tiny demo cohort: train-detector -> detect -> eval-detect,
resumable per slide, one bad slide reported while the others finish."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from wsi_pipeline.cli import main

CONFIG = {"detect": {"train": {"work_mpp": 4.0, "epochs": 1, "steps_per_epoch": 1, "crop_px": 32, "batch_size": 2,
                               "val_crops": 2, "model_args": {"dims": [8, 8], "depths": [1, 1], "d_state": 4}},
                     "tile_px": 64, "min_score": 0.05}}


@pytest.fixture(scope="module")
def trained(demo_cohort, tmp_path_factory):
    run = tmp_path_factory.mktemp("detect_run")
    cfg = run.parent / f"{run.name}.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    common = ["--manifest", str(demo_cohort), "--run", str(run), "--config", str(cfg)]
    assert main(["train-detector", *common, "--slides", "DEMO-000,DEMO-001", "--val-slides", "DEMO-002"]) == 0
    return run, common


def test_train_detect_eval_and_resume(trained, capsys):
    run, common = trained
    out = run / "detect" / "mamba_centernet_tiny"
    ckpt = json.loads((out / "model" / "config.json").read_text())
    assert ckpt["train_slides"] == ["DEMO-000", "DEMO-001"] and ckpt["val_slides"] == ["DEMO-002"]
    assert (out / "model" / "model.safetensors").is_file()
    assert main(["detect", *common, "--slides", "DEMO-002,DEMO-003", "--no-progress"]) == 0
    for suffix in ("candidates.csv", "csv", "geojson", "midog.json", "summary.json", "done.json",
                   "mitosis.density.png", "mitosis.density.tif"):
        assert (out / f"DEMO-003.{suffix}").is_file()
    summary = json.loads((out / "DEMO-003.summary.json").read_text())
    assert summary["tissue_area_mm2"] > 0 and set(summary["counts"]) == set(ckpt["classes"])
    candidates_mtime = (out / "DEMO-003.candidates.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["detect", *common, "--slides", "DEMO-002,DEMO-003", "--no-progress"]) == 0
    assert "0 done, 2 already complete" in capsys.readouterr().out
    # test slides used in training are refused; overlapping val/test too
    assert main(["eval-detect", *common, "--val-slides", "DEMO-002", "--test-slides", "DEMO-001"]) == 2
    assert main(["eval-detect", *common, "--val-slides", "DEMO-002", "--test-slides", "DEMO-002"]) == 2
    assert main(["eval-detect", *common, "--val-slides", "DEMO-002", "--test-slides", "DEMO-003"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["test_slides"] == ["DEMO-003"] and set(result["test"]["classes"]) == set(ckpt["classes"])
    thresholds = json.loads((out / "thresholds.json").read_text())
    # new thresholds: outputs are rewritten from the candidates, inference is not redone
    assert main(["detect", *common, "--slides", "DEMO-003", "--no-progress"]) == 0
    assert (out / "DEMO-003.candidates.csv").stat().st_mtime_ns == candidates_mtime
    assert json.loads((out / "DEMO-003.summary.json").read_text())["thresholds"] == thresholds
    assert not list(out.glob("*.tmp-*"))


def test_bad_slide_is_reported_and_others_finish(trained, demo_cohort, tmp_path):
    run, common = trained
    manifest = tmp_path / "m.csv"
    text = demo_cohort.read_text().replace("slides/DEMO-000.svs", str(tmp_path / "missing.svs"))
    manifest.write_text(text.replace("slides/", str(demo_cohort.parent / "slides") + "/"))
    args = ["--manifest", str(manifest), *common[2:]]
    assert main(["detect", *args, "--slides", "DEMO-000,DEMO-001", "--no-progress"]) == 1
    failures = (run / "failures.csv").read_text()
    assert "DEMO-000" in failures and "missing.svs" in failures
    assert (run / "detect" / "mamba_centernet_tiny" / "DEMO-001.done.json").is_file()
    assert not (run / "detect" / "mamba_centernet_tiny" / "DEMO-000.done.json").exists()


def test_unsafe_model_name_is_refused(trained):
    run, common = trained
    assert main(["detect", *common, "--model", "../x", "--no-progress"]) == 2


def test_fine_tuning_starts_from_the_parent_and_inherits_its_slides(trained, demo_cohort, tmp_path, capsys):
    run, common = trained
    parent = run / "detect" / "mamba_centernet_tiny" / "model"
    cfg = tmp_path / "ft.yaml"
    ft = json.loads(json.dumps(CONFIG))
    ft["detect"]["train"].update({"init_from": str(parent), "steps_per_epoch": 1, "lr": 1e-9})
    cfg.write_text(yaml.safe_dump(ft))
    args = ["--manifest", str(demo_cohort), "--run", str(run), "--config", str(cfg), "--model", "ft"]
    assert main(["train-detector", *args, "--slides", "DEMO-001", "--val-slides", "DEMO-000"]) == 0
    child = json.loads((run / "detect" / "ft" / "model" / "config.json").read_text())
    assert child["init_from"]["train_slides"] == ["DEMO-000", "DEMO-001"]
    # lr ~0: the weights are the parent's (a random start would differ everywhere)
    from safetensors.torch import load_file
    a = load_file(str(parent / "model.safetensors"))
    b = load_file(str(run / "detect" / "ft" / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert main(["detect", *args, "--slides", "DEMO-000,DEMO-002,DEMO-003", "--no-progress"]) == 0
    # DEMO-002 validated the parent (never seen by the child itself): refused as a test slide, though
    # its detections exist
    assert main(["eval-detect", *args, "--val-slides", "DEMO-000", "--test-slides", "DEMO-002"]) == 2
    assert main(["eval-detect", *args, "--val-slides", "DEMO-000", "--test-slides", "DEMO-003"]) == 0
    # a checkpoint of another shape is refused with the field named
    bad = json.loads(json.dumps(ft))
    bad["detect"]["train"]["model_args"] = {"dims": [8, 16], "depths": [1, 1], "d_state": 4}
    cfg.write_text(yaml.safe_dump(bad))
    capsys.readouterr()
    assert main(["train-detector", *args, "--slides", "DEMO-001", "--val-slides", "DEMO-000"]) == 2
    assert "detect.train.init_from" in capsys.readouterr().err

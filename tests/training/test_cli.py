"""`wsi-pipeline train` and `wsi-pipeline predict` through the CLI entry point."""

from __future__ import annotations

import csv

import yaml

from wsi_pipeline.cli import main
from wsi_pipeline.run.config import load_config
from wsi_pipeline.run.folder import RunFolder

from .conftest import ENCODER


def write_config(path):
    path.write_text(yaml.safe_dump({
        "extract": {"encoder": ENCODER},
        "train": {"model": "mean", "model_args": {"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0},
                  "lr": 5e-3, "bootstrap": 100, "device": "cpu", "epochs": 20},
    }))
    load_config(path)  # valid
    return path


def test_train_then_predict(cohort, tmp_path, capsys):
    run_dir, manifest_path = cohort
    config = write_config(tmp_path / "cfg.yaml")
    code = main(["train", "--manifest", str(manifest_path), "--features", str(run_dir), "--config", str(config),
                 "--model", "abmil", "--folds", "2", "--epochs", "3", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "abmil / c1: pooled CV AUC" in out.out and "95% CI" in out.out
    model_dir = RunFolder(run_dir).mil_dir("abmil", "c1")
    for name in ("splits.json", "predictions.csv", "metrics.json", "fold_0/model.safetensors",
                 "fold_1/config.json"):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "fold_2").exists()  # --folds 2 applied

    out_csv = tmp_path / "pred" / "external.csv"
    code = main(["predict", "--manifest", str(manifest_path), "--run", str(run_dir), "--model-dir",
                 str(model_dir), "--out", str(out_csv), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "prob_neg", "prob_pos", "predicted"]
    assert len(rows) == 18
    for row in rows:
        probs = {"neg": float(row["prob_neg"]), "pos": float(row["prob_pos"])}
        assert row["predicted"] == max(probs, key=probs.get)

    # A slide without features is reported and skipped; the others are still written; exit 1.
    RunFolder(run_dir).features_h5(ENCODER, "c1-P00-S0").unlink()
    code = main(["predict", "--manifest", str(manifest_path), "--run", str(run_dir), "--model-dir",
                 str(model_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "1 slide(s) skipped" in err and "c1-P00-S0" in err
    with open(model_dir / "predictions_manifest.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 17


def test_train_out_alias_and_errors(cohort, tmp_path, capsys):
    run_dir, manifest_path = cohort
    config = write_config(tmp_path / "cfg.yaml")
    other = tmp_path / "elsewhere"
    code = main(["train", "--manifest", str(manifest_path), "--features", str(run_dir), "--out", str(other),
                 "--config", str(config), "--model", "abmil", "--folds", "2", "--epochs", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (other / "mil" / "abmil" / "c1" / "metrics.json").is_file() and not (run_dir / "mil").exists()

    code = main(["train", "--manifest", str(manifest_path), "--features", str(run_dir), "--config", str(config),
                 "--model", "no_such_mil", "--no-progress"])
    assert code == 2 and "unknown MIL aggregator 'no_such_mil'" in capsys.readouterr().err
    code = main(["train", "--manifest", str(manifest_path), "--features", str(run_dir), "--folds", "1"])
    assert code == 2 and "train.folds: must be >= 2" in capsys.readouterr().err
    code = main(["predict", "--manifest", str(manifest_path), "--run", str(run_dir), "--model-dir",
                 str(tmp_path / "missing")])
    assert code == 2 and "model folder not found" in capsys.readouterr().err


def test_exclude_slides_trains_without_a_slide_that_has_no_features(cohort, tmp_path, capsys):
    run_dir, manifest_path = cohort
    config = write_config(tmp_path / "cfg.yaml")
    RunFolder(run_dir).features_h5(ENCODER, "c1-P00-S0").unlink()
    base = ["train", "--manifest", str(manifest_path), "--features", str(run_dir), "--config", str(config),
            "--model", "abmil", "--folds", "2", "--epochs", "2", "--no-progress"]
    assert main(base) == 2
    assert "c1-P00-S0" in capsys.readouterr().err          # named before any training
    # A typo in the list is an error, not a silent no-op.
    assert main(base + ["--exclude-slides", "c1-P99-S9"]) == 2
    assert "'c1-P99-S9' (to leave out) not in manifest" in capsys.readouterr().err
    assert main(base + ["--exclude-slides", "c1-P00-S0"]) == 0
    with open(RunFolder(run_dir).mil_dir("abmil", "c1") / "predictions.csv", newline="") as fh:
        slides = {r["slide_id"] for r in csv.DictReader(fh)}
    assert len(slides) == 17 and "c1-P00-S0" not in slides

"""Every artefact says what it was made from and every consumer checks it (issue 24, item 1).

Fold models record their training features' provenance (encoder, version, weights sha256, µm/px,
patch size, coord_dims, modality); predict / heatmap / segment refuse features made otherwise, or
from another file than the manifest's, with one line naming both sides (exit 2, nothing written),
all through `wsi_pipeline.features.provenance`. detect records the slide file's identity and redoes a
replaced slide; eval-detect refuses candidates of another detector checkpoint.

Inputs are real files made here: features.h5 written with the extractor's attrs, models trained by
the train stage on them (tiny abmil / mambamil_3d, 2 folds, 2 epochs), demo slides for detection.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from wsi_pipeline.cli import main
from wsi_pipeline.features.features_h5 import write_features_h5
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.slides.identity import slide_identity

ENCODER, OTHER_ENCODER, DIM = "test_encoder", "other_encoder", 16
WEIGHTS = hashlib.sha256(b"the training encoder's weights").hexdigest()
OTHER_WEIGHTS = hashlib.sha256(b"other weights").hexdigest()
SLIDE = {"encoder": ENCODER, "weights_sha256": WEIGHTS, "encoder_version": 1, "target_mpp": 0.5, "patch_size": 224}
CT = {"encoder": ENCODER, "weights_sha256": WEIGHTS, "encoder_version": 1, "modality": "CT", "patch_size": 32,
      "patch_size_vox": 32, "target_spacing_mm": 1.5, "instance_config_hash": "0123456789abcdef"}
TINY = {"folds": 2, "epochs": 2, "patience": 2, "bootstrap": 10}
SLIDE_MODEL_ARGS = {"hidden_dim": 16, "attention_dim": 8, "dropout": 0.0}


def write_features(run_dir, slide_id: str, source, *, rng, positive=False, coord_dims=2, encoder=ENCODER, **made):
    """features.h5 of `slide_id` as extract writes it: the settings in `made` (SLIDE's by default,
    or CT's for coord_dims 3) and the identity of the `source` file."""
    settings = {**(SLIDE if coord_dims == 2 else CT), "encoder": encoder, **made}
    n = int(rng.integers(16, 25))
    features = rng.normal(size=(n, DIM)).astype(np.float32)
    if positive:
        features[:4, 0] += 5.0
    coords = np.zeros((n, coord_dims), dtype=np.int64)
    coords[:, 0] = np.arange(n) * 224
    attrs = {**settings, "out_dim": DIM, "slide_id": slide_id,
             "config_hash": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16],
             **slide_identity(source, [(2048, 1536)] if coord_dims == 2 else []).to_attrs()}
    write_features_h5(RunFolder(run_dir).features_h5(encoder, slide_id), features, coords, attrs)


def write_manifest(path, rows, modality: str = ""):
    lines = ["slide_id,path,patient_id,label,cohort,modality"]
    lines += [f"{sid},{file},{patient},{label},c1,{modality}" for sid, file, patient, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_cohort(root, *, model, model_args, coord_dims=2, modality="", first_file=None):
    """6 patients (one slide each, 3 per class), features written with the default settings, trained
    by the train stage -> (run_dir, model_dir, {slide_id: file})."""
    from stages.train import run_train
    from tests.training.conftest import small_config
    from wsi_pipeline.run.manifest import load_manifest

    rng = np.random.default_rng(0)
    run_dir, rows, files = root / "run", [], {}
    (root / "files").mkdir()
    for p in range(6):
        sid = f"c1-P{p:02d}-S0"
        file = root / "files" / f"{sid}.{'svs' if coord_dims == 2 else 'nii.gz'}"
        if p == 0 and first_file is not None:
            shutil.copyfile(first_file, file)
        else:
            file.write_bytes(rng.integers(0, 256, 4096 + p, dtype=np.uint8).tobytes())
        write_features(run_dir, sid, file, rng=rng, positive=p % 2 == 1, coord_dims=coord_dims)
        rows.append((sid, file, f"P{p:02d}", ("neg", "pos")[p % 2]))
        files[sid] = file
    manifest = load_manifest(write_manifest(root / "train.csv", rows, modality), require_labels=True)
    cfg = small_config(model=model, model_args=model_args, **TINY)
    report = run_train(manifest, cfg, run_dir, progress=False)
    assert report.ok, report.failed
    return run_dir, RunFolder(run_dir).mil_dir(model, "c1"), files


@pytest.fixture(scope="module")
def slide_model(tmp_path_factory, make_slide):
    """A tiny abmil trained on slide features (0.5 µm/px, 224 px, encoder test_encoder, WEIGHTS);
    slide c1-P00-S0's file is a real demo slide (A), and B is another scan of the same size."""
    root = tmp_path_factory.mktemp("provenance_slides")
    small = {"width_px": 512, "height_px": 384}
    a, b = make_slide("provenance_a", seed=11, **small), make_slide("provenance_b", seed=12, positive=True, **small)
    run_dir, model_dir, files = train_cohort(root, model="abmil", first_file=a, model_args=SLIDE_MODEL_ARGS)
    return {"run": run_dir, "model_dir": model_dir, "files": files, "other_scan": b}


def new_run(tmp_path, n=2, **made):
    """A run folder with features of n new slides (files made here), written with `made` settings."""
    rng = np.random.default_rng(5)
    run, rows = tmp_path / "new_run", []
    (tmp_path / "new").mkdir()
    for i in range(n):
        file = tmp_path / "new" / f"N{i}.svs"
        file.write_bytes(rng.integers(0, 256, 5000 + i, dtype=np.uint8).tobytes())
        write_features(run, f"N{i}", file, rng=rng, **made)
        rows.append((f"N{i}", file, f"Q{i}", ""))
    return run, write_manifest(tmp_path / "new.csv", rows)


def _predict(capsys, manifest, run, model_dir, out):
    rc = main(["predict", "--manifest", str(manifest), "--run", str(run), "--model-dir", str(model_dir),
               "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.err


# -- what a fold records ---------------------------------------------------------------------------
def test_fold_config_records_the_training_features_provenance(slide_model):
    from wsi_pipeline.training.checkpoints import fold_dirs, read_fold_meta

    for fold in fold_dirs(slide_model["model_dir"]):
        recorded = read_fold_meta(fold)["training_features"]
        assert recorded == {"encoder": ENCODER, "encoder_version": 1, "weights_sha256": WEIGHTS, "target_mpp": 0.5,
                            "patch_size_px": 224, "target_spacing_mm": None, "instance_config_hash": None,
                            "coord_dims": 2, "modality": "slide"}


def test_folds_trained_before_the_record_get_it_when_a_rerun_reuses_them(slide_model, tmp_path):
    """An old fold (no training_features) is checked on its encoder name only; the train rerun that
    finds it current (same features hashes) adds the record without retraining."""
    from wsi_pipeline.training.checkpoints import META_FILE, fold_dirs, read_fold_meta

    run = tmp_path / "run"
    shutil.copytree(slide_model["run"], run)
    model_dir = RunFolder(run).mil_dir("abmil", "c1")
    weights = {}
    for fold in fold_dirs(model_dir):
        meta = read_fold_meta(fold)
        del meta["training_features"]
        (fold / META_FILE).write_text(json.dumps(meta))
        weights[fold.name] = (fold / "model.safetensors").read_bytes()
    from stages.train import run_train
    from tests.training.conftest import small_config
    from wsi_pipeline.run.manifest import load_manifest

    rows = [(sid, f, f"P{sid[4:6]}", ("neg", "pos")[int(sid[4:6]) % 2]) for sid, f in slide_model["files"].items()]
    manifest = load_manifest(write_manifest(tmp_path / "m.csv", rows), require_labels=True)
    cfg = small_config(model="abmil", model_args=SLIDE_MODEL_ARGS, **TINY)  # as the model was trained
    report = run_train(manifest, cfg, run, progress=False)
    assert report.ok and report["c1"]["folds_trained"] == [] and report["c1"]["folds_skipped"] == [0, 1]
    for fold in fold_dirs(model_dir):
        assert read_fold_meta(fold)["training_features"]["target_mpp"] == 0.5
        assert (fold / "model.safetensors").read_bytes() == weights[fold.name]


def test_train_refuses_a_cohort_whose_features_were_made_at_two_resolutions(slide_model, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(slide_model["run"] / "features", run / "features")
    rng = np.random.default_rng(3)
    write_features(run, "c1-P03-S0", slide_model["files"]["c1-P03-S0"], rng=rng, positive=True, target_mpp=1.0)
    rows = [(sid, f, f"P{sid[4:6]}", ("neg", "pos")[int(sid[4:6]) % 2]) for sid, f in slide_model["files"].items()]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    config = tmp_path / "c.yaml"
    config.write_text(f"extract:\n  encoder: {ENCODER}\n"
                      "train:\n  model: abmil\n  folds: 2\n  epochs: 1\n  device: cpu\n")
    rc = main(["train", "--manifest", str(manifest), "--features", str(run), "--config", str(config), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "features made differently" in err and "at 1.0 µm/px" in err and "at 0.5 µm/px" in err
    assert "c1-P03-S0" in err and not (run / "mil").exists()


# -- predict ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("made, differ, named", [
    ({"target_mpp": 1.0}, "µm/px differ", ("at 1.0 µm/px", "at 0.5 µm/px", "tiling.target_mpp 0.5")),
    ({"patch_size": 256}, "patch size differ", ("256 px", "224 px", "tiling.patch_size_px 224")),
    ({"weights_sha256": OTHER_WEIGHTS}, "weights differ", (OTHER_WEIGHTS[:12], WEIGHTS[:12])),
    ({"encoder_version": 2}, "encoder version differ", (f"encoder {ENCODER} v2", f"encoder {ENCODER} (weights")),
])
def test_predict_refuses_features_made_otherwise_than_the_training_features(slide_model, tmp_path, capsys,
                                                                          made, differ, named):
    run, manifest = new_run(tmp_path, **made)
    out = tmp_path / "p.csv"
    rc, err = _predict(capsys, manifest, run, slide_model["model_dir"], out)
    assert rc == 2 and not out.exists(), err
    assert "features of slide 'N0'" in err and "the model was trained on" in err and differ in err
    assert all(text in err for text in named), err


def test_predict_with_features_made_as_the_training_features_is_accepted(slide_model, tmp_path, capsys):
    run, manifest = new_run(tmp_path)
    out = tmp_path / "p.csv"
    rc, err = _predict(capsys, manifest, run, slide_model["model_dir"], out)
    assert rc == 0 and len(out.read_text().splitlines()) == 3, err


def test_predict_on_a_run_holding_only_another_encoders_features_names_the_encoder(slide_model, tmp_path, capsys):
    run, manifest = new_run(tmp_path, encoder=OTHER_ENCODER, weights_sha256=OTHER_WEIGHTS)
    out = tmp_path / "p.csv"
    rc, err = _predict(capsys, manifest, run, slide_model["model_dir"], out)
    assert rc == 2 and not out.exists(), err
    assert f"no features of encoder '{ENCODER}' (the model's)" in err and f"encoder {OTHER_ENCODER}" in err
    assert f"extract.encoder {ENCODER}" in err and "run the extract stage first" not in err


def test_predict_on_the_training_run_with_a_new_slide_under_a_training_slide_id_is_refused(slide_model, tmp_path,
                                                                                           capsys):
    """A new manifest reusing the id c1-P00-S0 for another scan (B) must not be scored from the
    training slide's (A's) features; the training manifest's own file is accepted."""
    new = write_manifest(tmp_path / "new.csv", [("c1-P00-S0", slide_model["other_scan"], "X1", "")])
    out = tmp_path / "p.csv"
    rc, err = _predict(capsys, new, slide_model["run"], slide_model["model_dir"], out)
    assert rc == 2 and not out.exists(), err
    assert "features of slide 'c1-P00-S0'" in err and "another file than the manifest's" in err
    assert str(slide_model["other_scan"]) in err and ("bytes" in err or "fingerprint differs" in err)
    same = write_manifest(tmp_path / "same.csv", [("c1-P00-S0", slide_model["files"]["c1-P00-S0"], "P00", "")])
    assert _predict(capsys, same, slide_model["run"], slide_model["model_dir"], out)[0] == 0


def test_ct_model_refuses_he_slide_features(tmp_path_factory, tmp_path, capsys):
    """mambamil_3d takes 2-D coords too, so only the recorded modality / coord_dims stop it."""
    _, model_dir, _ = train_cohort(tmp_path_factory.mktemp("provenance_ct"), model="mambamil_3d", coord_dims=3,
                                   modality="CT", model_args={"d_model": 16, "d_state": 4, "expand": 1, "rate": 10})
    run, manifest = new_run(tmp_path)  # H&E slide features of the same encoder, weights and D
    out = tmp_path / "p.csv"
    rc, err = _predict(capsys, manifest, run, model_dir, out)
    assert rc == 2 and not out.exists(), err
    assert "2-D slide features" in err and "3-D CT volume features" in err and "modality differ" in err
    assert "a model trained on CT volume features cannot score whole-slide image features" in err


# -- heatmap and segment ---------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["heatmap", "segment"])
@pytest.mark.parametrize("case", ["resolution", "other_encoder_only"])
def test_heatmap_and_segment_refuse_features_the_model_cannot_use_and_write_nothing(slide_model, tmp_path, capsys,
                                                                                   stage, case):
    made = {"target_mpp": 1.0} if case == "resolution" else {"encoder": OTHER_ENCODER}
    run, manifest = new_run(tmp_path, **made)
    rc = main([stage, "--manifest", str(manifest), "--run", str(run), "--model-dir", str(slide_model["model_dir"]),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{stage}: 2 slide(s) have features the model cannot use, nothing was written" in err
    if case == "resolution":
        assert "at 1.0 µm/px" in err and "trained on encoder" in err and "at 0.5 µm/px" in err
    else:
        assert f"no features of encoder '{ENCODER}'" in err and "run the extract stage first" not in err
    assert not (run / "heatmaps").exists() and not (run / "segment").exists() and not (run / "failures.csv").exists()


# -- detect and eval-detect ------------------------------------------------------------------------
DETECT_CONFIG = ("detect:\n  train:\n    work_mpp: 4.0\n    model_args: {dims: [8, 8], depths: [1, 1], d_state: 4}\n"
                 "  tile_px: 64\n  min_score: 0.05\n  density_classes: []\n")


def save_random_detector(run_dir, seed: int):
    """A detector checkpoint as train-detector writes it (tiny, random weights from `seed`)."""
    import torch

    from wsi_pipeline.detection.checkpoint import save_detector
    from wsi_pipeline.models.detect import create_detector

    classes = ["nucleus-normal", "nucleus-tumour", "mitosis"]
    args = {"dims": [8, 8], "depths": [1, 1], "d_state": 4}
    torch.manual_seed(seed)
    model = create_detector("mamba_centernet_tiny", n_classes=len(classes), **args)
    save_detector(RunFolder(run_dir).detect_dir("mamba_centernet_tiny") / "model", model, {
        "detector": "mamba_centernet_tiny", "model_args": args, "classes": classes, "work_mpp": 4.0,
        "sigma_um": 2.0, "params": {"rare_classes": ["mitosis"]}, "train_slides": [], "val_slides": []})


@pytest.fixture
def detect_inputs(demo_cohort, tmp_path):
    """Two demo slides (V, T) copied with their truth files, a manifest, config and a detector."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for new, demo in (("V", "DEMO-002"), ("T", "DEMO-003")):
        for f in (demo_cohort.parent / "slides").glob(f"{demo}.*"):
            shutil.copyfile(f, slides / f.name.replace(demo, new))
    manifest = write_manifest(tmp_path / "d.csv", [("V", slides / "V.svs", "PV", "a"),
                                                   ("T", slides / "T.svs", "PT", "b")])
    config = tmp_path / "d.yaml"
    config.write_text(DETECT_CONFIG)
    run = tmp_path / "run"
    save_random_detector(run, seed=0)
    common = ["--manifest", str(manifest), "--run", str(run), "--config", str(config)]
    return {"run": run, "slides": slides, "common": common}


def test_detect_redoes_a_slide_whose_file_was_replaced(detect_inputs, capsys):
    d = detect_inputs
    detect = ["detect", *d["common"], "--slides", "T", "--no-progress"]
    assert main(detect) == 0
    assert main(detect) == 0 and "0 done, 1 already complete" in capsys.readouterr().out
    shutil.copyfile(d["slides"] / "V.svs", d["slides"] / "T.svs")  # another scan at the same path
    assert main(detect) == 0 and "1 done, 0 already complete" in capsys.readouterr().out
    done = json.loads((d["run"] / "detect" / "mamba_centernet_tiny" / "T.done.json").read_text())
    from wsi_pipeline.slides.identity import file_fingerprint

    size = (d["slides"] / "V.svs").stat().st_size
    assert done["inference"]["slide_identity"] == {"size_bytes": size,
                                                   "fingerprint": file_fingerprint(d["slides"] / "V.svs", size)}


def test_eval_detect_refuses_candidates_of_another_detector_checkpoint(detect_inputs, capsys):
    from wsi_pipeline.detection.checkpoint import checkpoint_hash

    d = detect_inputs
    ckpt = d["run"] / "detect" / "mamba_centernet_tiny" / "model"
    evaluate = ["eval-detect", *d["common"], "--val-slides", "V", "--test-slides", "T"]
    assert main(["detect", *d["common"], "--no-progress"]) == 0
    assert main(evaluate) == 0
    eval_json = ckpt.parent / "eval.json"
    before, old_hash = eval_json.read_text(), checkpoint_hash(ckpt)
    save_random_detector(d["run"], seed=1)  # "retrained": the candidates are the old detector's
    capsys.readouterr()
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    new_hash = checkpoint_hash(ckpt)
    assert f"were made by checkpoint {old_hash}, but the checkpoint is now {new_hash}" in err and old_hash != new_hash
    assert "slide 'V'" in err and "slide 'T'" in err and "wsi-pipeline detect" in err
    assert eval_json.read_text() == before

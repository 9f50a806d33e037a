"""Issue 24, items 2 and 3: annotations are all-or-error, exports are complete or fail.

Annotations: tiny generated slides (dark dots on white, tests/detect/conftest.py) with annotation
files in a `detect.annotations` folder; `train-detector` and `eval-detect` must accept or refuse
the same files, and refuse before any training. eval-detect runs on candidates written with the
detector's own CandidateWriter (no detector is trained here: the refusals come first, and the
metrics need only candidates and truth).

Exports: six tiny demo slides of three patients listed interleaved (P0 P1 P2 P0 P1 P2), tiled and
extracted once per module with the parameter-free `stain_texture` encoder, exported for STAMP and
read back with STAMP's own grouping (tests/interop/readers.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from wsi_pipeline.cli import main
from wsi_pipeline.detection import DEMO_CLASSES, read_annotations

from tests.detect.conftest import dot_image, write_slide

MODEL = "dd"
SIDE_PX = 128
# the smallest training config (the refusals must come before it is used)
TRAIN = {"work_mpp": 4.0, "epochs": 1, "steps_per_epoch": 1, "crop_px": 32, "batch_size": 2, "val_crops": 2,
         "model_args": {"dims": [8, 8], "depths": [1, 1], "d_state": 4}}
DOTS = [(30.0, 30.0), (90.0, 40.0), (60.0, 100.0)]


def _write_rows(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three 128 × 128 px slides (0.5 µm/px) of patients PA, PA, PB."""
    folder = tmp_path_factory.mktemp("annot_slides")
    paths = {}
    for i, sid in enumerate(("S1", "S2", "S3")):
        rgb = dot_image(SIDE_PX, SIDE_PX, DOTS)
        rgb[-1, -1] = 240 - i  # one corner pixel apart: three images, not one image under three ids
        paths[sid] = write_slide(folder / f"{sid}.tiff", rgb)
    return paths


def _setup(tmp_path, slides, annotations: dict, patients=("PA", "PA", "PB")):
    """A manifest of the three slides, an annotations folder holding `annotations` (name -> text)
    and a config pointing at it; returns the CLI's common arguments and the run folder."""
    manifest = _write_rows(tmp_path / "m.csv", ["slide_id", "path", "patient_id", "label", "cohort"],
                           [[sid, path, p, "x", "c"] for (sid, path), p in zip(slides.items(), patients)])
    folder = tmp_path / "annotations"
    folder.mkdir()
    for name, text in annotations.items():
        (folder / name).write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"detect": {"annotations": str(folder), "train": TRAIN}}))
    run = tmp_path / "run"
    return ["--manifest", str(manifest), "--run", str(run), "--config", str(cfg), "--model", MODEL], run


def _good(sid):
    return f"{sid}.csv", "x,y,class\n" + "".join(f"{x},{y},nucleus-normal\n" for x, y in DOTS)


def _fake_detector(run, train_slides, candidates: dict):
    """What eval-detect reads of a detector: its config.json and weights, and per slide candidates.csv
    written by the detect stage's own writer, with the done.json naming the checkpoint they came from.
    candidates: slide_id -> [(x, y, class, score)]."""
    # imported here: importing detection.outputs at collection binds the package attribute `hotspot`
    # to the submodule, shadowing the lazily exported function tests/detect/test_core.py imports
    import torch
    from safetensors.torch import save_file

    from wsi_pipeline.detection.checkpoint import checkpoint_hash
    from wsi_pipeline.detection.outputs import CandidateWriter

    out = run / "detect" / MODEL
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text(json.dumps({"classes": list(DEMO_CLASSES),
                                                            "train_slides": train_slides, "val_slides": []}))
    save_file({"w": torch.zeros(1)}, str(out / "model" / "model.safetensors"))
    ckpt = checkpoint_hash(out / "model")
    for sid, rows in candidates.items():
        (out / f"{sid}.done.json").write_text(json.dumps({"inference": {"checkpoint": ckpt}}))
        writer = CandidateWriter(out / f"{sid}.candidates.csv", DEMO_CLASSES)
        writer(np.array([r[:2] for r in rows]).reshape(-1, 2), np.array([r[3] for r in rows]),
               np.array([DEMO_CLASSES.index(r[2]) for r in rows]))
        writer.commit()
    return out


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


# -- annotations ---------------------------------------------------------------------------------
def test_point_outside_the_slide_is_refused_by_train_detector_as_by_eval_detect(tmp_path, slides, capsys):
    files = dict(_good(s) for s in ("S1", "S3"))
    files["S2.csv"] = "x,y,class\n30,30,nucleus-normal\n400,20,mitosis\n"     # 400 >= 128 px
    common, run = _setup(tmp_path, slides, files)
    assert main(["train-detector", *common, "--val-slides", "S3"]) == 2
    train_err = _one_error_line(capsys)
    assert "S2.csv: row 3: point (400, 20) is outside the slide 128x128 px" in train_err
    assert not run.exists()                                                     # nothing written
    _fake_detector(run, [], {s: [(30, 30, "nucleus-normal", 0.9)] for s in ("S1", "S2", "S3")})
    assert main(["eval-detect", *common, "--val-slides", "S1", "--test-slides", "S2"]) == 2
    assert _one_error_line(capsys).split(": ", 1)[1] == train_err.split(": ", 1)[1]    # the same message
    assert not (run / "config.yaml").exists() and not (run / "detect" / MODEL / "eval.json").exists()


def test_coco_boxes_under_an_unlisted_image_id_are_an_error_not_an_object_free_slide(tmp_path, slides, capsys):
    coco = {"images": [{"id": 1, "file_name": "S2.tiff"}], "categories": [{"id": 1, "name": "mitosis"}],
            "annotations": [{"image_id": 2, "category_id": 1, "bbox": [20, 20, 10, 10]}]}
    files = {**dict(_good(s) for s in ("S1", "S3")), "S2.json": json.dumps(coco)}
    common, run = _setup(tmp_path, slides, files)
    assert main(["train-detector", *common, "--val-slides", "S3"]) == 2
    assert "S2.json: annotation 0: image_id 2 is none of the file's images (ids 1)" in _one_error_line(capsys)
    assert not run.exists()


def test_an_annotation_file_matching_no_slide_is_an_error_naming_it(tmp_path, slides, capsys):
    files = {**dict(_good(s) for s in ("S1", "S2", "S3")), "S4.csv": _good("S4")[1]}   # S4: no such slide
    common, run = _setup(tmp_path, slides, files)
    assert main(["train-detector", *common, "--val-slides", "S3"]) == 2
    assert "S4.csv: matches no slide_id of the manifest" in _one_error_line(capsys)
    assert not run.exists()
    _fake_detector(run, [], {s: [(30, 30, "nucleus-normal", 0.9)] for s in ("S1", "S2", "S3")})
    assert main(["eval-detect", *common, "--val-slides", "S1", "--test-slides", "S2"]) == 2
    assert "S4.csv: matches no slide_id of the manifest" in _one_error_line(capsys)


def test_a_class_without_truth_objects_is_undefined_not_f1_1(tmp_path, slides, capsys):
    """No mitosis in the truth and none predicted: tp 0 fp 0 fn 0 is no evidence of anything."""
    common, run = _setup(tmp_path, slides, dict(_good(s) for s in ("S1", "S2", "S3")))
    out = _fake_detector(run, [], {s: [(x + 1, y, "nucleus-normal", 0.9) for x, y in DOTS] for s in ("S1", "S2")})
    assert main(["eval-detect", *common, "--val-slides", "S1", "--test-slides", "S2"]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())["test"]["classes"]
    assert result["mitosis"] == {"tp": 0, "fp": 0, "fn": 0, "precision": None, "recall": None, "f1": None}
    assert result["nucleus-normal"]["f1"] == 1.0 and result["nucleus-normal"]["tp"] == 3
    assert "test mitosis          F1 undefined (no truth objects)" in text
    assert "F1 1.000  P 1.000  R 1.000" in text                      # nucleus-normal: a real 1.0
    assert "F1 1.000  P 0.000" not in text


def test_bom_and_crlf_annotation_csv_reads_like_the_manifest(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfx,y,class\r\n10,20,mitosis\r\n30,40,nucleus-tumour\r\n")
    pts = read_annotations(path, list(DEMO_CLASSES), slide_wh=(100, 100))
    assert pts.xy.tolist() == [[10, 20], [30, 40]] and pts.cls.tolist() == [2, 1]
    geo = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point",
           "coordinates": [5, 6]}, "properties": {"classification": {"name": "mitosis"}}}]}
    (tmp_path / "bom.geojson").write_bytes(b"\xef\xbb\xbf" + json.dumps(geo).encode())
    assert read_annotations(tmp_path / "bom.geojson", list(DEMO_CLASSES)).xy.tolist() == [[5, 6]]


def test_one_patient_train_detector_is_one_error_line_exit_2(tmp_path, slides, capsys):
    common, run = _setup(tmp_path, slides, dict(_good(s) for s in ("S1", "S2", "S3")), patients=("PA",) * 3)
    assert main(["train-detector", *common]) == 2
    assert "needs slides of >= 2 patients" in _one_error_line(capsys)
    assert not run.exists()


# -- exports -------------------------------------------------------------------------------------
EXPORT_SLIDES = [f"S{i}" for i in range(6)]
EXPORT_PATIENTS = ["P0", "P1", "P2"] * 2          # each patient's two slides apart in the manifest


@pytest.fixture(scope="module")
def export_run(tmp_path_factory):
    """Six 512 × 384 px demo slides at 1 µm/px, tiled at 2 µm/px (32 px patches) and extracted with stain_texture;
    returns (manifest, config, run folder)."""
    from stages.extract import EXTRACT
    from stages.tile import TILE
    from wsi_pipeline.demo.slides import DemoSlideSpec, write_demo_slide
    from wsi_pipeline.run.config import load_config
    from wsi_pipeline.run.manifest import load_manifest

    folder = tmp_path_factory.mktemp("export_run")
    rows = []
    for i, (sid, patient) in enumerate(zip(EXPORT_SLIDES, EXPORT_PATIENTS)):
        path = folder / f"{sid}.svs"
        write_demo_slide(path, DemoSlideSpec(width_px=512, height_px=384, mpp=1.0, seed=i, n_lesions=1))
        rows.append([sid, path, patient, "tumor" if patient == "P0" else "normal", "demo"])
    manifest = _write_rows(folder / "manifest.csv", ["slide_id", "path", "patient_id", "label", "cohort"], rows)
    config = folder / "config.yaml"
    config.write_text("tiling:\n  target_mpp: 2.0\n  patch_size_px: 32\n"
                      "extract:\n  encoder: stain_texture\n  checkpoint: none\n  num_workers: 0\n")
    cfg, m, run = load_config(config), load_manifest(manifest), folder / "run"
    assert TILE.run(m, cfg, run, progress=False).ok and EXTRACT.run(m, cfg, run, progress=False).ok
    return manifest, config, run


def _export(export_run, to, out, *extra):
    manifest, config, run = export_run
    return main(["export", "--to", to, "--manifest", str(manifest), "--run", str(run), "--out", str(out),
                 "--config", str(config), "--no-progress", *extra])


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _stamp_slides(out) -> dict:
    """patient -> feature file names, as STAMP's own loader groups our tables (tests/interop/readers.py)."""
    from tests.interop.readers import stamp_patient_data

    data = stamp_patient_data(out / "clini.csv", out / "slide.csv", out / "features")
    return {p: sorted(f.name for f in files) for p, (_label, files) in data.items()}


def test_stamp_export_keeps_every_slide_of_a_patient_listed_apart(tmp_path, export_run):
    out = tmp_path / "stamp"
    assert _export(export_run, "stamp", out) == 0
    assert _stamp_slides(out) == {"P0": ["S0.h5", "S3.h5"], "P1": ["S1.h5", "S4.h5"], "P2": ["S2.h5", "S5.h5"]}


def test_export_refuses_a_folder_of_the_users_and_force_names_what_it_replaced(tmp_path, export_run, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "dataset.csv").write_text("case_id,slide_id,label\nmy,own,table\n")
    before = _tree(out)
    assert _export(export_run, "clam", out) == 2
    assert "holds files that are not a wsi-pipeline export (dataset.csv" in _one_error_line(capsys)
    assert _tree(out) == before                                                  # nothing written
    assert _export(export_run, "clam", out, "--force") == 0
    assert "replaced dataset.csv" in capsys.readouterr().err
    assert (out / "dataset.csv").read_text().count("\n") == 7                   # header + 6 slides


def test_export_refuses_an_earlier_export_of_another_kind(tmp_path, export_run, capsys):
    out = tmp_path / "both"
    assert _export(export_run, "stamp", out) == 0
    before = _tree(out)
    capsys.readouterr()
    assert _export(export_run, "clam", out) == 2
    assert "is an export for stamp of encoder 'stain_texture', not for clam" in _one_error_line(capsys)
    assert _tree(out) == before
    assert _export(export_run, "stamp", out) == 0                                # the same kind: fine


@pytest.mark.parametrize("to,table,column", [("stamp", "slide.csv", "FILENAME"), ("clam", "dataset.csv", "slide_id")])
def test_slides_subset_into_an_earlier_full_export_merges_into_the_tables(tmp_path, export_run, to, table, column):
    out = tmp_path / to
    assert _export(export_run, to, out) == 0
    assert _export(export_run, to, out, "--slides", "S3,S1") == 0
    with open(out / table, newline="") as fh:
        listed = sorted(r[column].removesuffix(".h5") for r in csv.DictReader(fh))
    assert listed == EXPORT_SLIDES                                               # not cut to S1, S3
    if to == "stamp":
        assert sum(len(v) for v in _stamp_slides(out).values()) == 6
    (out / ("features/S5.h5" if to == "stamp" else "h5_files/S5.h5")).unlink()  # a slide's file gone:
    assert _export(export_run, to, out, "--slides", "S0") == 0                  # no longer listed
    with open(out / table, newline="") as fh:
        assert sorted(r[column].removesuffix(".h5") for r in csv.DictReader(fh)) == EXPORT_SLIDES[:5]


@pytest.mark.parametrize("inside", ["mil/x", "exports/stamp", "heatmaps"])
def test_out_anywhere_inside_run_is_refused(export_run, capsys, inside):
    out = export_run[2] / inside
    assert _export(export_run, "stamp", out) == 2
    assert "is the run folder" in _one_error_line(capsys) and not out.exists()

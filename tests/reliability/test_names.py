"""Names that become paths (slide_id, cohort, encoder, model, segmenter) are safe: one rule
(wsi_pipeline.run.names), checked when the manifest/config is validated (exit 2, row and field named),
and again by the run folder, which refuses any path outside RUN."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError, ManifestError, UnsafePathError
from wsi_pipeline.run.config import Config, TrainConfig, config_from_dict
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import Manifest, SlideRecord, load_manifest
from wsi_pipeline.run.names import MAX_NAME_LEN, name_problem

HEADER = "slide_id,path,patient_id,label,cohort\n"
EVIL = ["../../../outside", "/abs/path", "a/b", "..", ".hidden", "-rf", "a b", "$(touch X)", "x;y",
        "a\n", "é", "x" * (MAX_NAME_LEN + 1), ""]


@pytest.mark.parametrize("name", ["A", "DEMO-001", "TCGA-AB-1234.01", "resnet50_trunc", "c1", "x" * MAX_NAME_LEN])
def test_safe_names_pass(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", EVIL)
def test_unsafe_names_are_refused(name):
    assert name_problem(name)


def _write(tmp_path, text, name="m.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_manifest_lists_every_unsafe_slide_id_and_cohort_and_validate_exits_2(tmp_path, capsys):
    long_id = "S" * 300  # used to crash a batch with "File name too long"
    manifest = _write(tmp_path, HEADER + "A,a.svs,P1,x,../../../outside\nB,b.svs,P2,x,/abs/path\n"
                      f"{long_id},c.svs,P3,x,c1\n.hidden,d.svs,P4,x,c1\nE,e.svs,P5,x,c1\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("row 1 (slide_id 'A'): cohort may hold only letters")
    assert "'../../../outside'" in problems[0]
    assert problems[1].startswith("row 2 (slide_id 'B'): cohort may hold only") and "'/abs/path'" in problems[1]
    assert problems[2].startswith("row 3 (slide_id 'SSSS") and "slide_id is 300 characters long" in problems[2]
    assert problems[3].startswith("row 4 (slide_id '.hidden'): slide_id may hold only")

    assert main(["validate-manifest", str(manifest), "--no-check-files"]) == 2
    err = capsys.readouterr().err
    assert "4 problem(s)" in err and "row 1" in err and "row 4" in err


def test_patient_id_and_label_are_free_text_because_they_never_become_paths(tmp_path):
    manifest = _write(tmp_path, HEADER + "A,a.svs,patient 1/../x,grade 2 (high),c1\n")
    (record,) = load_manifest(manifest)
    assert record.patient_id == "patient 1/../x" and record.label == "grade 2 (high)"


@pytest.mark.parametrize("section,key", [("extract", "encoder"), ("train", "model"), ("segment", "model")])
@pytest.mark.parametrize("value", ["../../x", "/abs/x", "$(touch X)", "m" * 129])
def test_config_refuses_unsafe_model_names_naming_the_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: "):
        config_from_dict({section: {key: value}})


@pytest.mark.parametrize("call", [
    lambda r: r.coords_h5("../x"), lambda r: r.tissue_geojson("/etc/x"), lambda r: r.qc_png("a/b"),
    lambda r: r.features_dir("../../x"), lambda r: r.features_h5("enc", "../../x"),
    lambda r: r.features_h5("/abs", "A"), lambda r: r.mil_dir("abmil", "../../../outside"),
    lambda r: r.mil_dir("abmil", "/abs/path"), lambda r: r.mil_dir("..", "c1"),
    lambda r: r.heatmaps_dir("../x"), lambda r: r.record_failure("../x", "A", "boom"),
    lambda r: r.coords_h5("S" * 300), lambda r: r.inside("a/../../b"), lambda r: r.inside("/etc/passwd"),
])
def test_run_folder_refuses_any_path_outside_run(tmp_path, call):
    run = RunFolder(tmp_path / "run")
    with pytest.raises(UnsafePathError):
        call(run)
    assert not (tmp_path / "run").exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_folder_paths_stay_as_before_for_safe_names(tmp_path):
    run = RunFolder(tmp_path)
    assert run.features_h5("resnet50_trunc", "A.1") == tmp_path / "features" / "resnet50_trunc" / "A.1.h5"
    assert run.mil_dir("abmil", "c1") == tmp_path / "mil" / "abmil" / "c1"
    assert run.inside(tmp_path / "tiles" / "A.coords.h5") == tmp_path / "tiles" / "A.coords.h5"


def test_segment_paths_refuse_names_that_leave_the_run_folder(tmp_path):
    run = RunFolder(tmp_path)
    assert run.segment_cams("A") == tmp_path / "segment" / "cams" / "A.npz"
    for call in (run.segment_cams, run.segment_tif, run.segment_geojson, run.segment_done):
        with pytest.raises(UnsafePathError):
            call("../../outside")


def test_train_with_a_traversal_cohort_writes_nothing_outside_run(tmp_path):
    """Defence in depth: a Manifest built in code (not loaded) with cohort ../../outside. Before,
    train wrote fold models and metrics there and deleted fold_k/ in it."""
    from stages.train import run_train
    from tests.training.conftest import ENCODER, planted_bag, write_bag

    run_dir = tmp_path / "a" / "b" / "run"
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        write_bag(run_dir, f"S{i}", planted_bag(rng, i % 2 == 1, 16))
        records.append(SlideRecord(f"S{i}", tmp_path / "x.svs", f"P{i}", ["neg", "pos"][i % 2],
                                   "../../outside", None, i + 1))
    manifest = Manifest(tmp_path / "m.csv", tuple(records))
    cfg = Config(extract=Config().extract.__class__(encoder=ENCODER),
                 train=TrainConfig(model="mean", folds=2, epochs=1, patience=1, bootstrap=0, device="cpu"))
    results = run_train(manifest, cfg, run_dir, progress=False)
    assert results["../../outside"]["status"] == "failed"
    assert "cohort" in results["../../outside"]["error"]
    assert not (tmp_path / "a" / "outside").exists() and not (run_dir / "mil").exists()


def test_extract_encoder_flag_cannot_leave_the_run_folder(tmp_path, capsys):
    """Before, `--encoder ../../x` created RUN/../x and deleted temp files in it."""
    run_dir = tmp_path / "a" / "run"
    manifest = _write(tmp_path, HEADER + "A,a.svs,P1,x,c1\n")
    code = main(["extract", "--manifest", str(manifest), "--out", str(run_dir), "--encoder", "../../x",
                 "--checkpoint", "random", "--no-progress"])
    assert code == 2
    assert "--encoder: may hold only" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.csv"]


@pytest.mark.parametrize("argv", [
    ["train", "--features", "{run}", "--model", "../../x"],
    ["train", "--features", "{run}", "--cohort", "../../../outside"],
    ["heatmap", "--run", "{run}", "--model", "../../x"],
    ["segment", "--run", "{run}", "--model", "/abs/x"],
])
def test_model_and_cohort_flags_refuse_unsafe_names(tmp_path, capsys, argv):
    run_dir = tmp_path / "run"
    manifest = _write(tmp_path, HEADER + "A,a.svs,P1,x,c1\nB,b.svs,P2,y,c1\n")
    argv = [a.replace("{run}", str(run_dir)) for a in argv] + ["--manifest", str(manifest), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "may hold only letters" in err and ("--model" in err or "--cohort" in err)
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()
    assert not run_dir.exists()


def test_demo_cohort_refuses_an_unsafe_cohort_name(tmp_path, capsys):
    assert main(["demo-cohort", str(tmp_path / "demo"), "--n", "1", "--cohorts", "ok,../x"]) == 2
    assert "--cohorts: may hold only" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_published_row_schema_states_the_same_name_rule():
    import json
    from pathlib import Path

    from wsi_pipeline.run.names import NAME_CHARS

    schema = json.loads((Path(__file__).resolve().parents[2] / "manifests" / "schema.json").read_text())
    for column in ("slide_id", "cohort"):
        spec = schema["properties"][column]
        assert spec["pattern"] == f"^{NAME_CHARS}$" and spec["maxLength"] == MAX_NAME_LEN


def test_extract_refuses_an_unknown_encoder_before_any_slide(tmp_path, capsys):
    """A safe but unknown encoder name: one clear error naming close matches, exit 2, nothing written
    (before, every slide failed with the same message, exit 1)."""
    run_dir = tmp_path / "run"
    manifest = _write(tmp_path, HEADER + "A,a.svs,P1,x,c1\n")
    assert main(["extract", "--manifest", str(manifest), "--out", str(run_dir), "--encoder", "resnet5O",
                 "--checkpoint", "random", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--encoder: unknown encoder 'resnet5O'" in err and "did you mean resnet50" in err
    assert not run_dir.exists()


def test_a_failure_of_an_unsafe_slide_id_is_recorded_inside_run(tmp_path):
    """The failure record of a slide whose id cannot be a file name still lands under RUN/failures/
    (its file name a digest), and failures.csv names the slide by its full id."""
    run = RunFolder(tmp_path / "run")
    run.record_failure("tile", "../../x", "boom")
    files = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].parts[:3] == ("run", "failures", "tile")
    assert [r["slide_id"] for r in run.failures()] == ["../../x"]

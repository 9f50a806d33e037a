"""Refused commands change nothing; one image under two ids is caught by file identity; model files
get the mode of other outputs; a pickle in place of a checkpoint is one line, exit 2; the opt-in CPU
scan kernel falls back on any build or load failure (issue 24, items 4, 6, 7)."""

from __future__ import annotations

import os
import pickle
import stat
import warnings
from pathlib import Path

import pytest

from wsi_pipeline.cli import main
from wsi_pipeline.run.config import Config, save_resolved_config
from wsi_pipeline.run.manifest import load_manifest

HEADER = "slide_id,path,patient_id,label,cohort"


@pytest.fixture(scope="module")
def slide_paths(demo_cohort):
    return [r.path for r in load_manifest(demo_cohort)]


def write_manifest(folder: Path, rows: list[str], name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def labelled_rows(paths, labels=("normal", "tumor", "normal", "tumor")) -> list[str]:
    return [f"S{i},{p},P{i},{label},demo" for i, (p, label) in enumerate(zip(paths, labels))]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return err


# -- item 4: a refused command changes nothing -------------------------------------------------------
def test_refused_train_for_a_bad_label_keeps_the_runs_train_record(tmp_path, slide_paths, capsys):
    run = tmp_path / "run"
    save_resolved_config(Config(), run, stage="train")          # the record of the real training
    before = snapshot(run)
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  classes: [normal, tumor]\n")
    manifest = write_manifest(tmp_path, labelled_rows(slide_paths, ("normal", "tumour", "normal", "tumor")))
    code = main(["train", "--manifest", str(manifest), "--features", str(run), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and "'S1'" in err and "'tumour'" in err and "row 2" in err
    assert snapshot(run) == before


def test_refused_detect_without_a_detector_keeps_config_yaml(tmp_path, slide_paths, capsys):
    run = tmp_path / "run"
    save_resolved_config(Config(), run)                          # RUN/config.yaml of the data stages
    before = snapshot(run)
    config = tmp_path / "c.yaml"
    config.write_text("extract:\n  encoder: resnet18\n")
    manifest = write_manifest(tmp_path, labelled_rows(slide_paths[:2]))
    code = main(["detect", "--manifest", str(manifest), "--run", str(run), "--config", str(config)])
    err = one_line_error(capsys)
    assert code == 2 and "no detector checkpoint" in err
    assert snapshot(run) == before


def test_misspelt_per_model_key_is_refused_by_train_as_by_run(tmp_path, slide_paths, capsys):
    from wsi_pipeline.errors import InputsError
    from wsi_pipeline.run.validation import validate_run_inputs

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  model: abmil\n  per_model:\n    abmill: {model_args: {dropout: 0.5}}\n")
    manifest = write_manifest(tmp_path, labelled_rows(slide_paths))
    run = tmp_path / "run"
    code = main(["train", "--manifest", str(manifest), "--features", str(run), "--config", str(config)])
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if "train.per_model" in l)
    assert code == 2 and "'abmill'" in line and "abmil" in line.split("did you mean")[-1]
    assert not run.exists()                                      # nothing created
    with pytest.raises(InputsError) as exc:                      # `run`'s check, the same function
        validate_run_inputs(manifest, config)
    assert line.strip().lstrip("- ") in [p for p in exc.value.problems]


def _code_pickle(marker: Path) -> bytes:
    """A pickle that would create `marker` when unpickled (what a malicious checkpoint does)."""
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    return pickle.dumps({"state_dict": Payload()})


def test_pickle_in_place_of_a_detector_checkpoint_is_one_line_exit_2(tmp_path, slide_paths, capsys):
    import json

    run, marker = tmp_path / "run", tmp_path / "unpickled"
    model = run / "detect" / "det" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"detector": "mamba_centernet_tiny", "classes": ["mitosis"],
                                                   "model_args": {}}))
    (model / "model.safetensors").write_bytes(_code_pickle(marker))
    before = snapshot(run)
    manifest = write_manifest(tmp_path, labelled_rows(slide_paths[:1]))
    code = main(["detect", "--manifest", str(manifest), "--run", str(run), "--model", "det"])
    err = one_line_error(capsys)
    assert code == 2 and "cannot be loaded" in err and "SafetensorError" in err
    assert snapshot(run) == before and not marker.exists()        # records unchanged, never unpickled


def test_pickle_in_place_of_a_mil_fold_or_init_from_checkpoint_is_a_pipeline_error(tmp_path):
    import json

    from wsi_pipeline.detection.checkpoint import load_detector
    from wsi_pipeline.errors import PipelineError
    from wsi_pipeline.training.checkpoints import load_fold_model

    marker = tmp_path / "unpickled"
    fold = tmp_path / "fold_0"
    fold.mkdir()
    (fold / "config.json").write_text(json.dumps({"model": "abmil", "in_dim": 8, "n_classes": 2,
                                                  "classes": ["a", "b"], "model_args": {}, "standardize": False}))
    (fold / "model.safetensors").write_bytes(_code_pickle(marker))
    with pytest.raises(PipelineError, match="not a readable safetensors file"):
        load_fold_model(fold)
    parent = tmp_path / "parent"            # detect.train.init_from: the same loader
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps({"detector": "mamba_centernet_tiny", "classes": ["m"]}))
    (parent / "model.safetensors").write_bytes(_code_pickle(marker))
    with pytest.raises(PipelineError, match="cannot be loaded"):
        load_detector(parent)
    assert not marker.exists()


# -- item 7: one image under two ids; model files' mode ----------------------------------------------
@pytest.mark.parametrize("how", ["hardlink", "symlink", "copy"])
def test_one_image_under_two_ids_is_refused_naming_both_rows(tmp_path, slide_paths, capsys, how):
    import shutil

    original = slide_paths[0]
    twin = tmp_path / "twin.svs"
    {"hardlink": os.link, "symlink": os.symlink, "copy": shutil.copyfile}[how](original, twin)
    rows = [f"A,{original},P1,tumor,demo", f"B,{slide_paths[1]},P2,normal,demo", f"C,{twin},P3,normal,demo"]
    manifest = write_manifest(tmp_path, rows)
    assert main(["validate-manifest", str(manifest)]) == 2
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if "row 3" in l)
    assert "'C'" in line and "row 1 (slide_id 'A')" in line and str(twin) in line
    # The stages that split slides into training and test refuse it before writing anything.
    run = tmp_path / "run"
    assert main(["train", "--manifest", str(manifest), "--features", str(run)]) == 2
    assert "row 1 (slide_id 'A')" in capsys.readouterr().err and not run.exists()
    # Under one patient both rows fall in the same patient-level fold: no leak, accepted.
    same_patient = write_manifest(tmp_path, [rows[0], rows[1], rows[2].replace(",P3,", ",P1,")], "same.csv")
    assert main(["validate-manifest", str(same_patient)]) == 0


def test_model_files_get_the_mode_of_other_outputs(tmp_path):
    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.training.checkpoints import save_fold_model

    old = os.umask(0o022)
    try:
        fold = tmp_path / "fold_0"
        save_fold_model(create_aggregator("abmil", 8, 2), fold,
                        {"model": "abmil", "in_dim": 8, "n_classes": 2, "classes": ["a", "b"], "model_args": {}})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in fold.iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}


# -- item 6: the CPU scan kernel falls back on any load failure --------------------------------------
def _scan_falls_back_with_one_warning(match: str) -> None:
    import torch

    from wsi_pipeline.ssm import cpu_kernel
    from wsi_pipeline.ssm.scan import selective_scan_native, selective_scan_ref

    from ..ssm.test_scan import make_inputs

    cpu_kernel.load.cache_clear()
    try:
        inputs = make_inputs(1, 4, 20, 3, True, True, True, True, True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = selective_scan_native(**inputs, delta_softplus=True)
            selective_scan_native(**inputs, delta_softplus=True)      # a second scan: no second warning
        ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and cpu_kernel.ENV_VAR in str(w.message)]
        assert len(ours) == 1 and match in str(ours[0].message), [str(w.message) for w in ours]
        torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), rtol=3e-4, atol=1e-5)
    finally:
        cpu_kernel.load.cache_clear()


def test_cpu_kernel_from_a_compiler_that_writes_a_broken_library_falls_back(tmp_path, monkeypatch):
    fake = tmp_path / "cc"
    # Accepts any command line and writes garbage where the library (or object) should be.
    fake.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do if [ "$1" = -o ]; then printf "not ELF" > "$2"; fi; '
                    'shift; done\nexit 0\n')
    fake.chmod(0o755)
    monkeypatch.setenv("WSI_SSM_CPU_KERNEL", "1")
    monkeypatch.setenv("CC", str(fake))
    _scan_falls_back_with_one_warning("could not be loaded")


def test_cpu_kernel_on_a_noexec_or_missing_temp_dir_falls_back(tmp_path, monkeypatch):
    import ctypes
    import tempfile

    monkeypatch.setenv("WSI_SSM_CPU_KERNEL", "1")

    def refuse(*args, **kwargs):   # what the loader says for a library on a noexec mount
        raise OSError("failed to map segment from shared object")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    _scan_falls_back_with_one_warning("failed to map segment")
    monkeypatch.undo()
    monkeypatch.setenv("WSI_SSM_CPU_KERNEL", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    _scan_falls_back_with_one_warning("could not be loaded")


# -- item 8: --exclude-failed ----------------------------------------------------------------------
WORKFLOW_CONFIG = """
tiling: {target_mpp: 2.0, patch_size_px: 32}
tissue: {mask_mpp: 8.0}
extract: {encoder: stain_texture, checkpoint: none, num_workers: 0}
train: {model: abmil, folds: 2, epochs: 1, patience: 1, bootstrap: 10,
        model_args: {hidden_dim: 8, attention_dim: 4, dropout: 0.0}}
"""


@pytest.fixture(scope="module")
def small_cohort(make_slide, tmp_path_factory):
    """Four good slides (two patients per class) in cohort demo, one broken slide in demo and one
    in cohort solo; a tiny config."""
    root = tmp_path_factory.mktemp("exclude_failed")
    good = [make_slide(f"xf_{i}", width_px=1024, height_px=768, positive=i % 2 == 1, seed=40 + i) for i in range(4)]
    (root / "BAD.svs").write_bytes(b"II*\x00" + bytes(3000))          # a truncated TIFF
    (root / "SOLO.svs").write_bytes(b"not a slide")
    rows = [f"G{i},{p},P{i},{'tumor' if i % 2 else 'normal'},demo" for i, p in enumerate(good)]
    rows += [f"BAD,{root / 'BAD.svs'},P8,tumor,demo", f"SOLO,{root / 'SOLO.svs'},P9,normal,solo"]
    manifest = write_manifest(root, rows)
    config = root / "tiny.yaml"
    config.write_text(WORKFLOW_CONFIG)
    return root, manifest, config


def _tile(manifest, config, run, slides) -> int:
    return main(["tile", "--manifest", str(manifest), "--config", str(config), "--out", str(run),
                 "--slides", slides, "--no-progress"])


def test_exclude_failed_runs_the_workflow_again_once_failures_are_known(small_cohort, tmp_path, monkeypatch,
                                                                        capsys):
    """Snakemake replaced by a stand-in (as in test_run_lock.py) whose first pass does what the
    workflow's tile jobs do on this manifest: the real tile stage fails BAD and SOLO and records it."""
    import stages.run as run_stage

    root, manifest, config = small_cohort
    run = tmp_path / "run"
    calls = []

    def snakemake(cmd, *args, **kwargs):
        known = sorted(p.stem for p in (run / "failures" / "tile").glob("*.json"))
        calls.append(known)
        if not known:                        # the fresh run: the tile jobs fail, Snakemake exits 1
            assert _tile(manifest, config, run, "BAD,SOLO") == 1
            return 1
        return 0

    monkeypatch.setattr(run_stage.subprocess, "call", snakemake)
    args = ["run", "--manifest", str(manifest), "--config", str(config), "--out", str(run), "--exclude-failed"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # The second pass starts with both failures on record: common.smk leaves them out of it.
    assert calls == [[], ["BAD", "SOLO"]]
    assert "--exclude-failed: BAD, SOLO failed before training; running the workflow again" in out
    assert "left out (--exclude-failed): BAD, SOLO" in out
    assert "cohort 'solo' was not trained: every slide of it failed before training" in out
    # Known failures, nothing new: one pass.
    calls.clear()
    assert main(args) == 0 and calls == [["BAD", "SOLO"]]


@pytest.mark.slow
def test_exclude_failed_on_a_fresh_run_trains_the_cohort_and_says_why_another_was_not(small_cohort, tmp_path,
                                                                                      capsys):
    """The real workflow (~25 CPU-s: two Snakemake passes, two tile jobs, one train job). The good
    slides are tiled and extracted in-process first, so only the jobs this is about run."""
    import csv

    from stages import get_stage
    from wsi_pipeline.run.config import load_config

    root, manifest, config = small_cohort
    run = tmp_path / "run"
    good_rows = load_manifest(manifest).select([f"G{i}" for i in range(4)])
    for stage in ("tile", "extract"):
        assert get_stage(stage).run(good_rows, load_config(config), run, progress=False).ok
    args = ["run", "--manifest", str(manifest), "--config", str(config), "--out", str(run), "--cores", "2",
            "--no-heatmaps", "--exclude-failed"]
    assert main(args) == 0
    out = capsys.readouterr().out
    predictions = run / "mil" / "abmil" / "demo" / "predictions.csv"
    assert sorted(r["slide_id"] for r in csv.DictReader(open(predictions))) == ["G0", "G1", "G2", "G3"]
    assert "left out (--exclude-failed): BAD, SOLO" in out
    assert "cohort 'solo' was not trained: every slide of it failed before training" in out


def test_exclude_failed_tries_a_repaired_slide_again(small_cohort, make_slide, tmp_path):
    """What the workflow leaves out (common.smk asks `excluded_failures`): a slide whose failure
    record still describes its file; once the file is fixed or replaced, the slide is tried again."""
    import shutil

    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.summary import excluded_failures

    root, manifest, config = small_cohort
    run = tmp_path / "run"
    assert _tile(manifest, config, run, "BAD,SOLO") == 1
    records = load_manifest(manifest)
    assert excluded_failures(records, RunFolder(run).failures()) == ["BAD", "SOLO"]
    fixed = root / "fixed"
    fixed.mkdir()
    shutil.copyfile(root / "BAD.svs", fixed / "BAD.svs")          # keep the broken one for other tests
    repaired = fixed / "manifest.csv"
    repaired.write_text(manifest.read_text().replace(str(root / "BAD.svs"), str(fixed / "BAD.svs")))
    shutil.copyfile(make_slide("xf_fixed", width_px=1024, height_px=768, positive=True, seed=60), fixed / "BAD.svs")
    records = load_manifest(repaired)
    assert excluded_failures(records, RunFolder(run).failures()) == ["SOLO"]     # BAD is tried again
    # The repaired slide passes tile: its failure record goes, it trains with its cohort.
    assert _tile(repaired, config, run, "BAD") == 0
    assert not (run / "failures" / "tile" / "BAD.json").exists()

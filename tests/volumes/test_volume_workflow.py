"""Volume rows through the real workflow: `wsi-pipeline run` (Snakemake: tile -> extract -> train ->
heatmap, the slides' own rules) on four tiny generated CT volumes named by `volume_id`, with truth
masks. Checks the files each stage leaves (coords (N, 3) with the grid recorded, features.h5, fold
checkpoints, predictions.csv, NIfTI heatmaps on each scan's own grid, volumes_summary.json), a
rerun that redoes only a lost file's chain, and the inputs refused before anything runs (exit 2).
Numbers are not asserted (one epoch).

The run uses `--slides-per-job 4` (cluster.slides_per_job): one tile, one extract and one heatmap
job per batch of a cohort's scans (tests/workflow/test_workflow.py runs one job per slide), so the
batches' failure records, rerun tokens and per-scan resume are checked here."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

nib = pytest.importorskip("nibabel")

from wsi_pipeline.cli import main  # noqa: E402

TINY_CONFIG = """
extract:
  encoder: stain_texture
  checkpoint: none
train:
  model: mambamil_3d
  model_args: {d_model: 16, d_state: 4, expand: 1, n_layers: 1, rate: 4}
  classes: [normal, lesion]
  folds: 2
  epochs: 1
  patience: 1
  bootstrap: 0
  device: cpu
volumes:
  target_spacing_mm: 5.0
  patch_size_vox: 16
  stride_vox: 8
  slice_step: 4
"""


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    from wsi_pipeline.demo.volumes import write_demo_volumes

    root = tmp_path_factory.mktemp("volume_workflow")
    manifest = write_demo_volumes(root / "cohort", n_patients=4, seed=3, spacing_scale=2.0)
    # One bad row in a cohort of its own: a 2-D image where a volume is expected.
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 1), np.float32), np.eye(4)), str(root / "cohort" / "flat.nii"))
    with open(manifest, "a", newline="") as fh:
        csv.writer(fh).writerow(["BAD-2D", "flat.nii", "P999", "normal", "bad_ct", "CT", ""])
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    run = root / "run"
    code, out, err = _run(["run", "--manifest", str(manifest), "--config", str(config), "--out", str(run),
                           "--cores", "2", "--slides-per-job", "4"])
    return {"root": root, "manifest": manifest, "config": config, "run": run, "code": code, "out": out, "err": err}


def test_run_on_volume_rows_writes_every_stage_output(volume_run):
    run, cohort = volume_run["run"], volume_run["root"] / "cohort"
    # The bad volume fails alone (exit 1), named in failures.csv; the other cohort runs to the end.
    assert volume_run["code"] == 1, volume_run["out"][-3000:]
    failures = list(csv.DictReader(open(run / "failures.csv")))
    assert [(f["slide_id"], f["stage"]) for f in failures] == [("BAD-2D", "tile")]
    assert "volume 'BAD-2D'" in failures[0]["error"] and "flat.nii is a 2-D image" in failures[0]["error"]
    assert "cohort 'bad_ct' was not trained: BAD-2D failed before training" in volume_run["out"]
    ids = [f"VOL-{n:03d}" for n in range(4)]
    for volume_id in ids:
        scan = nib.load(str(cohort / "volumes" / f"{volume_id}.nii.gz"))
        with h5py.File(run / "tiles" / f"{volume_id}.coords.h5", "r") as f:
            coords, attrs = f["coords"][()], dict(f["coords"].attrs)
        assert coords.ndim == 2 and coords.shape[1] == 3 and len(coords) > 0 and attrs["coord_dims"] == 3
        np.testing.assert_allclose(attrs["spacing_mm"], [5.0, 5.0, 5.0])
        np.testing.assert_allclose(attrs["source_affine"], scan.affine, atol=1e-5)
        assert tuple(attrs["source_shape"]) == scan.shape and attrs["affine"].shape == (4, 4)
        with h5py.File(run / "features" / "stain_texture" / f"{volume_id}.h5", "r") as f:
            assert f["coords"].shape == coords.shape and f["features"].shape[0] == len(coords)
            np.testing.assert_array_equal(f["coords"][()], coords)
            assert f.attrs["coord_dims"] == 3 and f.attrs["encoder"] == "stain_texture"
        # The heatmap and CAM mask lie on the scan's own grid: same shape and affine as the file.
        for suffix in (".heatmap.nii.gz", ".cam_mask.nii.gz"):
            image = nib.load(str(run / "heatmaps" / "mambamil_3d" / f"{volume_id}{suffix}"))
            assert image.shape == scan.shape
            np.testing.assert_allclose(image.affine, scan.affine, atol=1e-5)
        assert (run / "heatmaps" / "mambamil_3d" / f"{volume_id}.montage.png").is_file()
    model_dir = run / "mil" / "mambamil_3d" / "demo_ct"
    assert sorted(p.name for p in model_dir.glob("fold_*/model.safetensors")) == ["model.safetensors"] * 2
    rows = list(csv.DictReader(open(model_dir / "predictions.csv")))
    assert sorted(r["slide_id"] for r in rows) == ids
    summary = json.loads((run / "volumes_summary.json").read_text())
    c = summary["cohorts"]["demo_ct"]
    assert c["status"] == "done" and c["n_volumes"] == 4 and c["n_explained"] == 4
    assert summary["cohorts"]["bad_ct"]["status"] == "failed"
    # Positives have truth masks (manifest truth_mask column): peak-in-lesion and Dice per volume,
    # each from the fold model that held the volume out.
    assert c["n_positive_with_truth"] == 2 and 0 <= c["mean_dice"] <= 1
    assert all(v["model_fold"].startswith("fold_") for v in c["volumes"])
    assert "volumes:  demo_ct: mambamil_3d CV AUC" in volume_run["out"]


def test_rerun_redoes_only_a_lost_files_chain(volume_run):
    run = volume_run["run"]
    # One job per cohort and stage: the four scans of demo_ct are one batch, BAD-2D's cohort another.
    assert sorted(p.name for p in (run / "batches" / "tile").glob("*.json")) == ["bad_ct-0000.json", "demo_ct-0000.json"]
    assert len(list((run / "benchmarks" / "extract").rglob("*.tsv"))) == 2
    lost = run / "features" / "stain_texture" / "VOL-001.h5"
    lost.unlink()
    outputs = {p: p.stat().st_mtime_ns for pat in ("tiles/*.h5", "features/*/*.h5", "mil/*/*/metrics.json")
               for p in run.glob(pat)}
    code, out, _ = _run(["run", "--manifest", str(volume_run["manifest"]), "--config", str(volume_run["config"]),
                         "--out", str(run), "--cores", "1", "--slides-per-job", "4"])
    assert code == 1   # the bad volume is tried again and fails again
    # The lost features are made again, alone in their batch; the cohort retrains on them.
    assert lost.is_file()
    changed = {str(p.relative_to(run)) for p, t in outputs.items() if p.stat().st_mtime_ns != t}
    assert changed == {"mil/mambamil_3d/demo_ct/metrics.json"}, changed
    extract_log = (run / "logs" / "snakemake" / "extract" / "batches" / "demo_ct-0000.log").read_text()
    assert "1 done, 3 already complete, 0 failed" in extract_log


def _manifest(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_a_cohort_mixing_slides_and_volumes_is_refused_with_exit_2(tmp_path):
    manifest = _manifest(tmp_path / "m.csv", "slide_id,path,patient_id,label,cohort,modality",
                         ["S1,s1.tif,P1,a,c1,", "V1,v1.nii.gz,P2,b,c1,CT", "V2,v2.nii.gz,P3,b,c2,CT"])
    code, _, err = _run(["run", "--manifest", str(manifest), "--out", str(tmp_path / "run")])
    assert code == 2 and "cohort 'c1' mixes slides (rows 1 (S1)) and volumes (rows 2 (V1))" in err
    assert not (tmp_path / "run").exists()


def test_volume_rows_need_a_3d_model_and_no_slide_only_stage(tmp_path):
    from wsi_pipeline.demo.volumes import write_demo_volumes

    manifest = write_demo_volumes(tmp_path / "c", n_patients=1, seed=0, spacing_scale=4.0)
    code, _, err = _run(["run", "--manifest", str(manifest), "--model", "fmamil", "--out", str(tmp_path / "r")])
    assert code == 2 and "'fmamil' takes 2-D slide coords only" in err and "mambamil_3d" in err
    code, _, err = _run(["run", "--manifest", str(manifest), "--segment", "--out", str(tmp_path / "r")])
    assert code == 2 and "--segment works on whole-slide images" in err and "VOL-000" in err
    assert not (tmp_path / "r").exists()


def test_volume_id_alias_and_truth_mask_column(tmp_path):
    from wsi_pipeline.run.manifest import load_manifest

    manifest = _manifest(tmp_path / "m.csv", "volume_id,path,patient_id,label,cohort,modality,truth_mask",
                         ["V1,scans/v1.nii.gz,P1,a,c,CT,truth/v1.nii.gz", "V2,/abs/v2.nii.gz,P2,b,c,MR,"])
    r1, r2 = load_manifest(manifest)
    assert (r1.slide_id, r1.is_volume, r1.truth_mask) == ("V1", True, (tmp_path / "truth" / "v1.nii.gz").resolve())
    assert (r2.slide_id, r2.modality, r2.truth_mask) == ("V2", "MR", None)


@pytest.mark.parametrize("header,row,problem", [
    ("slide_id,volume_id,path,patient_id,label,cohort,modality", "S,V,v.nii.gz,P,a,c,CT",
     "both slide_id and volume_id are filled"),
    ("volume_id,path,patient_id,label,cohort,modality", "V,v.nii.gz,P,a,c,", "volume_id is for volume rows"),
    ("volume_id,path,patient_id,label,cohort,modality", "../x,v.nii.gz,P,a,c,CT", "row 1 (volume_id '../x'): volume_id"),
    ("slide_id,path,patient_id,label,cohort,truth_mask", "S,s.tif,P,a,c,t.nii.gz", "truth_mask is for volume rows"),
])
def test_bad_volume_columns_are_named(tmp_path, header, row, problem):
    from wsi_pipeline.errors import ManifestError
    from wsi_pipeline.run.manifest import load_manifest

    with pytest.raises(ManifestError) as exc:
        load_manifest(_manifest(tmp_path / "m.csv", header, [row]))
    assert problem in str(exc.value)


def test_volumes_config_section_is_validated_and_matches_the_window_presets():
    from wsi_pipeline.errors import ConfigError
    from wsi_pipeline.run.config import CT_WINDOW_PRESETS, config_from_dict
    from wsi_pipeline.volumes.instances import VolumeInstanceParams
    from wsi_pipeline.volumes.intensity import CT_WINDOWS

    assert set(CT_WINDOW_PRESETS) == set(CT_WINDOWS)
    cfg = config_from_dict({"volumes": {"windows": ["liver", [40, 400], "bone"], "target_spacing_mm": 3}})
    params = cfg.volumes.instance_params()
    assert params.windows == ("liver", (40.0, 400.0), "bone") and params.target_spacing_mm == 3.0
    # The earlier voxel settings give the Python API's defaults (and its earlier outputs' hash).
    earlier = {"target_spacing_mm": 2.0, "patch_size_vox": 16, "stride_vox": 8, "slice_step": 4}
    assert config_from_dict({"volumes": earlier}).volumes.instance_params().config_hash() \
        == VolumeInstanceParams().config_hash()
    # The default geometry is in mm (12 / 6 / 6 mm at 1.5 mm: 8 / 4 / 4 voxels).
    default = config_from_dict({}).volumes.instance_params()
    assert (default.patch_size_vox, default.stride_vox, default.slice_step) == (8, 4, 4)
    assert default.geometry_mm == (12.0, 6.0, 6.0)
    for bad, message in [({"windows": ["soft", "liver", "bone"]}, "unknown preset 'soft'"),
                         ({"windows": ["liver"]}, "needs exactly 3 windows"),
                         ({"stride_vox": 0}, "volumes.stride_vox"), ({"cam_threshold": 1.5}, "volumes.cam_threshold"),
                         ({"spacing": 2}, "unknown key(s) volumes.spacing")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict({"volumes": bad})


def test_demo_config_file_is_valid_and_used_by_the_demo():
    from wsi_pipeline.run.config import load_config
    from wsi_pipeline.volumes.cohort import demo_config, demo_config_path

    shipped = load_config(demo_config_path())
    assert demo_config_path() == Path(__file__).resolve().parents[2] / "configs" / "volumes_demo.yaml"
    assert demo_config(epochs=shipped.train.epochs) == shipped
    assert demo_config(model="abmil").train.model_args == {}

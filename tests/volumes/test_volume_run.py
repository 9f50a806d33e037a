"""The volume path end to end on a tiny synthetic cohort: extract → train stage CV → explain.
Numbers are not asserted (one epoch); files, grids and per-volume failure handling are."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from wsi_pipeline.demo.volumes import write_demo_volumes
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.volumes.cohort import demo_config, run_volumes
from wsi_pipeline.volumes.instances import VolumeInstanceParams


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vol_demo")
    manifest = write_demo_volumes(out, n_patients=6, seed=1, spacing_scale=2.0)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 1), np.float32), np.eye(4)), str(out / "flat.nii"))
    with open(manifest, "a", newline="") as fh:
        csv.writer(fh).writerow(["BAD-2D", "flat.nii", "P999", "normal", "demo_ct", "CT"])
    params = VolumeInstanceParams(target_spacing_mm=4.0, patch_size_vox=16, stride_vox=8, slice_step=4)
    summary = run_volumes(load_manifest(manifest, require_labels=True), demo_config(epochs=1, folds=2),
                          out / "run", params, truth_dir=out / "truth")
    return out, summary


def test_bad_volume_fails_alone_and_is_recorded(tiny_run):
    out, summary = tiny_run
    assert list(summary["failed"]) == ["BAD-2D"] and "2-D image" in summary["failed"]["BAD-2D"]
    records = [json.loads(p.read_text()) for p in (out / "run").rglob("*.json") if "BAD-2D" in p.name]
    assert any(r.get("stage") == "extract" and "flat.nii" in r["error"] for r in records)
    cohort = summary["cohorts"]["demo_ct"]
    assert cohort["status"] == "done" and cohort["n_volumes"] == 6


def test_outputs_lie_on_each_scans_own_grid(tiny_run):
    out, summary = tiny_run
    run = out / "run"
    rows = list(csv.DictReader(open(run / "mil" / "mambamil_3d" / "demo_ct" / "predictions.csv")))
    assert sorted(r["slide_id"] for r in rows) == [f"VOL-{n:03d}" for n in range(6)]
    for volume in summary["cohorts"]["demo_ct"]["volumes"]:
        scan = nib.load(str(out / "volumes" / f"{volume['volume_id']}.nii.gz"))
        heat = nib.load(volume["heatmap"])
        mask = nib.load(volume["mask"])
        for image in (heat, mask):
            assert image.shape == scan.shape
            np.testing.assert_allclose(image.affine, scan.affine, atol=1e-5)
        values = np.asarray(heat.dataobj)
        assert values.min() >= 0 and values.max() <= 1 and values.max() > 0
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert (run / "heatmaps" / "mambamil_3d" / f"{volume['volume_id']}.montage.png").is_file()
        assert set(volume["probs"]) == {"normal", "lesion"} and sum(volume["probs"].values()) == pytest.approx(1)
        if volume["label"] == "lesion":
            assert volume["dice"] is not None and volume["peak_in_lesion"] in (True, False)
        else:
            assert volume["dice"] is None

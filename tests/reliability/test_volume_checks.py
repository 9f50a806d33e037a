"""Volumes (issue 24, item 5): a truth mask must lie on the scan's grid (named in the error, nothing
written); a NIfTI whose intensities do not fit the manifest's modality warns; a 4-D file names the
manifest column that chooses its frame, and that column works."""

from __future__ import annotations

import csv
import logging

import nibabel as nib
import numpy as np
import pytest

from wsi_pipeline.demo.volumes import write_demo_volumes
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.volumes.explain import write_nifti
from wsi_pipeline.volumes.instances import VolumeInstanceParams
from wsi_pipeline.volumes.volume import VolumeError

PARAMS = VolumeInstanceParams(target_spacing_mm=4.0, patch_size_vox=16, stride_vox=8, slice_step=4)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Two demo CT volumes (VOL-001 has a lesion) with real stain_texture features and an untrained
    (real) 3-D aggregator: what the heatmap stage has when it explains a volume."""
    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.volumes.cohort import extract_volumes

    out = tmp_path_factory.mktemp("vol_checks")
    manifest = load_manifest(write_demo_volumes(out, n_patients=2, seed=1, spacing_scale=2.0))
    run = RunFolder(out / "run")
    assert extract_volumes(manifest, run, "stain_texture", "none", PARAMS) == {}
    model = create_aggregator("mambamil_3d", 60, 2, d_model=16, d_state=4, expand=1, n_layers=1).eval()
    return out, manifest.by_id()["VOL-001"], run, [(model, {"classes": ["normal", "lesion"]})]


def _truth_variant(out, record, name, *, shift_mm=0.0, crop=0):
    scan = nib.load(str(record.path))
    truth = np.asarray(nib.load(str(record.truth_mask)).dataobj)
    affine = scan.affine.copy()
    affine[:3, 3] += shift_mm
    path = out / f"{name}.nii.gz"
    write_nifti(path, truth[crop:] if crop else truth, affine, dtype=np.uint8)
    return path


def _explain(extracted, truth):
    from wsi_pipeline.volumes.pipeline import explain_volume

    out, record, run, models = extracted
    return explain_volume(record, run, models, "mambamil_3d", "stain_texture", PARAMS, truth)


@pytest.mark.parametrize("case", ["shifted", "cropped"])
def test_truth_mask_off_the_scans_grid_is_refused_and_nothing_is_written(extracted, case):
    out, record, run, _ = extracted
    truth = _truth_variant(out, record, case, **({"shift_mm": 6.0} if case == "shifted" else {"crop": 3}))
    with pytest.raises(VolumeError, match="must be on the scan's grid|not on the scan's grid") as exc:
        _explain(extracted, truth)
    assert str(truth) in str(exc.value) and "VOL-001" in str(exc.value)
    assert not list((run.root / "heatmaps").glob("*/VOL-001.*"))     # no heatmap without its Dice
    # The mask on the scan's grid (a float32 re-write of the same affine) is accepted and scored.
    result = _explain(extracted, _truth_variant(out, record, "aligned"))
    assert result.dice is not None and result.peak_in_lesion in (True, False)
    for p in (result.heatmap_path, result.montage_path, result.mask_path):
        p.unlink()


def test_ct_listed_as_mr_and_mr_listed_as_ct_warn_from_the_intensities(extracted, caplog):
    from wsi_pipeline.volumes.readers import read_nifti

    out, record, _, _ = extracted
    mr_like = out / "mr_like.nii.gz"
    hu = np.asarray(nib.load(str(record.path)).dataobj, dtype=np.float32)
    write_nifti(mr_like, hu - hu.min(), nib.load(str(record.path)).affine)   # non-negative scanner units
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        read_nifti(record.path, volume_id="CT-AS-MR", modality="MR")
        read_nifti(mr_like, volume_id="MR-AS-CT", modality="CT")
        read_nifti(record.path, volume_id="CT-AS-CT", modality="CT")
        read_nifti(mr_like, volume_id="MR-AS-MR", modality="MR")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'CT-AS-MR'" in w and "says MR" in w and "looks like CT" in w for w in warned), warned
    assert any("'MR-AS-CT'" in w and "says CT" in w for w in warned), warned
    assert not any("'CT-AS-CT'" in w or "'MR-AS-MR'" in w for w in warned), warned


def test_4d_file_names_the_frame_column_and_the_column_chooses_the_frame(extracted, tmp_path):
    from wsi_pipeline.volumes.readers import open_volume

    out, record, _, _ = extracted
    scan = nib.load(str(record.path))
    frames = np.stack([np.asarray(scan.dataobj), np.asarray(scan.dataobj) + 7], axis=-1).astype(np.int16)
    path = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(frames, scan.affine), str(path))
    rows = [["volume_id", "path", "patient_id", "label", "cohort", "modality", "frame"],
            ["T0", str(path), "P1", "normal", "ct", "CT", ""], ["T1", str(path), "P2", "lesion", "ct", "CT", "1"]]
    manifest_path = tmp_path / "manifest.csv"
    with open(manifest_path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    manifest = load_manifest(manifest_path).by_id()
    with pytest.raises(VolumeError, match=r"choose one frame with the manifest's `frame` column \(0\.\.1\)"):
        open_volume(manifest["T0"].path, volume_id="T0", modality="CT", frame=manifest["T0"].frame)
    second = open_volume(manifest["T1"].path, volume_id="T1", modality="CT", frame=manifest["T1"].frame)
    first = open_volume(record.path, modality="CT")
    np.testing.assert_allclose(second.data, first.data + 7)

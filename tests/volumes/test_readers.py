"""Readers on the files nibabel and pydicom ship, and on broken inputs (one clear error each)."""

import copy
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from wsi_pipeline.sources import Source
from wsi_pipeline.volumes import VolumeError, open_volume, read_dicom_series, read_nifti


def test_nibabel_anatomical_nii_canonical_ras():
    path = os.path.join(data_path, "anatomical.nii")
    original = nib.load(path)
    volume = read_nifti(path, volume_id="anat", modality="MR")
    assert isinstance(volume, Source) and volume.source_id == "anat" and volume.spacing_unit == "mm"
    assert volume.shape == (33, 41, 25) and volume.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert volume.meta["source_axcodes"] == "LAS" and nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    # LAS -> RAS is a flip of the first axis; the world position of every voxel is kept.
    np.testing.assert_array_equal(volume.data, np.asarray(original.get_fdata(), np.float32)[::-1])
    np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1], original.affine @ [32, 0, 0, 1])
    assert volume.source_shape == (33, 41, 25)
    np.testing.assert_array_equal(volume.source_affine, original.affine)


def test_nibabel_example4d_needs_a_frame_and_reads_one():
    path = os.path.join(data_path, "example4d.nii.gz")
    with pytest.raises(VolumeError, match=r"example4d.*4-D .*2 frames.*choose one frame"):
        read_nifti(path, volume_id="ex4d")
    volume = read_nifti(path, volume_id="ex4d", modality="MR", frame=1)
    assert volume.shape == (128, 96, 24)
    assert volume.spacing == pytest.approx((2.0, 2.0, 2.2), rel=1e-4)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    frame = np.asarray(nib.load(path).dataobj[..., 1], np.float32)
    np.testing.assert_array_equal(volume.data, frame[::-1])


def _series(tmp_path, name, n=4, gaps=None, test_file="CT_small.dcm"):
    """`n` copies of a pydicom test slice stacked along its normal (a real series layout)."""
    base = pydicom.dcmread(get_testdata_file(test_file))
    folder = tmp_path / name
    folder.mkdir()
    series_uid = generate_uid()
    position = np.asarray(base.ImagePositionPatient, float)
    z = 0.0
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.ImagePositionPatient = [float(v) for v in position + [0, 0, z]]
        ds.InstanceNumber = k + 1
        # shuffle the file order: the reader sorts by position along the normal
        ds.save_as(folder / f"slice_{(k * 7) % n:02d}.dcm")
        z += (gaps[k] if gaps else float(base.SliceThickness))
    return folder, base


def test_dicom_ct_series_shape_spacing_orientation_hu(tmp_path):
    folder, base = _series(tmp_path, "ct")
    volume = open_volume(folder, volume_id="ct", modality="CT")
    assert volume.shape == (128, 128, 4)
    assert volume.spacing == pytest.approx((0.661468, 0.661468, 5.0), rel=1e-5)
    assert volume.meta["source_axcodes"] == "LPS" and nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    hu = base.pixel_array.astype(np.float32) * float(base.RescaleSlope) + float(base.RescaleIntercept)
    # rows of pixel_array run posterior (+y LPS), columns left (+x LPS): RAS flips both
    np.testing.assert_array_equal(volume.data[:, :, 0], hu.T[::-1, ::-1])
    ipp = np.asarray(base.ImagePositionPatient, float)
    far = ipp + 127 * 0.661468 * np.array([1, 1, 0])                     # LPS of the canonical first voxel
    np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1], [-far[0], -far[1], far[2], 1], atol=1e-4)


def test_dicom_mr_series(tmp_path):
    folder, _ = _series(tmp_path, "mr", n=3, gaps=[1.5, 1.5, 1.5], test_file="MR_small.dcm")
    volume = read_dicom_series(folder, volume_id="mr", modality="MR")
    assert volume.shape == (64, 64, 3) and volume.spacing == pytest.approx((0.3125, 0.3125, 1.5), rel=1e-5)
    with pytest.raises(VolumeError, match=r"mr.*Modality is MR, the manifest says CT"):
        read_dicom_series(folder, volume_id="mr", modality="CT")


def test_dicom_single_slice_is_2d_error_naming_the_file():
    path = get_testdata_file("CT_small.dcm")
    with pytest.raises(VolumeError, match=r"CT_small\.dcm is one 2-D slice, a volume is expected"):
        open_volume(path, volume_id="one")


def test_dicom_mixed_series_and_uneven_gaps(tmp_path):
    folder, _ = _series(tmp_path, "mixed", n=3)
    pydicom.dcmread(get_testdata_file("MR_small.dcm")).save_as(folder / "other.dcm")
    with pytest.raises(VolumeError, match=r"mixed.*mixed series \(2 SeriesInstanceUIDs\)"):
        read_dicom_series(folder, volume_id="mixed")
    folder, _ = _series(tmp_path, "gaps", n=4, gaps=[5.0, 5.0, 10.0, 5.0])
    with pytest.raises(VolumeError, match=r"gaps.*inconsistent slice spacing"):
        read_dicom_series(folder, volume_id="gaps")


def _save(path, data, affine, **header):
    image = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        image.header[key] = value
    nib.save(image, str(path))
    return path


def test_nifti_errors_name_the_file(tmp_path):
    cube = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(VolumeError, match=r"flat\.nii.*2-D image"):
        read_nifti(_save(tmp_path / "flat.nii", np.zeros((8, 8, 1), np.float32), np.eye(4)), volume_id="flat")
    with pytest.raises(VolumeError, match=r"noori\.nii.*no orientation"):
        read_nifti(_save(tmp_path / "noori.nii", cube, None), volume_id="noori")
    inconsistent = nib.Nifti1Image(cube, np.diag([2.0, 2.0, 2.0, 1.0]))
    inconsistent.header["pixdim"][1:4] = 1.0
    nib.save(inconsistent, str(tmp_path / "incons.nii"))
    with pytest.raises(VolumeError, match=r"incons\.nii.*inconsistent spacing"):
        read_nifti(tmp_path / "incons.nii", volume_id="incons")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(VolumeError, match=r"junk.*cannot read .*junk\.nii\.gz as NIfTI"):
        read_nifti(tmp_path / "junk.nii.gz")
    with pytest.raises(VolumeError, match=r"file not found"):
        open_volume(tmp_path / "absent.nii.gz")

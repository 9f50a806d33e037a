"""Orientation/spacing round trips on generated volumes (RAS, LPS, permuted axes), instances, and
explanations: heatmap back on the file's grid, CAM mask, Dice, montage."""

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform
from PIL import Image

from wsi_pipeline.encoders.registry import create_encoder
from wsi_pipeline.features.features_h5 import read_features_h5
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.training.bags import load_bag
from wsi_pipeline.volumes import (VolumeInstanceParams, axial_montage, cam_mask, dice, encode_instances,
                                  heatmap_peak_vox, instance_heatmap, read_nifti, resample_to_spacing, smooth_heatmap,
                                  to_source_grid,
                                  volume_instances, write_nifti)
from wsi_pipeline.volumes.pipeline import extract_volume

ORIENTATIONS = ["RAS", "LPS", "LAS", "SRA", "PIL", "ASR"]
SPACING = (1.5, 2.0, 3.0)   # R, A, S mm


@pytest.fixture(scope="module")
def ras_volume():
    """A 32×28×20 CT-like RAS volume: air, a body ellipsoid (40 HU) and a bright sphere."""
    shape = (32, 28, 20)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"), -1)
    hu = np.full(shape, -1000.0, np.float32)
    hu[(grid ** 2).sum(-1) < 0.8] = 40.0
    hu[((grid - [0.3, 0.2, 0.0]) ** 2).sum(-1) < 0.05] = 200.0
    hu += np.arange(hu.size, dtype=np.float32).reshape(shape) % 7       # no symmetry hides a flip
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-24.0, -28.0, -30.0]
    return hu, affine


def _in_orientation(hu, affine, codes):
    """The RAS array and affine re-expressed with axes `codes`, by nibabel's orientation functions."""
    transform = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    data = apply_orientation(hu, transform)
    return data, affine @ inv_ornt_aff(transform, hu.shape)


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_any_orientation_reads_back_to_the_same_ras_volume(tmp_path, ras_volume, codes):
    hu, affine = ras_volume
    data, file_affine = _in_orientation(hu, affine, codes)
    assert nib.aff2axcodes(file_affine) == tuple(codes)
    path = write_nifti(tmp_path / f"{codes}.nii.gz", data, file_affine)
    volume = read_nifti(path, volume_id=codes)
    np.testing.assert_array_equal(volume.data, hu)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert volume.spacing == pytest.approx(SPACING) and volume.meta["source_axcodes"] == codes
    # the canonical array put back on the file's grid is the file's array, exactly
    back = to_source_grid(volume.data, volume.affine, volume.source_shape, volume.source_affine)
    np.testing.assert_array_equal(back, data)
    heat_path = write_nifti(tmp_path / "heat.nii.gz", back, volume.source_affine)
    reread = nib.load(str(heat_path))
    assert reread.shape == data.shape and nib.aff2axcodes(reread.affine) == tuple(codes)
    np.testing.assert_allclose(reread.affine, file_affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(reread.dataobj), data)


def test_resampling_keeps_extent_and_maps_back_onto_the_source_grid(tmp_path, ras_volume):
    hu, affine = ras_volume
    data, file_affine = _in_orientation(hu, affine, "PIL")
    volume = read_nifti(write_nifti(tmp_path / "pil.nii.gz", data, file_affine), volume_id="pil")
    grid = resample_to_spacing(volume, 1.0)
    assert grid.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert grid.shape == (48, 56, 60)                         # 32·1.5, 28·2, 20·3
    np.testing.assert_allclose(grid.affine[:3, 3], affine[:3, 3])
    # a label painted on the fine grid comes back on the file's grid where the file's voxels are
    labels = (grid.data > 100).astype(np.float32)
    back = to_source_grid(labels, grid.affine, volume.source_shape, volume.source_affine)
    truth = data > 100
    assert back.shape == data.shape and dice(back > 0.5, truth) > 0.9


def test_instances_features_and_bag_have_3d_coords(tmp_path, ras_volume):
    hu, affine = ras_volume
    path = write_nifti(tmp_path / "v.nii.gz", hu, affine)
    params = VolumeInstanceParams(target_spacing_mm=1.5, patch_size_vox=16, stride_vox=8, slice_step=4)
    instances = volume_instances(read_nifti(path, volume_id="v"), params)
    coords = instances.coords
    assert coords.ndim == 2 and coords.shape[1] == 3 and len(coords) > 0
    assert (coords >= 0).all() and (coords[:, :2] + 16 <= np.asarray(instances.grid.shape[:2])).all()
    assert (instances.body_fraction >= params.min_body_fraction).all()
    # raster order: slice slowest, then j, then i
    assert np.array_equal(np.lexsort((coords[:, 0], coords[:, 1], coords[:, 2])), np.arange(len(coords)))
    features = encode_instances(instances, create_encoder("stain_texture", "none"))
    assert features.shape == (len(coords), 60) and np.isfinite(features).all()

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path,patient_id,label,cohort,modality\nv,{path},p1,lesion,c,CT\n")
    record = load_manifest(manifest).records[0]
    assert record.is_volume and record.modality == "CT"
    run = RunFolder(tmp_path / "run")
    out = extract_volume(record, run, create_encoder("stain_texture", "none"), "stain_texture", params)
    f, c, attrs = read_features_h5(out)
    assert attrs["coord_dims"] == 3 and attrs["modality"] == "CT"
    np.testing.assert_allclose(attrs["spacing_mm"], (1.5, 1.5, 1.5))
    np.testing.assert_allclose(np.asarray(attrs["source_affine"]), affine)
    assert load_bag(out, "v")[1].shape == (len(coords), 3)


def test_manifest_modality_is_validated(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path,patient_id,label,cohort,modality,mpp\nv,x.nii.gz,p,a,c,PET,\n"
                   "w,y.nii.gz,q,a,c,CT,0.5\n")
    with pytest.raises(Exception) as info:
        load_manifest(bad)
    assert "row 1 (slide_id 'v'): modality must be empty" in str(info.value)
    assert "row 2 (slide_id 'w'): mpp is for slides" in str(info.value)


def test_heatmap_cam_mask_dice_peak_and_montage(tmp_path):
    coords = np.array([[0, 0, 0], [8, 0, 0], [8, 8, 4], [16, 8, 4]])
    heat = instance_heatmap(coords, np.array([0.1, 0.2, 1.0, 0.1]), (32, 32, 12), (16, 16, 4))
    assert heat.shape == (32, 32, 12) and heat[:8, :8, :4].max() == pytest.approx(0.1)
    assert heat[16:24, 8:24, 4:8].min() == pytest.approx(0.55)       # two boxes overlap: their mean
    assert heat[8:16, 8:24, 4:8].min() == pytest.approx(1.0) and heat[:, :, 8:].max() == 0
    mask = cam_mask(heat, 0.9)
    assert mask.sum() == 8 * 16 * 4 and mask[8:16, 8:24, 4:8].all()
    assert heatmap_peak_vox(heat) == (12, 16, 6)                        # centre, not the corner
    assert dice(mask, mask) == 1.0 and dice(mask, ~mask) == 0.0 and dice(mask & False, mask & False) == 1.0
    smooth = smooth_heatmap(heat, (4, 4, 2))
    assert smooth.max() == pytest.approx(1.0) and smooth[:, :, 11:].max() < 0.5
    peak = np.unravel_index(smooth.argmax(), smooth.shape)
    assert 8 <= peak[0] < 16 and 8 <= peak[1] < 24 and 4 <= peak[2] < 8     # inside the top box
    chosen = axial_montage(np.zeros((32, 32, 12), np.float32), heat, tmp_path / "m.png", n_slices=3)
    assert set(chosen) <= {4, 5, 6, 7} and Image.open(tmp_path / "m.png").size == (96, 32)

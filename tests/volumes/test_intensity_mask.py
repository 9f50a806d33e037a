"""CT windows, MRI normalisation, body masks (HU threshold / Otsu) and the 2.5-D channel modes."""

import numpy as np
import pytest

from wsi_pipeline.volumes import (Volume, VolumeInstanceParams, body_mask, ct_windows, instance_images,
                                  normalise_mri, otsu_threshold, volume_instances, window)


def _phantom(modality: str, background: float, body: float, shape=(32, 32, 24)):
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"), -1)
    data = np.full(shape, background, np.float32)
    inside = (grid[..., :2] ** 2).sum(-1) < 0.6
    data[inside] = body
    data[0, 0, :] = body                       # a speck outside the body (noise, a table edge)
    rng = np.random.default_rng(0)
    data += rng.normal(0, 5, shape).astype(np.float32)
    return Volume("ph", data, np.diag([2.0, 2.0, 2.0, 1.0]), modality, shape, np.diag([2.0, 2.0, 2.0, 1.0])), inside


def test_windows_map_hu_linearly_and_clip():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(window(hu, 40, 400), [0, 0, 0.5, 1, 1])
    channels = ct_windows(hu, ("soft_tissue", (0.0, 100.0)))
    assert channels.shape == (2, 5) and channels.dtype == np.float32
    np.testing.assert_allclose(channels[1], [0, 0, 0.9, 1, 1])
    with pytest.raises(ValueError, match="width must be > 0"):
        window(hu, 0, 0)


def test_mri_normalisation_uses_the_body_statistics():
    values = np.concatenate([np.zeros(100), np.linspace(100, 200, 100)]).astype(np.float32)
    mask = values > 50
    out = normalise_mri(values, mask, "percentile", (0, 100))
    assert out[mask].min() == 0 and out[mask].max() == 1 and (out[~mask] == 0).all()
    z = normalise_mri(values, mask, "zscore")
    assert z[mask].mean() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="percentile' or 'zscore"):
        normalise_mri(values, mask, "minmax")


@pytest.mark.parametrize("modality,background,body", [("CT", -1000.0, 40.0), ("MR", 10.0, 400.0)])
def test_body_mask_keeps_the_body_and_drops_specks(modality, background, body):
    volume, inside = _phantom(modality, background, body)
    if modality == "MR":
        assert background < otsu_threshold(volume.data) < body
    mask = body_mask(volume)
    assert not mask[0, 0, :].any()              # the largest component only
    assert (mask == inside).mean() > 0.99


def test_slices_and_windows_channel_modes():
    volume, _ = _phantom("CT", -1000.0, 40.0)
    volume.data[:, :, 12] += 100                # one brighter slice: visible in its neighbours' channels
    for channels in ("windows", "slices"):
        params = VolumeInstanceParams(target_spacing_mm=None, patch_size_vox=16, stride_vox=8, slice_step=4,
                                      channels=channels)
        instances = volume_instances(volume, params)
        images = instance_images(instances)
        assert images.shape == (len(instances.coords), 3, 16, 16) and images.dtype == np.uint8
        centre = next(n for n, c in enumerate(instances.coords) if tuple(c) == (8, 8, 12))
        if channels == "slices":                # slice 14 is the centre; 13 and 15 its neighbours
            assert instances.coords[centre][2] + 2 == 14
        else:                                   # three different windows of one slice
            assert len({images[centre, c].tobytes() for c in range(3)}) == 3
    bright = VolumeInstanceParams(target_spacing_mm=None, patch_size_vox=16, stride_vox=8, slice_step=1,
                                  channels="slices")
    instances = volume_instances(volume, bright)
    images = instance_images(instances)
    at = {tuple(c): n for n, c in enumerate(instances.coords)}
    n = at[(8, 8, 13)]                          # slices 12, 13, 14: only the first is bright
    assert images[n, 0].mean() > images[n, 1].mean() + 50 and abs(int(images[n, 1].mean()) - int(images[n, 2].mean())) < 10


def test_volume_is_a_source_with_padded_box_reads():
    from wsi_pipeline.sources import Source, physical_extent

    volume, _ = _phantom("CT", -1000.0, 40.0)
    assert isinstance(volume, Source) and volume.ndim == 3 and volume.spacing_unit == "mm"
    assert volume.spacing == (2.0, 2.0, 2.0) and physical_extent(volume) == (64.0, 64.0, 48.0)
    np.testing.assert_array_equal(volume.read_box((4, 5, 6), (3, 2, 1)), volume.data[4:7, 5:7, 6:7])
    edge = volume.read_box((-2, 30, 22), (4, 4, 4))           # partly outside: padded with the minimum
    assert edge.shape == (4, 4, 4) and (edge[:2] == volume.data.min()).all()
    np.testing.assert_array_equal(edge[2:, :2, :2], volume.data[0:2, 30:32, 22:24])
    with pytest.raises(ValueError, match="ph: a box needs 3 start and size values"):
        volume.read_box((0, 0), (1, 1))

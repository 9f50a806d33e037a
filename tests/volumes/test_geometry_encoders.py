"""Volume instances for small lesions (issue 25): geometry in mm with an optional coarse scale,
windows relative to the body's median HU, the 3-D encoder path (parameter-free descriptor, MONAI
ResNet from a local checkpoint against MONAI's own class), the encoder's smallest box refused up
front (exit 2), and MambaMIL's instance head for the instance top-k loss. Small arrays only."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.run.config import config_from_dict
from wsi_pipeline.volumes import Volume
from wsi_pipeline.volumes.explain import instance_heatmap
from wsi_pipeline.volumes.instances import (VolumeInstanceParams, encode_instances, instance_subvolumes, prepare,
                                            volume_instances)


def _phantom(offset_hu: float = 0.0, spacing=(1.0, 1.0, 2.0)) -> Volume:
    """A 48 x 48 mm body (40 HU soft tissue, 8 mm slices) with a bright 8 mm cube, air around."""
    rng = np.random.default_rng(0)
    shape = (48, 48, 12)
    hu = np.full(shape, -1000.0, np.float32)
    hu[4:44, 4:44, :] = 40.0
    hu[20:28, 20:28, 4:8] = 90.0
    hu += rng.normal(0, 5, shape).astype(np.float32) + offset_hu
    affine = np.diag([*spacing, 1.0])
    return Volume("PH-1", hu, affine, "CT", shape, affine)


def test_geometry_in_mm_derives_voxels_and_a_coarse_scale_knows_its_boxes():
    cfg = config_from_dict({"volumes": {"target_spacing_mm": 2.0, "box_mm": 8, "stride_mm": 4, "slab_mm": 4,
                                        "coarse_scale_mm": [16, 8, 8]}})
    params = cfg.volumes.instance_params()
    assert params.scales() == [(4, 2, 2), (8, 4, 4)] and params.geometry_mm == (8.0, 4.0, 4.0)
    instances = volume_instances(_phantom(), params)
    assert set(np.unique(instances.scale)) == {0, 1}
    sizes = instances.box_sizes()
    assert (sizes[instances.scale == 0] == (4, 4, 2)).all() and (sizes[instances.scale == 1] == (8, 8, 4)).all()
    attrs = instances.attrs()
    assert attrs["box_mm"] == 8.0 and attrs["slab_mm"] == 4.0 and attrs["scales_vox"] == "[[4, 2, 2], [8, 4, 4]]"
    # Each instance is painted with its own box: one coarse instance alone covers 8 x 8 x 4 voxels.
    coarse = np.flatnonzero(instances.scale == 1)[0]
    heat = instance_heatmap(instances.coords[[coarse]], np.ones(1), instances.grid.shape, sizes[[coarse]])
    assert int((heat > 0).sum()) == 8 * 8 * 4
    with pytest.raises(ConfigError, match="target_spacing_mm"):
        config_from_dict({"volumes": {"target_spacing_mm": None}})
    with pytest.raises(ConfigError, match="give all three"):
        config_from_dict({"volumes": {"patch_size_vox": 8}})
    with pytest.raises(ConfigError, match="larger than box_mm"):
        config_from_dict({"volumes": {"coarse_scale_mm": [8, 4, 4], "box_mm": 12}})


def test_body_median_windows_cancel_a_calibration_offset():
    params = VolumeInstanceParams.from_mm(2.0, 8, 4, 4, window_reference="body_median")
    _, base, _ = prepare(_phantom(), params)
    _, shifted, _ = prepare(_phantom(offset_hu=15.0), params)
    np.testing.assert_allclose(shifted, base, atol=1e-5)
    absolute = VolumeInstanceParams.from_mm(2.0, 8, 4, 4)
    _, a0, _ = prepare(_phantom(), absolute)
    _, a1, _ = prepare(_phantom(offset_hu=15.0), absolute)
    assert np.abs(a1 - a0).max() > 0.03    # 15 HU in the 160-HU liver window


def test_subvolumes_carry_half_a_box_of_context_and_the_descriptor_sees_the_blob():
    from wsi_pipeline.encoders import create_encoder

    params = VolumeInstanceParams.from_mm(2.0, 8, 4, 4)
    instances = volume_instances(_phantom(), params)
    blocks = instance_subvolumes(instances)
    assert blocks.shape[1:] == (3, 4, 8, 8)               # (C, 2 slab, 2 box, 2 box), k j i
    # 2 mm grid 24 x 24 x 12: body i, j in [2, 22), the cube i, j in [10, 14), k in [4, 8); boxes 4 x 4 x 2.
    n = int(np.flatnonzero((instances.coords == (10, 10, 4)).all(axis=1))[0])
    i0, j0, k0 = instances.coords[n]
    # The box is the central half: voxel (i0, j0, k0) of the grid sits at (1, 2, 2) of the block (k, j, i).
    np.testing.assert_allclose(blocks[n, :, 1, 2, 2], instances.channels[:, i0, j0, k0])
    encoder = create_encoder("volume_texture_3d", "none")
    features = encode_instances(instances, encoder)
    assert features.shape == (len(instances.coords), encoder.out_dim) and np.isfinite(features).all()
    # |mean(box) - mean(context)| in the soft-tissue window: the cube's box against boxes whose
    # context is plain soft tissue (inside the body, away from the cube).
    contrast = features[:, 13]
    c = instances.coords
    inside = ((c[:, :2] >= 4) & (c[:, :2] + 6 <= 22)).all(axis=1) & (c[:, 2] >= 1) & (c[:, 2] + 3 <= 12)
    away = ((c[:, 0] + 6 <= 10) | (c[:, 0] - 2 >= 14) | (c[:, 1] + 6 <= 10) | (c[:, 1] - 2 >= 14))
    assert (inside & away).sum() >= 4
    assert contrast[n] > 5 * contrast[inside & away].max()


def test_monai_resnet_entry_loads_a_local_checkpoint_like_monais_own_class(tmp_path):
    monai_nets = pytest.importorskip("monai.networks.nets")
    from safetensors.torch import save_file

    from wsi_pipeline.encoders import create_encoder

    torch.manual_seed(0)
    reference = monai_nets.resnet10(spatial_dims=3, n_input_channels=1, shortcut_type="B", bias_downsample=False,
                                    feed_forward=False).eval()
    for module in reference.modules():      # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    # The MedicalNet release layout: DataParallel's module. prefix and a segmentation head.
    state = {f"module.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 512, 1, 1, 1)
    path = tmp_path / "resnet10.safetensors"
    save_file(state, str(path))
    encoder = create_encoder("monai_resnet10_3d", str(path))
    assert encoder.weights_sha256 not in ("none", "random")
    x = torch.rand(2, 1, 8, 16, 16)
    with torch.no_grad():
        expected = reference((x - 0.5) / 0.25)
        torch.testing.assert_close(encoder(x), expected)
        # Through the volume path: three windows in, the entry takes the first (soft tissue).
        instances = volume_instances(_phantom(), VolumeInstanceParams.from_mm(2.0, 8, 8, 8))
        features = encode_instances(instances, encoder)
        first = torch.from_numpy(instance_subvolumes(instances, np.arange(2))[:, :1])
        torch.testing.assert_close(torch.from_numpy(features[:2]), reference((first - 0.5) / 0.25))


def test_an_encoder_smaller_than_the_box_is_refused_before_anything_runs(tmp_path):
    nib = pytest.importorskip("nibabel")
    from wsi_pipeline.cli import main

    for name, value in (("a", -1000), ("b", -999)):
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, np.int16), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "m.csv").write_text("volume_id,path,patient_id,label,cohort,modality\nV1,a.nii.gz,P1,normal,c,CT\n"
                                    "V2,b.nii.gz,P2,lesion,c,CT\n")
    (tmp_path / "c.yaml").write_text("extract: {encoder: stain_texture, checkpoint: none}\n"
                                     "train: {model: mambamil_3d}\nvolumes: {box_mm: 12, target_spacing_mm: 1.5}\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", "--manifest", str(tmp_path / "m.csv"), "--config", str(tmp_path / "c.yaml"),
                     "--out", str(tmp_path / "run")])
    assert code == 2 and "8 voxels" in err.getvalue() and "16 px encoder 'stain_texture'" in err.getvalue()
    assert not (tmp_path / "run" / "tiles").exists()


def test_mambamil_instance_head_is_the_slide_logits_per_instance():
    from wsi_pipeline.models.mil import create_aggregator

    torch.manual_seed(0)
    model = create_aggregator("mambamil_3d", in_dim=6, n_classes=2, d_model=8, d_state=4, expand=1, n_layers=1,
                              rate=2, instance_head=True).eval()
    features, coords = torch.randn(1, 10, 6), torch.randint(0, 5, (1, 10, 3))
    out = model(features, coords)
    assert out.instance_logits.shape == (1, 10, 2)
    pooled = torch.einsum("bl,blc->bc", out.instance_scores, out.instance_logits)
    torch.testing.assert_close(pooled, out.logits)
    plain = create_aggregator("mambamil_3d", in_dim=6, n_classes=2, d_model=8, d_state=4, expand=1, n_layers=1,
                              rate=2).eval()
    assert plain(features, coords).instance_logits is None

"""The parameter-free `stain_texture` encoder: shape, determinism, weights handling, and that its
descriptors carry what the demo lesions show (a linear probe fitted on one slide finds the lesion
patches of another)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from stages.extract import run_extract
from wsi_pipeline.encoders import EncoderWeightsError, create_encoder, get_spec
from wsi_pipeline.run.config import config_from_dict
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.slides import open_slide


def test_shape_determinism_and_no_weights():
    enc = create_encoder("stain_texture", "none")
    assert enc.weights_sha256 == "none" and get_spec("stain_texture").parameter_free
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        a, b = enc(x), create_encoder("stain_texture", None)(x)
        one = enc(x[2:3])
    assert a.shape == (5, enc.out_dim) == (5, 60)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[2:3], one)       # per patch: no batch statistics
    with pytest.raises(EncoderWeightsError, match="has no weights; set extract.checkpoint: none"):
        create_encoder("stain_texture", "random")


def test_white_and_dark_patches_differ_in_stain_features():
    enc = create_encoder("stain_texture", "none")
    white = torch.full((1, 3, 32, 32), 250, dtype=torch.uint8)
    purple = torch.tensor([120, 60, 160], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    with torch.inference_mode():
        fw, fp = enc(white)[0], enc(purple.contiguous())[0]
    # Haematoxylin mean (index 15) is near zero on glass and clearly positive on purple stain
    # (version 2 scale: (concentration - 0.1) / 0.1, so 0.05 OD is -0.5).
    assert fw[15] < -0.5 < fp[15]


def _patches_and_lesion(path, size=112):
    """Level-0 patches on a regular grid over tissue-ish areas, with their lesion fraction."""
    truth = json.loads(path.with_suffix(".truth.json").read_text())
    mask = np.asarray(Image.open(path.parent / truth["lesion_mask"])) > 0
    ds = truth["lesion_mask_downsample"]
    patches, fractions = [], []
    with open_slide(path) as slide:
        w, h = slide.dimensions
        for y in range(0, h - size, size):
            for x in range(0, w - size, size):
                patch = slide.read_region((x, y), 0, (size, size))
                if patch.mean() > 220:           # glass
                    continue
                patches.append(patch)
                fractions.append(mask[y // ds:(y + size) // ds, x // ds:(x + size) // ds].mean())
    return np.stack(patches), np.array(fractions)


def test_linear_probe_on_one_slide_finds_lesions_on_another(make_slide):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    # Two positive slides with different stain draws and lesion shapes.
    positives = [make_slide("probe-a", positive=True, seed=21), make_slide("probe-b", positive=True, seed=22)]
    enc = create_encoder("stain_texture", "none")
    data = []
    for path in positives:
        patches, fractions = _patches_and_lesion(path)
        with torch.inference_mode():
            feats = enc(torch.from_numpy(patches).permute(0, 3, 1, 2)).numpy()
        data.append((feats, fractions > 0.5))
    (x_fit, y_fit), (x_test, y_test) = data
    assert y_fit.any() and y_test.any() and not y_test.all()
    probe = LogisticRegression(C=1.0, max_iter=5000).fit(x_fit, y_fit)
    auc = roc_auc_score(y_test, probe.predict_proba(x_test)[:, 1])
    assert auc >= 0.9, auc


def test_extract_stage_records_a_parameter_free_encoder(demo_cohort, tmp_path):
    from wsi_pipeline.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("tiling:\n  target_mpp: 2.0\n  patch_size_px: 64\n"
                        "extract:\n  encoder: stain_texture\n  checkpoint: none\n  num_workers: 0\n")
    assert main(["tile", "--manifest", str(demo_cohort), "--config", str(cfg_path), "--out", str(tmp_path),
                 "--no-progress"]) == 0
    assert main(["extract", "--manifest", str(demo_cohort), "--config", str(cfg_path), "--out", str(tmp_path),
                 "--no-progress"]) == 0
    record = load_manifest(demo_cohort).records[0]
    with h5py.File(tmp_path / "features" / "stain_texture" / f"{record.slide_id}.h5", "r") as f:
        assert f["features"].shape[1] == 60 and np.isfinite(f["features"][:]).all()
        assert f.attrs["weights_sha256"] == "none" and not f.attrs["random_weights"]
        assert f.attrs["encoder_version"] == 2
    bad = config_from_dict({"extract": {"encoder": "stain_texture", "checkpoint": "random"}})
    report = None
    with pytest.raises(Exception, match="has no weights; set it to none"):
        report = run_extract(load_manifest(demo_cohort), bad, tmp_path, progress=False)
    assert report is None

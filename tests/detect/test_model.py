"""Detector registry entries and a tiny detector learning a planted dot pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipeline.detection import match_points
from wsi_pipeline.detection.inference import predict_maps
from wsi_pipeline.detection.peaks import find_peaks
from wsi_pipeline.detection.targets import focal_loss, gaussian_targets, offset_loss
from wsi_pipeline.models.detect import DETECTORS, create_detector

TINY = {"mamba_centernet_tiny": {"dims": (8, 8, 8), "d_state": 4},
        "mamba_centernet_small": {"dims": (8, 8, 8, 8), "depths": (1, 1, 1, 1), "d_state": 4,
                                  "stem_ch": 8, "body_ch": 8, "head_ch": 8}}


@pytest.mark.parametrize("name", DETECTORS.list())
def test_every_detector_builds_and_gives_heatmaps_plus_offsets(name):
    meta = DETECTORS.get_metadata(name)
    assert meta["out_dim"] == "n_classes" and meta["license"] and meta["reference"]
    model = create_detector(name, n_classes=3, **TINY.get(name, {}))
    out = model(torch.randn(2, 3, 37, 45))
    assert out.shape == (2, 5, 37, 45)
    assert out[:, 3:].abs().max() <= 0.5                       # offsets bounded to the pixel
    assert torch.allclose(torch.sigmoid(model(torch.zeros(1, 3, 16, 16))[:, :3]).mean(), torch.tensor(0.1), atol=0.05)


def _dot_sample(rng, size=32, n=(2, 4)):
    """White image with dark dots (class 0) and dark squares (class 1) at random sub-pixel positions."""
    img = np.full((size, size, 3), 235, dtype=np.uint8)
    xy, cls = [], []
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for _ in range(rng.integers(*n)):
        x, y = rng.uniform(5, size - 5, 2)
        if any(np.hypot(x - a, y - b) < 9 for a, b in xy):
            continue
        c = int(rng.integers(2))
        shape = (np.hypot(xx - x, yy - y) <= 2.5) if c == 0 else ((abs(xx - x) <= 2.5) & (abs(yy - y) <= 2.5))
        img[shape] = (40, 40, 120) if c == 0 else (120, 30, 40)
        xy.append((x, y))
        cls.append(c)
    return img, np.array(xy).reshape(-1, 2), np.array(cls, dtype=np.int64)


def test_tiny_detector_learns_a_planted_dot_pattern():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_detector("mamba_centernet_tiny", n_classes=2, dims=(8, 8), depths=(1, 1), d_state=4,
                            stem_ch=8, body_ch=8, head_ch=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    train = [_dot_sample(rng) for _ in range(12)]
    targets = [gaussian_targets(xy, c, 2, 32, 32, sigma_um=1.0, mpp=1.0) for _, xy, c in train]
    images = np.stack([t[0] for t in train])
    heat = torch.from_numpy(np.stack([t[0] for t in targets]))
    off = torch.from_numpy(np.stack([t[1] for t in targets]))
    mask = torch.from_numpy(np.stack([t[2] for t in targets]))
    from wsi_pipeline.detection.inference import normalise
    x = normalise(images, model, "cpu")
    for step in range(STEPS):
        out = model(x)
        loss = focal_loss(out[:, :2], heat) + offset_loss(out[:, 2:], off, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = [_dot_sample(rng) for _ in range(6)]
    maps = predict_maps(model.eval(), np.stack([t[0] for t in test]), "cpu")
    tp = fp = fn = 0
    for (ixy, pxy, score, pcls), (_, txy, tcls) in zip(find_peaks(*maps, min_score=0.3, nms_px=2), test):
        for k in range(2):
            a, b, c = match_points(pxy[pcls == k], txy[tcls == k], radius_um=2.0)
            tp, fp, fn = tp + a, fp + b, fn + c
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 >= 0.9, (tp, fp, fn)


STEPS = 25  # enough on this seed; ~4 s on an idle core

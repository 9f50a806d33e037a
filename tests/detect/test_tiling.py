"""Whole-slide tiled inference: seams, tiled == untiled, streamed outputs, QuPath GeoJSON rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_pipeline.detection.hotspot import HOTSPOT_AREA_MM2
from wsi_pipeline.detection.inference import detect_slide
from wsi_pipeline.detection.outputs import CandidateWriter, read_candidates, write_outputs
from wsi_pipeline.slides import open_slide

from .conftest import dot_image, write_slide

# Dots in level-0 px (0.5 µm/px). (64, 40) sits exactly on the seam between the first two 64-px
# cores, (128, 128) on a four-core corner, (63.5, 100.5) one pixel left of a seam.
DOTS = [(20.5, 20.5), (64.0, 40.0), (128.0, 128.0), (63.5, 100.5), (150.5, 30.5), (200.25, 170.75), (5.5, 180.5)]


@pytest.fixture(scope="module")
def dot_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("dots") / "dots.svs"
    return write_slide(path, dot_image(240, 200, DOTS))


def _run(model, path, core_px, margin_px=8, **kw):
    found = []
    with open_slide(path) as slide:
        info = detect_slide(model, slide, lambda xy, s, c: found.extend(zip(map(tuple, xy), s, c)),
                            work_mpp=0.5, core_px=core_px, margin_px=margin_px, min_score=0.5, nms_px=2, **kw)
    found.sort()
    return found, info


def test_points_on_seams_are_reported_once_and_tiled_equals_untiled(dark_dot_model, dot_slide):
    untiled, info1 = _run(dark_dot_model, dot_slide, core_px=1024)
    tiled, info64 = _run(dark_dot_model, dot_slide, core_px=64)
    assert info1["n_tiles"] == 1 and info64["n_tiles"] == 4 * 4
    assert len(untiled) == len(DOTS)
    # every dot found once, within a pixel
    for x, y in DOTS:
        d = [np.hypot(px - x, py - y) for (px, py), _, _ in tiled]
        assert sum(di < 1.5 for di in d) == 1
    # identical detections (position, score, class) whatever the tiling
    assert len(tiled) == len(untiled)
    for (a, sa, ca), (b, sb, cb) in zip(tiled, untiled):
        assert np.allclose(a, b) and np.isclose(sa, sb, atol=1e-5) and ca == cb
    # odd core sizes: seams cut through dots elsewhere, still the same set
    for core in (37, 50):
        other, _ = _run(dark_dot_model, dot_slide, core_px=core)
        assert [p for p, _, _ in other] == [p for p, _, _ in untiled]


def test_without_margin_seam_dots_are_lost_or_doubled(dark_dot_model, dot_slide):
    """The margin is what makes seams safe: with none, a tile sees half a dot."""
    no_margin, _ = _run(dark_dot_model, dot_slide, core_px=64, margin_px=0)
    untiled, _ = _run(dark_dot_model, dot_slide, core_px=1024)
    assert [p for p, _, _ in no_margin] != [p for p, _, _ in untiled]


def test_wider_group_suppression_within_the_margin_keeps_tiled_equal_to_untiled(dark_dot_model, dot_slide):
    """A rare class's larger suppression radius (6 px, margin 8): seam dots still once, same set."""
    kw = {"class_groups": [[0]], "group_nms_px": [6]}
    untiled, _ = _run(dark_dot_model, dot_slide, core_px=1024, **kw)
    assert len(untiled) == len(DOTS)
    for core in (64, 37):
        tiled, _ = _run(dark_dot_model, dot_slide, core_px=core, **kw)
        assert [(p, c) for p, _, c in tiled] == [(p, c) for p, _, c in untiled]


def test_tissue_only_tiles(dark_dot_model, dot_slide):
    mask = np.zeros((25, 30), dtype=bool)   # 4 µm/px mask over the 120 x 100 µm slide
    mask[16:, 24:] = True                    # tissue only from (96, 64) µm = (192, 128) px on
    found, info = _run(dark_dot_model, dot_slide, core_px=64, tissue_mask=mask, mask_mpp=4.0)
    assert info["n_tiles"] == 2              # cores at x 192 and y 128, 192
    assert len(found) == 1 and np.hypot(found[0][0][0] - 200.25, found[0][0][1] - 170.75) < 1.5


def test_outputs_follow_qupath_geojson_rules_and_summary(tmp_path):
    classes = ["nucleus-normal", "nucleus-tumour", "mitosis"]
    cand = tmp_path / "s.candidates.csv"
    writer = CandidateWriter(cand, classes)
    xy = np.array([[10.0, 20.0], [4000.0, 4000.0], [4100.0, 4050.0], [12000.0, 12000.0], [30.0, 40.0]])
    writer(xy, np.array([0.9, 0.8, 0.7, 0.95, 0.2]), np.array([0, 2, 2, 2, 1]))
    assert not cand.exists()            # streamed to a temp file until committed
    writer.commit()
    assert len(read_candidates(cand, classes)[0]) == 5
    paths = {k: tmp_path / f"s.{k}" for k in ("csv", "geojson", "midog", "summary")}
    summary = write_outputs(cand, paths, slide_id="s", classes=classes,
                            thresholds={"nucleus-normal": 0.5, "nucleus-tumour": 0.5, "mitosis": 0.5},
                            slide_mpp=0.25, tissue_area_mm2=2.0, mitosis_class="mitosis")
    geo = json.loads(paths["geojson"].read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 4
    for f in geo["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Point"
        assert len(f["geometry"]["coordinates"]) == 2
        props = f["properties"]
        assert props["objectType"] == "detection"
        cls = props["classification"]
        assert cls["name"] in classes and len(cls["color"]) == 3 and all(0 <= c <= 255 for c in cls["color"])
        assert isinstance(props["measurements"]["score"], float)
    midog = json.loads(paths["midog"].read_text())
    assert midog["type"] == "Multiple points"
    assert midog["points"][1]["point"] == [1.0, 1.0, 0]       # 4000 px * 0.25 µm/px = 1 mm
    assert summary["counts"] == {"nucleus-normal": 1, "nucleus-tumour": 0, "mitosis": 3}
    assert summary["mitotic_density_per_mm2"] == 1.5
    # hotspot side sqrt(2.37 mm²) = 1539.5 µm = 6158 px at 0.25 µm/px: two mitoses fit, three do not
    assert summary["hotspot"]["count"] == 2 and summary["hotspot"]["area_mm2"] == HOTSPOT_AREA_MM2
    assert (summary["hotspot"]["x_px"], summary["hotspot"]["y_px"]) == (4000.0, 4000.0)
    assert json.loads(paths["summary"].read_text()) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["s.candidates.csv", "s.csv", "s.geojson", "s.midog", "s.summary"])


def test_interrupted_slide_leaves_no_output(dark_dot_model, dot_slide, tmp_path):
    """A failure mid-slide (here: the third tile) leaves neither a candidates file nor a temp."""
    cand = tmp_path / "s.candidates.csv"
    writer = CandidateWriter(cand, ["dot"])
    calls = []

    def failing_sink(xy, score, cls):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        writer(xy, score, cls)

    with open_slide(dot_slide) as slide, pytest.raises(OSError):
        try:
            detect_slide(dark_dot_model, slide, failing_sink, work_mpp=0.5, core_px=64, margin_px=8,
                         min_score=0.5, nms_px=2, batch_size=1)
        except BaseException:
            writer.abort()
            raise
    assert list(tmp_path.iterdir()) == []

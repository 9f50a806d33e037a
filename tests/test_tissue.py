"""Tissue detection: masks on generated slides, exact polygons, QuPath GeoJSON, QC rendering."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.slides import open_slide
from wsi_pipeline.tiling import tissue


def _disk(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.02, 0.005, 5000), rng.normal(0.4, 0.05, 3000)])
    t = tissue.otsu_threshold(values)
    assert 0.05 < t < 0.3


def test_detects_tissue_on_a_demo_slide_and_not_on_glass(make_slide, tmp_path):
    slide = open_slide(make_slide("tissue"), slide_id="tissue")
    level = slide.level_count - 1
    rgb = slide.read_level(level)
    mask_mpp = slide.mpp * slide.level_downsamples[level]
    mask = tissue.detect_tissue(rgb, mask_mpp, min_tissue_area_um2=1000.0)
    assert mask.shape == rgb.shape[:2] and mask.dtype == bool
    # Tissue pixels are saturated, the rest is near-white glass.
    sat = rgb.max(-1).astype(float) - rgb.min(-1)
    assert 0.2 < mask.mean() < 0.95
    assert sat[mask].mean() > 3 * sat[~mask].mean()

    glass = np.full((200, 300, 3), 238, np.uint8) + np.random.default_rng(1).integers(0, 4, (200, 300, 3)).astype(np.uint8)
    assert not tissue.detect_tissue(glass, 16.0).any()


def test_small_regions_and_holes_follow_their_um2_limits():
    mpp = 10.0  # µm per mask pixel: a pixel is 100 µm²
    mask_rgb = np.full((120, 120, 3), 240, np.uint8)
    big = _disk((120, 120), (60, 60), 40)
    hole = _disk((120, 120), (60, 60), 6)          # ~113 px = 11,300 µm²
    speck = _disk((120, 120), (10, 10), 2)        # ~13 px = 1,300 µm²
    tissue_px = (big & ~hole) | speck
    mask_rgb[tissue_px] = (150, 60, 140)
    kw = dict(median_kernel_um=10.0, closing_um=0.0, saturation_threshold=0.2)
    filled = tissue.detect_tissue(mask_rgb, mpp, min_tissue_area_um2=5_000, min_hole_area_um2=20_000,
                                  keep_holes=False, **kw)
    assert not filled[10, 10]                      # speck below min tissue area removed
    assert filled[60, 60]                          # hole smaller than min hole area filled
    kept = tissue.detect_tissue(mask_rgb, mpp, min_tissue_area_um2=5_000, min_hole_area_um2=5_000,
                                keep_holes=True, **kw)
    assert not kept[60, 60]                        # hole above min hole area kept


def test_polygons_are_exact_and_scaled_to_level0():
    mask = np.zeros((40, 50), bool)
    mask[5:25, 10:40] = True
    mask[10:15, 20:30] = False                     # one hole
    mask[30:35, 2:6] = True                        # second region
    polygons = tissue.mask_to_polygons(mask, scale=4.0, origin=(100.0, 200.0))
    assert len(polygons) == 2
    first, second = polygons
    assert len(first) == 2 and len(second) == 1    # exterior + hole, then a plain rectangle
    for polygon in polygons:
        for ring in polygon:
            assert np.array_equal(ring[0], ring[-1])
    area = sum(tissue.polygon_area(p) for p in polygons)
    assert area == pytest.approx(mask.sum() * 16.0)
    xs, ys = first[0][:, 0], first[0][:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (100 + 10 * 4, 100 + 40 * 4, 200 + 5 * 4, 200 + 25 * 4)


def test_geojson_is_a_qupath_feature_collection(tmp_path):
    mask = _disk((64, 64), (32, 32), 20) & ~_disk((64, 64), (32, 32), 6)
    gj = tissue.tissue_geojson(tissue.mask_to_polygons(mask, scale=8.0), name="Tissue")
    text = json.dumps(gj)
    back = json.loads(text)
    assert back["type"] == "FeatureCollection" and len(back["features"]) == 1
    feature = back["features"][0]
    assert feature["geometry"]["type"] == "Polygon"
    assert len(feature["geometry"]["coordinates"]) == 2          # exterior + hole
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"]["name"] == "Tissue"
    assert feature["properties"]["measurements"]["area_px2"] == pytest.approx(mask.sum() * 64.0)


def test_qc_render_draws_outlines_without_touching_the_input():
    rgb = np.full((64, 64, 3), 230, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    polygons = tissue.mask_to_polygons(mask)
    out = tissue.render_qc(rgb, polygons, scale=1.0)
    assert out.shape == rgb.shape and (rgb == 230).all()
    green = (out[..., 1] == 255) & (out[..., 0] == 0)
    assert green[16, 16:48].any() and not green[32, 32]
    Image.fromarray(out).save(io.BytesIO(), "PNG")  # a valid RGB image PIL can encode

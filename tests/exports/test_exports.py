"""The four exports of one slide with a planted lesion: PNG overlay, pyramidal TIFF, QuPath
GeoJSON, top-k patches — read back the way a user's tools read them."""

from __future__ import annotations

import csv
import json
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.exports import export_heatmaps, get_colormap, patch_features, write_heatmap_tiff
from wsi_pipeline.exports.topk import read_patch
from wsi_pipeline.run.config import HeatmapConfig
from wsi_pipeline.slides import open_slide

from .conftest import PATCH_LEVEL0, lesion_mask

K = 4
CFG = HeatmapConfig(top_k=K, png_max_px=1024, colormap="jet", alpha=0.6)


@pytest.fixture(scope="module")
def exported(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("heatmaps")
    table = np.column_stack([planted["scores"], 1 - planted["scores"]])
    with open_slide(planted["slide"]) as slide:
        result = export_heatmaps(slide, planted["coords"], table, PATCH_LEVEL0, out, "lesion", CFG,
                                 score_names=["lesion score", "other"], patch_size_px=64)
        thumb = slide.thumbnail(CFG.png_max_px)
        info = {"dims": slide.dimensions, "mpp": slide.mpp}
    return {**planted, "out": out, "result": result, "thumb": thumb, **info}


def test_writes_every_export(exported):
    names = sorted(p.name for p in exported["out"].iterdir())
    assert names == ["lesion.geojson", "lesion.png", "lesion.tif", "lesion_topk"]


def test_top_scoring_patches_and_map_maximum_fall_inside_the_lesion(exported):
    top = np.argsort(-exported["scores"])[:K]
    assert (exported["fraction"][top] >= 0.5).all()
    smap = exported["result"].score_map
    r, c = np.unravel_index(np.nanargmax(smap.values), smap.shape)
    mask = lesion_mask(exported["slide"])
    d = smap.downsample
    assert mask[(r * d + d // 2) // 16, (c * d + d // 2) // 16]
    # Map pixels over lesion score higher than those over tissue without lesion.
    ys, xs = np.nonzero(smap.valid)
    in_lesion = mask[np.minimum((ys * d) // 16, mask.shape[0] - 1),
                     np.minimum((xs * d) // 16, mask.shape[1] - 1)]
    values = smap.values[ys, xs]
    assert values[in_lesion].mean() > values[~in_lesion].mean() + 0.3


def test_png_overlay_keeps_the_thumbnail_geometry_and_adds_a_colour_bar(exported):
    image = Image.open(exported["out"] / "lesion.png")
    x, y, w, h = (int(v) for v in image.info["heatmap_region"].split(","))
    th, tw = exported["thumb"].shape[:2]
    assert (x, y, w, h) == (0, 0, tw, th) and max(tw, th) == CFG.png_max_px
    w0, h0 = exported["dims"]
    assert abs(tw / th - w0 / h0) < 0.01
    assert image.size[0] >= tw and image.size[1] > th  # the colour bar panel below
    assert image.info["normalize"] == "rank" and image.info["colormap"] == "jet"
    rgb = np.asarray(image.convert("RGB"))
    region = rgb[:th, :tw].astype(int)
    # Blended only where patches are: glass far from tissue is the thumbnail itself.
    scale = w0 / tw
    covered = np.zeros((th, tw), dtype=bool)
    for cx, cy in exported["coords"]:
        covered[int(cy / scale):int(np.ceil((cy + PATCH_LEVEL0) / scale)),
                int(cx / scale):int(np.ceil((cx + PATCH_LEVEL0) / scale))] = True
    assert (~covered).sum() > 1000
    np.testing.assert_array_equal(region[~covered], exported["thumb"][~covered])
    # At the best patch the overlay is alpha-blended with the colormap's top colour.
    bx, by = exported["coords"][np.argmax(exported["scores"])] + PATCH_LEVEL0 // 2
    px, py = int(bx / scale), int(by / scale)
    expected = (1 - CFG.alpha) * exported["thumb"][py, px] + CFG.alpha * get_colormap("jet")[255]
    assert np.abs(region[py, px] - expected).max() <= 1
    # The colour bar runs through the colormap from end to end.
    panel = rgb[th:].reshape(-1, 3)
    for colour in get_colormap("jet")[[0, 128, 255]]:
        assert (np.abs(panel.astype(int) - colour).max(axis=1) <= 2).any()


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_pyramidal_tiff_opens_on_the_slides_geometry(exported, backend):
    with open_slide(exported["out"] / "lesion.tif", backend=backend) as tif:
        assert tif.dimensions == exported["dims"]
        assert tif.mpp == pytest.approx(exported["mpp"], rel=1e-9)
        assert tif.level_count > 1
        assert tif.level_dimensions[1] == (exported["dims"][0] // 4, exported["dims"][1] // 4)
        # The best patch (rank 100 %) is the colormap's top colour, exactly (lossless tiles).
        bx, by = exported["coords"][np.argmax(exported["scores"])] + PATCH_LEVEL0 // 2
        np.testing.assert_array_equal(tif.read_region((int(bx), int(by)), 0, (1, 1))[0, 0],
                                      get_colormap("jet")[255])
        np.testing.assert_array_equal(tif.read_region((int(bx), int(by)), 1, (1, 1))[0, 0],
                                      get_colormap("jet")[255])
        wx, wy = exported["coords"][np.argmin(exported["scores"])] + PATCH_LEVEL0 // 2
        np.testing.assert_array_equal(tif.read_region((int(wx), int(wy)), 0, (1, 1))[0, 0],
                                      get_colormap("jet")[0])
        # No patch in the corner: background.
        np.testing.assert_array_equal(tif.read_region((0, 0), 0, (1, 1))[0, 0], [255, 255, 255])


def test_tiff_is_streamed_not_held_in_memory(tmp_path):
    colours = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    tracemalloc.start()
    try:
        write_heatmap_tiff(tmp_path / "big.tif", colours, 64, (4096, 3072), 0.25)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * 4096 * 3072 * 3  # the level-0 image alone would be 36 MB
    with open_slide(tmp_path / "big.tif", backend="tiffslide") as tif:
        assert tif.dimensions == (4096, 3072) and tif.level_dimensions[1] == (1024, 768)
        np.testing.assert_array_equal(tif.read_region((64 * 10 + 5, 64 * 7 + 60), 0, (1, 1))[0, 0],
                                      colours[7, 10])


def _check_qupath_feature(feature, size_level0):
    assert feature["type"] == "Feature" and isinstance(feature["id"], str)
    geometry = feature["geometry"]
    assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 1
    ring = geometry["coordinates"][0]
    assert len(ring) == 5 and ring[0] == ring[-1]
    assert all(len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in ring)
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    assert max(xs) - min(xs) == size_level0 and max(ys) - min(ys) == size_level0
    props = feature["properties"]
    assert props["objectType"] in {"tile", "detection"}
    assert props["measurements"] and all(isinstance(v, (int, float)) and np.isfinite(v)
                                         for v in props["measurements"].values())
    cls = props["classification"]
    assert set(cls) == {"name", "color"} and isinstance(cls["name"], str)
    assert len(cls["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])


def test_geojson_is_a_qupath_feature_collection(exported):
    text = (exported["out"] / "lesion.geojson").read_text()
    data = json.loads(text)
    assert json.loads(json.dumps(data)) == data
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == len(exported["coords"])
    for f in features:
        _check_qupath_feature(f, PATCH_LEVEL0)
    assert len({f["id"] for f in features}) == len(features)
    # Level-0 px: the first ring starts at the patch's top-left; measurements are the raw scores.
    first = features[0]
    assert first["geometry"]["coordinates"][0][0] == exported["coords"][0].tolist()
    m = first["properties"]["measurements"]
    assert set(m) == {"lesion score", "other", "lesion score (rank)"}
    assert m["lesion score"] == pytest.approx(exported["scores"][0])
    # Classes follow the normalised score: the best patch is "high", the worst "low".
    names = [f["properties"]["classification"]["name"] for f in features]
    assert names[int(np.argmax(exported["scores"]))] == "high"
    assert names[int(np.argmin(exported["scores"]))] == "low"
    assert set(names) == {"low", "medium", "high"}


def test_geojson_detections_and_fractional_coordinates():
    data = patch_features(np.array([[10, 20], [30, 40]]), 12.5, {"p": np.array([0.1, 0.9])},
                          np.array([0, 2]), object_type="detection")
    data = json.loads(json.dumps(data))
    for f in data["features"]:
        _check_qupath_feature(f, 12.5)
        assert f["properties"]["objectType"] == "detection"
    with pytest.raises(ValueError, match="NaN"):
        patch_features(np.array([[0, 0]]), 4, {"p": np.array([np.nan])}, np.array([0]))


def test_topk_folder_has_k_images_sorted_by_score(exported):
    folder = exported["out"] / "lesion_topk"
    rows = list(csv.DictReader(open(folder / "index.csv")))
    top = [r for r in rows if r["kind"] == "top"]
    bottom = [r for r in rows if r["kind"] == "bottom"]
    assert len(top) == len(bottom) == K
    assert len(list(folder.glob("top_*.png"))) == K and len(list(folder.glob("bottom_*.png"))) == K
    top_scores = [float(r["score"]) for r in top]
    assert top_scores == sorted(top_scores, reverse=True)
    assert top_scores[0] == pytest.approx(exported["scores"].max())
    bottom_scores = [float(r["score"]) for r in bottom]
    assert bottom_scores == sorted(bottom_scores)
    assert [int(r["rank"]) for r in top] == list(range(1, K + 1))
    assert top[0]["file"].startswith("top_01_score")
    with open_slide(exported["slide"]) as slide:
        for r in top[:2]:
            image = np.asarray(Image.open(folder / r["file"]))
            assert image.shape == (64, 64, 3)
            expected = read_patch(slide, (int(r["x"]), int(r["y"])), PATCH_LEVEL0, 64)
            np.testing.assert_array_equal(image, expected)
    # Top patches are lesion, bottom patches are not.
    mask = lesion_mask(exported["slide"])
    for r in top:
        assert mask[int(r["y"]) // 16 + 4, int(r["x"]) // 16 + 4] or float(r["score"]) > 0.5
    assert all(float(r["score"]) < 0.01 for r in bottom)


def test_rerun_replaces_outputs_atomically(exported, tmp_path):
    cfg = HeatmapConfig(top_k=2, png_max_px=256, exports=["topk", "png"], smooth_um=100.0, colormap="viridis")
    with open_slide(exported["slide"]) as slide:
        for _ in range(2):
            export_heatmaps(slide, exported["coords"], exported["scores"], PATCH_LEVEL0, tmp_path, "s", cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "s_topk"]
    assert len(list((tmp_path / "s_topk").glob("*.png"))) == 4

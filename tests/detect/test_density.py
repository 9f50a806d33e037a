"""Density maps: objects per mm² of tissue (kernel density with a tissue-normalised kernel), written
through the heatmap exports (PNG overlay, pyramidal TIFF on the slide's geometry)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from wsi_pipeline.detection.density import (HPF_SIGMA_UM, DensityGrid, density_map, density_paths,
                                            write_density_exports, write_slide_densities)
from wsi_pipeline.detection.outputs import CandidateWriter
from wsi_pipeline.slides import open_slide

from .conftest import write_slide

MPP = 0.5          # µm per level-0 px
W0, H0 = 4000, 2000  # 2 x 1 mm


def _grid_points(x0_um, x1_um, y0_um, y1_um, step_um):
    xs, ys = np.meshgrid(np.arange(x0_um + step_um / 2, x1_um, step_um),
                         np.arange(y0_um + step_um / 2, y1_um, step_um))
    return np.stack([xs.ravel(), ys.ravel()], axis=1) / MPP      # level-0 px


def test_uniform_objects_give_their_density_in_the_interior_and_at_the_tissue_edge():
    # Tissue: the left half (0-1000 µm), mask at 10 µm/px; one object per 20 x 20 µm = 2500 per mm².
    mask = np.zeros((100, 200), dtype=bool)
    mask[:, :100] = True
    smap = density_map(_grid_points(0, 1000, 0, 1000, 20.0), (W0, H0), MPP, mask, 10.0, sigma_um=100.0)
    d = smap.downsample
    row = smap.values[int(500 / MPP) // d]
    interior, edge = row[int(500 / MPP) // d], row[int(990 / MPP) // d]
    assert abs(interior - 2500) < 0.03 * 2500
    # Normalised by the smoothed tissue, not by the kernel: the field beside glass is not diluted
    # (a plain kernel estimate gives about half there).
    assert abs(edge - 2500) < 0.08 * 2500
    assert np.isnan(row[int(1500 / MPP) // d])                  # glass: no density
    assert smap.level0_wh == (W0, H0) and np.array_equal(smap.valid, ~np.isnan(smap.values))


def test_streamed_grid_equals_all_at_once_and_the_hotspot_is_where_the_cluster_is():
    mask = np.ones((100, 200), dtype=bool)
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(0, [W0, H0], (300, 2)), rng.normal([3000, 600], 60, (200, 2))])
    whole = density_map(pts, (W0, H0), MPP, mask, 10.0)
    grid = DensityGrid((W0, H0), MPP)
    for part in np.array_split(pts, 7):
        grid.add(part)
    streamed = grid.to_map(mask, 10.0)
    assert np.allclose(whole.values, streamed.values)
    r, c = np.unravel_index(np.nanargmax(whole.values), whole.shape)
    assert np.hypot(c * whole.downsample - 3000, r * whole.downsample - 600) < 150 / MPP
    assert round(HPF_SIGMA_UM) == 194   # 2 pi sigma² = one 0.237 mm² high-power field


def test_density_exports_open_as_overlay_and_pyramid_on_the_slide_geometry(tmp_path):
    rgb = np.full((H0 // 4, W0 // 4, 3), 230, dtype=np.uint8)     # a 2 µm/px "slide" of 2 x 1 mm
    slide_path = write_slide(tmp_path / "s.svs", rgb, mpp=2.0)
    cand = tmp_path / "s.candidates.csv"
    writer = CandidateWriter(cand, ["nucleus", "mitosis"])
    keep = np.array([[700.0, 200.0], [710.0, 205.0], [690.0, 195.0]])    # level-0 px of the 2 µm/px slide
    writer(keep, np.full(3, 0.9), np.ones(3, dtype=np.int64))
    writer(np.array([[100.0, 400.0]]), np.array([0.2]), np.array([1]))   # below the threshold: not counted
    writer(np.array([[100.0, 100.0]]), np.array([0.9]), np.array([0]))   # a nucleus: another map
    writer.commit()
    mask = np.ones((100, 200), dtype=bool)
    paths = {"mitosis": density_paths(tmp_path, "s", "mitosis")}
    with open_slide(slide_path) as slide:
        top = write_slide_densities(cand, slide, mask, 10.0, slide_id="s", paths=paths, sigma_um=100.0,
                                    thresholds={"nucleus": 0.5, "mitosis": 0.5}, png_max_px=256)
    # three mitoses in a sigma-100 µm Gaussian: peak 3 / (2 pi 0.1²) per mm² (tissue everywhere)
    assert abs(top["mitosis"] - 3 / (2 * np.pi * 0.01)) < 0.05 * top["mitosis"]
    png = Image.open(paths["mitosis"]["png"])
    assert png.text["density"] == "mitosis per mm2 of tissue"
    assert float(png.text["maxpermm2"]) == round(top["mitosis"], 4)
    with open_slide(paths["mitosis"]["tif"]) as tif:
        assert tif.dimensions == (W0 // 4, H0 // 4) and abs(tif.mpp - 2.0) < 1e-3
        image = np.asarray(tif.read_region((0, 0), 0, tif.dimensions))[..., :3]
    # the hottest colour (jet's dark red end) sits on the cluster, the far corner is cold (blue)
    hot = image[200, 700].astype(int)
    cold = image[450, 50].astype(int)
    assert hot[0] > 100 and hot[2] < 60 and cold[2] > 100 and cold[0] < 60
    assert not list(tmp_path.glob("*.tmp-*"))


def test_no_objects_draws_an_empty_scale(tmp_path):
    rgb = np.full((250, 500, 3), 230, dtype=np.uint8)
    slide_path = write_slide(tmp_path / "e.svs", rgb, mpp=2.0)
    smap = density_map(np.zeros((0, 2)), (500, 250), 2.0, np.ones((50, 100), dtype=bool), 10.0)
    assert np.nanmax(smap.values) == 0
    with open_slide(slide_path) as slide:
        top = write_density_exports(slide, smap, density_paths(tmp_path, "e", "mitosis"), slide_id="e",
                                    class_name="mitosis", sigma_um=HPF_SIGMA_UM, png_max_px=128)
    assert top == 0.0
    assert (tmp_path / "e.mitosis.density.png").is_file() and (tmp_path / "e.mitosis.density.tif").is_file()

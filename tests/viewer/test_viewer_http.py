"""The viewer's HTTP endpoints on a small run folder (one real slide, heatmap exports written by
wsi_pipeline.exports, a tissue polygon, detections): what it serves, and that every bad request
(traversal, symlink escape, unknown slide, bad tile address, too deep a level, write methods) is
a 4xx with a one-line message, never a traceback or a byte of a file outside the run; Deep Zoom
tiles equal the slide's own pixels; the report's curves against sklearn; the report folder swap."""

from __future__ import annotations

import http.client
import json
import threading

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.exports import export_heatmaps
from wsi_pipeline.run.config import HeatmapConfig
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.slides import open_slide
from wsi_pipeline.viewer.deepzoom import DeepZoom, TileRequestError
from wsi_pipeline.viewer.server import make_server

PATCH = 256
SECRET = "secret outside the run"


@pytest.fixture(scope="module")
def small_run(make_slide, tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    slide_path = make_slide("viewer_slide", positive=True, seed=5)
    manifest = root / "manifest.csv"
    manifest.write_text(f"slide_id,path,patient_id,label,cohort\nS1,{slide_path},P1,tumor,c1\n")
    run = root / "run"
    (run / "tiles").mkdir(parents=True)
    with open_slide(slide_path) as slide:
        w, h = slide.dimensions
        coords = np.array([(x, y) for y in range(0, h - PATCH + 1, PATCH) for x in range(0, w - PATCH + 1, PATCH)])
        scores = coords[:, 0].astype(np.float64) + 1e-3 * coords[:, 1]   # rises left to right
        cfg = HeatmapConfig(exports=["png", "geojson", "topk"], top_k=2, png_max_px=256)
        result = export_heatmaps(slide, coords, scores, PATCH, run / "heatmaps" / "m1", "S1", cfg)
    (run / "heatmaps" / "m1" / "S1.done.json").write_text(json.dumps({
        "score": "score", "normalize": "rank", "patch_size_level0": PATCH,
        "map_downsample": int(result.score_map.downsample)}))
    ring = [[100, 100], [900, 100], [900, 700], [100, 700], [100, 100]]
    (run / "tiles" / "S1.tissue.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {}}]}))
    (run / "detect" / "det").mkdir(parents=True)
    (run / "detect" / "det" / "S1.csv").write_text("x,y,class,score\n300.00,400.00,mitosis,0.9000\n"
                                                   "1200.50,800.00,nucleus,0.7000\n")
    (run / "report").mkdir()
    (run / "report" / "index.html").write_text("<html>report</html>")
    # What must never be served: a file beside the run, reached by a symlink inside it.
    outside = root / "outside.txt"
    outside.write_text(SECRET)
    (run / "report" / "leak.txt").symlink_to(outside)
    (run / "heatmaps" / "evil").symlink_to(root, target_is_directory=True)
    server = make_server(run, load_manifest(manifest), port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"run": run, "slide": slide_path, "port": server.server_address[1], "size": (w, h)}
    server.shutdown()
    server.server_close()
    server.viewer_state.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body, r.getheader("Content-Type") or ""


def test_serves_page_slides_tiles_and_overlays(small_run):
    port = small_run["port"]
    status, body, _ = get(port, "/")
    assert status == 200 and b"openseadragon.min.js" in body
    status, body, ctype = get(port, "/static/openseadragon.min.js")
    assert status == 200 and "javascript" in ctype and b"OpenSeadragon" in body[:2000]
    assert b"Redistribution and use in source and binary forms" in get(port, "/static/LICENSE-openseadragon.txt")[1]
    slides = json.loads(get(port, "/api/slides")[1])["slides"]
    assert [s["slide_id"] for s in slides] == ["S1"]
    assert slides[0]["heatmaps"] == ["m1"] and slides[0]["detections"] == ["det"] and slides[0]["tissue"]
    status, body, _ = get(port, "/slides/S1.dzi")
    w, h = small_run["size"]
    assert status == 200 and f'Width="{w}" Height="{h}"'.encode() in body
    status, body, ctype = get(port, "/slides/S1_files/11/0_0.jpeg")
    assert status == 200 and ctype == "image/jpeg" and body[:2] == b"\xff\xd8"
    # Heatmap: RGBA on the score map grid, opaque over scored patches, rising left to right.
    status, body, _ = get(port, "/overlay/S1/heatmap/m1.png")
    info = json.loads(get(port, "/overlay/S1/heatmap-info/m1.json")[1])
    image = np.asarray(Image.open(__import__("io").BytesIO(body)))
    assert status == 200 and image.shape == (info["map_height"], info["map_width"], 4)
    assert (image[..., 3] == 255).mean() > 0.5
    det = json.loads(get(port, "/overlay/S1/detections/det.json")[1])
    assert det["points"] == [[300.0, 400.0, 0, 0.9], [1200.5, 800.0, 1, 0.7]]
    assert det["classes"] == ["mitosis", "nucleus"] and len(det["colours"]) == 2
    rings = json.loads(get(port, "/overlay/S1/tissue.json")[1])["rings"]
    assert rings == [[[100.0, 100.0], [900.0, 100.0], [900.0, 700.0], [100.0, 700.0], [100.0, 100.0]]]
    assert get(port, "/report/index.html")[:2] == (200, b"<html>report</html>")


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/report/../config.yaml", "/report/%2e%2e/%2e%2e/outside.txt", "/report/leak.txt",
    "/heatmaps/evil/outside.txt", "/overlay/S1/heatmap/evil.png", "/overlay/S1/heatmap/..%2f..%2foutside.png",
    "/static/../server.py", "/static/viewer.html%00", "/static/%2e%2e%2fserver.py", "/report/..%5c..%5coutside.txt",
    "/slides/NOPE.dzi", "/slides/..%2fS1.dzi", "/slides/S1_files/12/0_0.jpeg", "/slides/S1_files/999/0_0.jpeg",
    "/slides/S1_files/11/99_0.jpeg", "/slides/S1_files/11/0_-1.jpeg", "/slides/S1_files/11/a_b.jpeg",
    "/slides/S1_files/11/0_0.png", "/slides/S1_files/99999999999/0_0.jpeg", "/overlay/S1/lesion.json",
    "/overlay/NOPE/tissue.json", "/overlay/S1/detections/nope.json", "/overlay/S1", "/nothing", "//etc/passwd",
])
def test_bad_requests_are_4xx_and_never_leak(small_run, path):
    status, body, _ = get(small_run["port"], path)
    assert 400 <= status < 500, (path, status)
    assert SECRET.encode() not in body and b"Traceback" not in body
    assert body.count(b"\n") <= 1


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_write_methods_are_refused(small_run, method):
    status, _, _ = get(small_run["port"], "/report/index.html", method=method)
    assert status == 405
    assert (small_run["run"] / "report" / "index.html").read_text() == "<html>report</html>"


def test_deep_zoom_tiles_are_the_slides_pixels(small_run):
    with open_slide(small_run["slide"]) as slide:
        dz = DeepZoom(slide)
        w, h = slide.dimensions
        assert dz.max_level == int(np.ceil(np.log2(max(w, h))))
        # Full resolution: tile (1, 1) is level-0 pixels [253, 509) x [253, 509) (overlap 1).
        np.testing.assert_array_equal(dz.tile_rgb(dz.max_level, 1, 1), slide.read_region((253, 253), 0, (256, 256)))
        # A quarter of the resolution is the slide's level 1 (downsample 4) as it is; half is level 0
        # area-averaged 2:1.
        assert slide.level_downsamples[1] == 4
        np.testing.assert_array_equal(dz.tile_rgb(dz.max_level - 2, 0, 0), slide.read_region((0, 0), 1, (255, 255)))
        half = Image.fromarray(slide.read_region((0, 0), 0, (510, 510))).resize((255, 255), Image.Resampling.BOX)
        np.testing.assert_array_equal(dz.tile_rgb(dz.max_level - 1, 0, 0), np.asarray(half))
        # The whole slide at the level where it fits one tile; partial last tiles have the right size.
        cols, rows = dz.tile_grid(dz.max_level)
        assert dz.tile_rgb(dz.max_level, cols - 1, rows - 1).shape[:2] == (h - (rows - 1) * 254 + 1,
                                                                          w - (cols - 1) * 254 + 1)
        for bad in [(dz.max_level + 1, 0, 0), (-1, 0, 0), (dz.max_level, cols, 0), (0, 1, 0)]:
            with pytest.raises(TileRequestError):
                dz.tile_box(*bad)


def test_curves_match_sklearn_and_bands_hold_the_curve():
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    from wsi_pipeline.report import curves

    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    score = np.round(y * 0.6 + rng.random(60), 2)     # ties included
    groups = np.repeat(np.arange(30), 2)
    fpr, tpr = curves.roc_points(y, score)
    ref_fpr, ref_tpr, _ = roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert abs(curves.average_precision(y, score) - average_precision_score(y, score)) < 1e-12
    c = curves.curves_with_bands(y, score, groups, n_bootstrap=100, seed=1)
    assert abs(curves.binary_auc_of(c["roc"]) - roc_auc_score(y, score)) < 1e-12
    assert c["roc"].n_bootstrap == 100
    on_grid = curves._roc_on_grid(fpr, tpr)
    assert (c["roc"].low <= on_grid + 1e-9).mean() > 0.95 and (c["roc"].high >= on_grid - 1e-9).mean() > 0.95
    assert (c["roc"].high - c["roc"].low).max() > 0.05
    bins = curves.calibration_bins(y, np.clip(score, 0, 1), n_bins=5)
    assert sum(b["n"] for b in bins) == 60
    np.testing.assert_array_equal(curves.confusion([0, 1, 1], [0, 0, 1], 2), [[1, 0], [1, 1]])


def test_report_folder_is_swapped_whole(small_run, tmp_path):
    """A report over a run with heatmaps only: written into a temp folder, then renamed over the
    old one; no temp is left, the old files are gone, the page stands alone (assets beside it)."""
    import shutil

    from wsi_pipeline.report import build_report

    run = tmp_path / "run"
    shutil.copytree(small_run["run"], run, symlinks=True)
    (run / "report" / "leak.txt").unlink()
    (run / "heatmaps" / "evil").unlink()
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path,patient_id,label,cohort\nS1,{small_run['slide']},P1,tumor,c1\n")
    index = build_report(run, load_manifest(manifest))
    html = index.read_text()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("report")) == ["report"]
    assert not (run / "report" / "leak.txt").exists()
    for src in __import__("re").findall(r'src="(assets/[^"]+)"', html):
        assert (index.parent / src).is_file(), src
    assert 'src="assets/S1.m1.heatmap.png"' in html and html.count('class="patch"') == 4
    assert "http://127.0.0.1:8000/#slide=S1" in html
    assert json.loads((run / "report" / "run.json").read_text())["manifest"] == str(manifest.resolve())

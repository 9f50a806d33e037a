"""Checks of the run report and the slide viewer in headless Chromium (tests/browser.py), on the run
test_workflow.py's workflow made (its report was written by the workflow's report rule).

Report: every plot is an SVG with a size on the page, every image loads, the slide table sorts on
a click (numbers as numbers, both directions) and filters. Viewer: a slide at two zoom levels with
the heatmap layer on and off (the screenshots must differ over the slide, in several colours), and
detection points drawn at the screen positions computed here from the page layout and the CSV.
With WSI_PIPELINE_SCREENSHOTS=DIR set, the screenshots the README shows are saved there.
"""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from tests.browser import Chromium, browser_or_skip

WIDTH, HEIGHT = 1200, 800
SIDE_PX = 320          # the viewer's slide area starts here (static/viewer.css)
PLANTED = [(300.0, 250.0, "mitosis"), (700.0, 500.0, "nucleus"), (520.0, 380.0, "mitosis")]


def _save(png: bytes, name: str, width: int) -> None:
    folder = os.environ.get("WSI_PIPELINE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
    image.quantize(colors=128).save(Path(folder) / name, optimize=True)


def check_report(browser: Chromium, run: Path, slides: list[str]) -> None:
    index = run / "report" / "index.html"
    browser.goto(index.as_uri())
    widths = browser.evaluate("Array.from(document.querySelectorAll('figure.plot svg'))"
                              ".map(s => s.getBoundingClientRect().width)")
    # ROC, PR, calibration, confusion, loss curves of the one model x cohort.
    assert len(widths) >= 5 and min(widths) > 100, widths
    images = browser.evaluate("Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.src])")
    assert images and all(ok for ok, _ in images), [src for ok, src in images if not ok]
    assert browser.evaluate("document.querySelectorAll('#slides tbody tr').length") == len(slides)

    column = browser.evaluate("Array.from(document.querySelectorAll('#slides thead th'))"
                              ".findIndex(th => th.textContent.startsWith('P ('))")
    assert column > 0
    read = (f"Array.from(document.querySelectorAll('#slides tbody tr'))"
            f".map(r => parseFloat(r.cells[{column}].textContent))")
    before = browser.evaluate(read)
    browser.evaluate(f"document.querySelectorAll('#slides thead th')[{column}].click()")
    ascending = browser.evaluate(read)
    browser.evaluate(f"document.querySelectorAll('#slides thead th')[{column}].click()")
    descending = browser.evaluate(read)
    assert ascending == sorted(before) and descending == sorted(before, reverse=True)
    assert len(set(before)) > 1, before   # a sort that could show nothing is no check
    browser.evaluate("(() => { const b = document.querySelector('input.filter'); b.value = "
                     f"{json.dumps(slides[1].lower())}; b.dispatchEvent(new Event('input')); }})()")
    shown = browser.evaluate("Array.from(document.querySelectorAll('#slides tbody tr'))"
                             ".filter(r => r.style.display !== 'none').map(r => r.cells[0].textContent)")
    assert shown == [slides[1]]
    browser.evaluate("(() => { const b = document.querySelector('input.filter'); b.value = ''; "
                     "b.dispatchEvent(new Event('input')); })()")
    browser.evaluate("window.scrollTo(0, 0)")
    _save(browser.screenshot()[1], "report.png", 800)


def _shot(browser: Chromium, action: str) -> np.ndarray:
    """Run `action` (JS returning a promise that settles when the page is drawn), then screenshot."""
    browser.evaluate(action)
    return browser.screenshot()


def _home_transform(level0_wh: tuple[int, int]) -> tuple[float, float, float]:
    """(offset x, offset y, scale) of OpenSeadragon's home view: the whole slide fitted and centred
    in the slide area (the page's layout), computed here, not asked from the page."""
    area_w, area_h = WIDTH - SIDE_PX, HEIGHT
    scale = min(area_w / level0_wh[0], area_h / level0_wh[1])
    return SIDE_PX + (area_w - level0_wh[0] * scale) / 2, (area_h - level0_wh[1] * scale) / 2, scale


def check_viewer(browser: Chromium, run: Path, manifest, slide_id: str) -> None:
    from wsi_pipeline.slides import open_slide
    from wsi_pipeline.viewer.server import make_server

    record = manifest.by_id()[slide_id]
    with open_slide(record.path) as slide:
        level0_wh = slide.dimensions
    # Detections this test plants: the viewer must draw them where the CSV says.
    det = run / "detect" / "planted"
    det.mkdir(parents=True, exist_ok=True)
    (det / f"{slide_id}.csv").write_text("x,y,class,score\n" + "".join(
        f"{x:.2f},{y:.2f},{c},0.9000\n" for x, y, c in PLANTED))
    server = make_server(run, manifest, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        browser.goto(f"http://127.0.0.1:{port}/#slide={slide_id}&layers=heatmap,detections&op-heatmap=100"
                     f"&op-detections=100", ready="document.body && document.body.dataset.ready === '1'")
        area = (slice(0, HEIGHT), slice(SIDE_PX, WIDTH))
        home_on, _ = browser.screenshot()
        home_off, _ = _shot(browser, "wsiViewer.show('heatmap', false)")
        cx, cy = _top_patch_centre(run, slide_id)
        zoom = ("(() => { const v = wsiViewer.viewer, it = v.world.getItemAt(0); v.viewport.zoomTo(3, null, true); "
                f"v.viewport.panTo(it.imageToViewportCoordinates({cx}, {cy}), true); return wsiViewer.settled(); }})()")
        zoom_off, _ = _shot(browser, zoom)
        zoom_on, _ = _shot(browser, "wsiViewer.show('heatmap', true)")
        for name, with_heat, without in [("home", home_on, home_off), ("zoom 3", zoom_on, zoom_off)]:
            changed = np.abs(with_heat[area].astype(int) - without[area].astype(int)).sum(axis=2) > 60
            assert changed.mean() > 0.05, (name, changed.mean())
            colours = {tuple(c // 32) for c in with_heat[area][changed]}
            assert len(colours) >= 4, (name, len(colours))   # a colour scale, not one flat colour
        assert np.abs(zoom_off[area].astype(int) - home_off[area].astype(int)).mean() > 10   # it did zoom

        # Detections at home view, where the CSV's level-0 points land on the page's layout.
        image = home_off
        ox, oy, scale = _home_transform(level0_wh)
        reported = browser.evaluate("document.getElementById('vector').dataset.transform").split(",")
        assert abs(float(reported[2]) - 3 * scale) < 1e-3   # now zoomed 3x
        legend = browser.evaluate("document.getElementById('legend').textContent")
        assert "mitosis" in legend and "nucleus" in legend
        from wsi_pipeline.detection.outputs import PALETTE

        order = list(dict.fromkeys(c for _, _, c in PLANTED))
        for x, y, cls in PLANTED:
            px, py = int(round(ox + x * scale)), int(round(oy + y * scale))
            patch = image[py - 1:py + 2, px - 1:px + 2].reshape(-1, 3).astype(int)
            expected = np.array(PALETTE[order.index(cls)])
            assert np.abs(patch - expected).max() <= 12, (cls, x, y, patch.tolist())
        # Away from every point the page shows the slide, not a detection colour.
        far = image[20, SIDE_PX + 5].astype(int)
        assert all(np.abs(far - np.array(PALETTE[i])).max() > 40 for i in range(2))

        if os.environ.get("WSI_PIPELINE_SCREENSHOTS"):
            browser.evaluate("(() => { const v = wsiViewer.viewer; v.viewport.goHome(true); "
                             "document.getElementById('op-heatmap').value = 45; "
                             "['tissue', 'lesion'].forEach(k => document.getElementById('on-' + k).checked = true); "
                             "return wsiViewer.show('heatmap', true); })()")
            _save(browser.screenshot()[1], "viewer.png", 800)
    finally:
        server.shutdown()
        server.server_close()
        server.viewer_state.close()


def _top_patch_centre(run: Path, slide_id: str) -> tuple[float, float]:
    """Level-0 centre of the highest-scoring patch (heatmap GeoJSON)."""
    model_dirs = sorted(p for p in (run / "heatmaps").iterdir() if (p / f"{slide_id}.geojson").is_file())
    done = json.loads((model_dirs[0] / f"{slide_id}.done.json").read_text())
    features = json.loads((model_dirs[0] / f"{slide_id}.geojson").read_text())["features"]
    key = f"{done['score']} ({done['normalize']})"
    best = max(features, key=lambda f: f["properties"]["measurements"][key])
    ring = np.array(best["geometry"]["coordinates"][0], dtype=float)
    return float(ring[:-1, 0].mean()), float(ring[:-1, 1].mean())


def check_report_and_viewer(workflow_run) -> None:
    from wsi_pipeline.run.manifest import load_manifest

    executable = browser_or_skip()
    run = Path(workflow_run["run"])
    manifest = load_manifest(workflow_run["manifest"])
    slides = sorted(r.slide_id for r in manifest)
    assert (run / "logs" / "snakemake" / "report.log").is_file()   # written by the workflow's rule
    with Chromium(executable, WIDTH, HEIGHT) as browser:
        check_report(browser, run, slides)
        positive = next(r.slide_id for r in manifest if r.label == "tumor")
        check_viewer(browser, run, manifest, positive)

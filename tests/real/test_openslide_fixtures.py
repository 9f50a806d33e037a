"""openslide-python's own test fixtures through our readers and stages, each with its documented
outcome (also in the README, "Development"):

| file              | what it is                                  | outcome here                                   |
|-------------------|---------------------------------------------|------------------------------------------------|
| small.svs         | 16×16 px Aperio SVS, one 64 px JPEG tile    | opens with both backends, both readers equal  |
| boxes.tiff        | 4-level deflate-tiled TIFF, 72 dpi tags     | refused without an mpp (72 dpi is no scanner's);|
|                   |                                             | with the manifest's mpp: every level reads,   |
|                   |                                             | level 0 equals boxes.png to the bit           |
| boxes_0.dcm       | DICOM WSI (with boxes_1.dcm)                | OpenSlide reads it (the small.svs pixels);    |
|                   |                                             | tiffslide: a clear error; region reader only; |
|                   |                                             | tile + extract give small.svs's features      |
| unreadable.svs    | opens, its JPEG tile is corrupt             | one error naming slide and file; batch goes on|
| unopenable.tiff   | TIFF in compression 52479                   | one error with OpenSlide's reason             |
| 😐.svs            | small.svs under a non-ASCII name            | tile and extract as small.svs, same features  |
"""

from __future__ import annotations

import csv
import logging

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from wsi_pipeline.cli import main
from wsi_pipeline.encoders import create_encoder
from wsi_pipeline.errors import SlideError
from wsi_pipeline.features.patches import PatchDataset, PatchSource, extract_features, plan_reader
from wsi_pipeline.slides import open_slide

SMILEY = "\N{NEUTRAL FACE}.svs"
BACKENDS = ["openslide", "tiffslide"]


def _readers(path, backend, coords, read_px, out_px, mpp=None):
    """(direct or None, region, reader name, note) PatchSources of `coords` on `path`."""
    with open_slide(path, backend=backend, mpp_override=mpp) as slide:
        opened = slide.level_dimensions, slide.level_downsamples, slide.backend_name, slide.vendor
    region = PatchSource(str(path), "s", backend, mpp, np.asarray(coords, dtype=np.int64), 0, read_px, out_px)
    planned, reader, note = plan_reader(region, *opened)
    return planned, region, reader, note


def _pixels(source):
    return PatchDataset(source).__getitems__(list(range(len(source.coords))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_svs_opens_and_both_readers_agree(openslide_fixtures, backend):
    path = openslide_fixtures / "small.svs"
    with open_slide(path, backend=backend) as slide:
        assert slide.dimensions == (16, 16) and slide.level_count == 1
        assert (slide.mpp, slide.mpp_source) == (0.499, "openslide.mpp-x")
        pixels = slide.read_region((0, 0), 0, (16, 16))
    assert pixels.shape == (16, 16, 3) and 150 < pixels.mean() < 250 and pixels.std() > 5
    direct, region, reader, note = _readers(path, backend, [(0, 0), (8, 8), (-4, 3)], 16, 16)
    assert reader == "direct", note
    for a, b in zip(_pixels(direct), _pixels(region)):
        assert torch.equal(a, b)
    with open_slide(path, backend="openslide" if backend == "tiffslide" else "tiffslide") as other:
        np.testing.assert_array_equal(other.read_region((0, 0), 0, (16, 16)), pixels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiled_pyramidal_tiff_needs_an_mpp_then_reads_every_level(openslide_fixtures, backend):
    path = openslide_fixtures / "boxes.tiff"
    # Its resolution tags say 72 dpi (352.8 µm/px): an editor's default, not a scan's resolution.
    with pytest.raises(SlideError, match=r"boxes.*no resolution.*add an 'mpp' column"):
        open_slide(path, backend=backend)
    truth = np.asarray(Image.open(openslide_fixtures / "boxes.png").convert("RGB"))
    with open_slide(path, backend=backend, mpp_override=0.5) as slide:
        assert slide.level_dimensions == ((300, 250), (150, 125), (75, 62), (37, 31))
        assert (slide.mpp, slide.mpp_source) == (0.5, "manifest")
        np.testing.assert_array_equal(slide.read_level(0), truth)   # deflate: lossless
        for level in range(1, 4):
            assert slide.read_level(level).shape == slide.level_dimensions[level][::-1] + (3,)
    coords = [(0, 0), (40, 70), (250, 200), (290, 240)]   # across 64 px tiles, off the corner
    direct, region, reader, note = _readers(path, backend, coords, 64, 64, mpp=0.5)
    assert reader == "direct", note
    for a, b, (x, y) in zip(_pixels(direct), _pixels(region), coords):
        assert torch.equal(a, b)
        inside = a.permute(1, 2, 0).numpy()[:min(64, 250 - y), :min(64, 300 - x)]
        np.testing.assert_array_equal(inside, truth[y:y + 64, x:x + 64])


def test_dicom_wsi_reads_through_openslide_only(openslide_fixtures):
    path = openslide_fixtures / "boxes_0.dcm"
    with open_slide(path) as slide:   # auto: OpenSlide 4 reads DICOM WSI
        assert (slide.backend_name, slide.vendor, slide.dimensions) == ("openslide", "dicom", (16, 16))
        assert slide.mpp == 0.499
        pixels = slide.read_region((0, 0), 0, (16, 16))
    with open_slide(openslide_fixtures / "small.svs") as svs:   # the same scan region, the same pixels
        np.testing.assert_array_equal(pixels, svs.read_region((0, 0), 0, (16, 16)))
    with pytest.raises(SlideError, match=r"boxes_0.*cannot open .*boxes_0\.dcm.*tiffslide: .*not a TIFF"):
        open_slide(path, backend="tiffslide")
    planned, region, reader, note = _readers(path, "openslide", [(0, 0), (4, 4)], 8, 8)
    assert reader == "openslide" and "dicom" in note   # not a TIFF: the region reader, saying why
    assert all(p.shape == (3, 8, 8) for p in _pixels(planned))


def test_corrupt_tile_is_one_error_naming_the_slide_for_both_readers(openslide_fixtures):
    path = openslide_fixtures / "unreadable.svs"
    with open_slide(path) as slide:   # the header is fine: it opens, its tile does not decode
        assert slide.dimensions == (16, 16)
        with pytest.raises(SlideError, match=r"'unreadable'.*unreadable\.svs: OpenSlideError: Bogus marker"):
            slide.read_region((0, 0), 0, (16, 16))
    encoder = create_encoder("stain_texture", "none")
    direct, region, reader, _ = _readers(path, "openslide", [(0, 0)], 16, 16)
    assert reader == "direct"
    for source in (direct, region):
        with pytest.raises(SlideError, match=r"slide 's'.*Bogus marker length"):
            extract_features(encoder, source, batch_size=4, num_workers=0)


def _write_manifest(path, rows):
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "path", "patient_id", "label", "cohort"],
                                  *[[sid, p, f"P{i}", "normal", "fx"] for i, (sid, p) in enumerate(rows)]])


def test_batch_goes_on_past_broken_files(openslide_fixtures, cmu_svs, tmp_path, capsys, caplog):
    """The real slide tiles; the corrupt and the unopenable file are one line each (slide, file,
    the reader's reason), in failures.csv too, no traceback; exit 1 (a failed slide)."""
    manifest, config, run = tmp_path / "m.csv", tmp_path / "c.yaml", tmp_path / "run"
    _write_manifest(manifest, [("corrupt", openslide_fixtures / "unreadable.svs"), ("real", cmu_svs),
                               ("unopenable", openslide_fixtures / "unopenable.tiff")])
    config.write_text("tiling:\n  target_mpp: 2.0\n  patch_size_px: 64\n")
    with caplog.at_level(logging.ERROR, logger="wsi_pipeline"):
        code = main(["tile", "--manifest", str(manifest), "--config", str(config), "--out", str(run),
                     "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1 and "1 done, 0 already complete, 2 failed" in out
    assert "Traceback" not in out + err + caplog.text
    assert all(r.exc_info is None for r in caplog.records)
    assert (run / "tiles" / "real.coords.h5").is_file()
    assert not (run / "tiles" / "corrupt.coords.h5").exists()
    with open(run / "failures.csv", newline="") as fh:
        failures = {row["slide_id"]: row["error"] for row in csv.DictReader(fh)}
    assert set(failures) == {"corrupt", "unopenable"}
    assert "unreadable.svs" in failures["corrupt"] and "Bogus marker length" in failures["corrupt"]
    # OpenSlide's reason survives even though tiffslide opened the file and only lacked an mpp.
    assert "Unsupported TIFF compression: 52479" in failures["unopenable"]
    for sid, error in failures.items():   # logged once each, as recorded
        assert [r.getMessage() for r in caplog.records if f"'{sid}'" in r.getMessage()] == [error]


def test_non_ascii_name_and_dicom_tile_and_extract_as_the_svs(openslide_fixtures, tmp_path):
    """😐.svs is small.svs byte for byte, and boxes_0.dcm holds the same pixels: the same coords and
    the same features under either name, and from the DICOM WSI (read by the region reader)."""
    manifest, config, run = tmp_path / "m.csv", tmp_path / "c.yaml", tmp_path / "run"
    _write_manifest(manifest, [("smiley", openslide_fixtures / SMILEY),
                               ("small", openslide_fixtures / "small.svs"),
                               ("dicom", openslide_fixtures / "boxes_0.dcm")])
    # One 16 px patch of a 16 px slide: at its own resolution, every grid position kept.
    config.write_text("tiling:\n  target_mpp: 0.499\n  patch_size_px: 16\n  min_tissue_fraction: 0.0\n"
                      "tissue:\n  mask_mpp: 0.499\n  min_tissue_area_um2: 0\n  median_kernel_um: 0\n"
                      "  closing_um: 0\nextract:\n  encoder: stain_texture\n  checkpoint: none\n"
                      "  num_workers: 0\n")
    base = ["--manifest", str(manifest), "--config", str(config), "--out", str(run), "--no-progress"]
    assert main(["tile", *base]) == 0
    assert main(["extract", *base]) == 0
    got = {}
    for sid in ("smiley", "small", "dicom"):
        with h5py.File(run / "features" / "stain_texture" / f"{sid}.h5", "r") as f:
            got[sid] = f["features"][:], f["coords"][:], f.attrs["patch_reader"]
    assert got["smiley"][1].tolist() == [[0, 0]] and got["smiley"][2] == got["small"][2] == "direct"
    assert got["dicom"][2] == "openslide"
    assert np.isfinite(got["small"][0]).all()
    for sid in ("smiley", "dicom"):
        np.testing.assert_array_equal(got[sid][0], got["small"][0])
        np.testing.assert_array_equal(got[sid][1], got["small"][1])

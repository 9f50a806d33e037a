import numpy as np
import pytest

from wsi_pipeline.errors import SlideError
from wsi_pipeline.slides import mpp_from_properties, open_slide
from wsi_pipeline.slides.tiff_writer import build_pyramid, write_aperio_tiff, write_plain_tiff


@pytest.mark.parametrize("compression", ["jpeg", "zlib"])
def test_backends_read_identical_pixels(make_slide, compression):
    path = make_slide(f"pix_{compression}", positive=True, seed=5, compression=compression)
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tiffslide") as b:
        assert a.vendor == "aperio" and b.vendor == "aperio"
        assert a.level_dimensions == b.level_dimensions and a.level_count >= 2
        assert a.level_downsamples == pytest.approx(b.level_downsamples)
        for xy, level, size in [((0, 0), 0, (300, 200)), ((777, 513), 0, (256, 256)),
                                ((1024, 1024), 1, (100, 80)), ((1900, 1400), 0, (300, 300))]:
            pa, pb = a.read_region(xy, level, size), b.read_region(xy, level, size)
            assert pa.shape == (size[1], size[0], 3) and pa.dtype == np.uint8
            np.testing.assert_array_equal(pa, pb)


def test_auto_backend_prefers_openslide_and_falls_back(make_slide, tmp_path):
    slide = open_slide(make_slide("auto"))
    assert slide.backend_name == "openslide"
    slide.close()
    # A plain RGB TIFF with no resolution: OpenSlide opens it as generic-tiff too; pass the mpp.
    rgb = np.full((300, 400, 3), 200, np.uint8)
    write_plain_tiff(tmp_path / "plain.tif", rgb, mpp=0.25)
    with open_slide(tmp_path / "plain.tif") as s:
        assert s.mpp == pytest.approx(0.25) and s.mpp_source in ("openslide.mpp-x", "tiff.XResolution")


def test_mpp_sources_and_override(make_slide):
    with open_slide(make_slide("mpp_aperio", mpp=0.5)) as s:
        assert (s.mpp, s.mpp_source) == (pytest.approx(0.5), "openslide.mpp-x")
    for backend in ("openslide", "tiffslide"):
        with open_slide(make_slide("mpp_tags", mpp_metadata="tiff-tags", mpp=0.25), backend=backend) as s:
            assert s.mpp == pytest.approx(0.25, rel=1e-4)
    none = make_slide("mpp_none", mpp_metadata="none")
    with pytest.raises(SlideError, match=r"slide 'S1'.*mpp"):
        open_slide(none, slide_id="S1")
    with open_slide(none, slide_id="S1", mpp_override=0.46) as s:
        assert (s.mpp, s.mpp_source) == (0.46, "manifest")
    # The manifest value wins over the file's own.
    with open_slide(make_slide("mpp_aperio", mpp=0.5), mpp_override=0.52) as s:
        assert s.mpp == 0.52
    with pytest.raises(SlideError, match="plausible"):
        open_slide(none, mpp_override=500.0)


def test_mpp_from_properties_rules():
    assert mpp_from_properties({"aperio.MPP": "0.2527"}) == (0.2527, "aperio.MPP")
    assert mpp_from_properties({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}) == (
        pytest.approx(0.25), "tiff.XResolution")
    assert mpp_from_properties({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"})[0] == pytest.approx(0.25)
    # 72 dpi is an editor default, not a microscope: untrusted.
    assert mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}) is None
    assert mpp_from_properties({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "none"}) is None
    assert mpp_from_properties({"openslide.mpp-x": "nan"}) is None


def test_read_region_outside_is_white_and_best_level(make_slide):
    with open_slide(make_slide("geom")) as s:
        w, h = s.dimensions
        outside = s.read_region((w - 10, h - 10), 0, (50, 40))
        assert outside[-20:, -30:].min() == 255          # beyond the scan: white glass
        assert s.best_level_for_mpp(0.5) == 0
        assert s.best_level_for_mpp(1.9) == 0            # 2.0 µm/px level is coarser than 1.9
        assert s.best_level_for_mpp(2.0) == 1
        assert s.best_level_for_mpp(1.97) == 1            # within 2% tolerance
        assert s.best_level_for_mpp(100) == s.level_count - 1
        thumb = s.thumbnail(256)
        assert max(thumb.shape[:2]) == 256 and thumb.dtype == np.uint8
        img, mpp = s.read_at_mpp(8.0)
        assert img.shape[1] == round(w * 0.5 / 8.0) and mpp == pytest.approx(8.0, rel=0.01)
        with pytest.raises(SlideError, match="level 7 out of range"):
            s.read_region((0, 0), 7, (10, 10))


def test_bad_files_give_one_clear_error(tmp_path, make_slide):
    with pytest.raises(SlideError, match=r"slide 'gone': file not found"):
        open_slide(tmp_path / "missing.svs", slide_id="gone")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide")
    with pytest.raises(SlideError, match=r"slide 'txt': cannot open .* \(openslide: .*; tiffslide: .*\)"):
        open_slide(text, slide_id="txt")
    good = make_slide("for_truncation")
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SlideError, match="slide 'trunc'"):
        s = open_slide(truncated, slide_id="trunc")
        s.read_region((0, 0), 0, (2000, 1500))  # if the header survived, reading must fail clearly
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(good, backend="bioformats")


def test_aperio_writer_levels_and_alpha_free_rgb(tmp_path):
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, 255, (1024, 1280, 3), dtype=np.uint8)
    write_aperio_tiff(tmp_path / "x.svs", build_pyramid(level0), mpp=0.25, compression="zlib")
    with open_slide(tmp_path / "x.svs") as s:
        assert s.vendor == "aperio" and s.level_dimensions == ((1280, 1024), (320, 256))
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (1280, 1024)), level0)
    assert not list(tmp_path.glob("*.tmp-*"))

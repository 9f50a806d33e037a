"""The source-agnostic core: the Source protocol, (N, k) coords in coords.h5 / features.h5, bags and
every MIL aggregator with k = 2 (slides) and k = 3 (volumes)."""

import h5py
import numpy as np
import pytest
import torch

from tests.models.small_models import make_small
from wsi_pipeline.errors import SlideError
from wsi_pipeline.features.features_h5 import features_h5_is_valid, read_features_h5, write_features_h5
from wsi_pipeline.models.mil import AGGREGATORS
from wsi_pipeline.models.mil.coord_scan import coords_scan_permutation
from wsi_pipeline.slides import open_slide
from wsi_pipeline.sources import Source, physical_extent
from wsi_pipeline.tiling.coords_h5 import coords_h5_is_valid, read_coords_h5, write_instance_coords_h5
from wsi_pipeline.training.bags import load_bag

K = [2, 3]


def _coords(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = rng.permutation(6 ** k)[:n]
    return np.stack(np.unravel_index(cells, (6,) * k), axis=1).astype(np.int64) * 16


def test_slide_is_a_source_and_read_box_is_a_level0_read(make_slide):
    with open_slide(make_slide("src", mpp=0.5)) as slide:
        assert isinstance(slide, Source)
        assert slide.source_id == slide.slide_id and slide.ndim == 2 and slide.spacing_unit == "um"
        assert slide.shape == slide.dimensions and slide.spacing == (pytest.approx(0.5),) * 2
        assert physical_extent(slide) == pytest.approx(tuple(n * 0.5 for n in slide.dimensions))
        np.testing.assert_array_equal(slide.read_box((100, 60), (40, 30)),
                                      slide.read_region((100, 60), 0, (40, 30)))


@pytest.mark.parametrize("k", K)
def test_coords_and_features_h5_round_trip_k(tmp_path, k):
    coords = _coords(20, k)
    write_instance_coords_h5(tmp_path / "c.h5", coords, np.ones(20), {"source_id": "v1"})
    back, attrs = read_coords_h5(tmp_path / "c.h5")
    np.testing.assert_array_equal(back, coords)
    assert attrs["coord_dims"] == k and attrs["n_patches"] == 20 and coords_h5_is_valid(tmp_path / "c.h5")
    features = np.random.default_rng(1).normal(size=(20, 5)).astype(np.float32)
    write_features_h5(tmp_path / "f.h5", features, coords, {"out_dim": 5})
    f, c, fattrs = read_features_h5(tmp_path / "f.h5")
    np.testing.assert_array_equal(c, coords)
    assert fattrs["coord_dims"] == k and features_h5_is_valid(tmp_path / "f.h5", coords=coords)
    with h5py.File(tmp_path / "f.h5") as h:          # CLAM/TRIDENT readers: plain datasets
        assert h["coords"].dtype == np.int64 and h["coords"].shape == (20, k)
    bag_features, bag_coords, _ = load_bag(tmp_path / "f.h5")
    assert bag_coords.shape == (20, k)


def test_coords_without_coord_dims_attr_read_as_2d_and_bad_k_is_refused(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as h:   # a file from before coord_dims
        h.create_dataset("features", data=np.zeros((3, 4), np.float32))
        h.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        h.attrs.update({"out_dim": 4, "n_patches": 3, "format_version": 1})
    assert read_features_h5(tmp_path / "old.h5")[2]["coord_dims"] == 2
    assert features_h5_is_valid(tmp_path / "old.h5")
    with pytest.raises(ValueError, match=r"\(N, 2\) or \(N, 3\)"):
        write_features_h5(tmp_path / "x.h5", np.zeros((3, 4)), np.zeros((3, 4)), {"out_dim": 4})
    with pytest.raises(ValueError, match=r"\(N, 2\) or \(N, 3\)"):
        write_instance_coords_h5(tmp_path / "x.h5", np.zeros((3, 1)), np.ones(3), {})
    # coords whose width disagrees with coord_dims: not a bag, the message names the slide
    with h5py.File(tmp_path / "bad.h5", "w") as h:
        h.create_dataset("features", data=np.zeros((3, 4), np.float32))
        h.create_dataset("coords", data=np.zeros((3, 3), np.int64))
        h.attrs.update({"out_dim": 4, "n_patches": 3, "format_version": 1, "coord_dims": 2})
    assert not features_h5_is_valid(tmp_path / "bad.h5")
    with pytest.raises(SlideError, match="bad.*coord_dims 2"):
        load_bag(tmp_path / "bad.h5", "bad")


@pytest.mark.parametrize("k", K)
@pytest.mark.parametrize("name", AGGREGATORS.list())
def test_every_aggregator_takes_k_it_declares_and_refuses_others(name, k):
    torch.manual_seed(0)
    meta = AGGREGATORS.get_metadata(name)
    model = make_small(name, 8, 2).eval()
    features = torch.randn(1, 12, 8)
    coords = torch.from_numpy(_coords(12, k)).float()[None]
    if k in meta["coord_dims"]:
        out = model(features, coords)
        assert out.logits.shape == (1, 2) and out.instance_scores.shape == (1, 12)
        assert torch.isfinite(out.logits).all()
        if not meta["uses_coords"]:
            with torch.no_grad():
                torch.testing.assert_close(model(features, coords).logits, model(features, None).logits)
    else:
        with pytest.raises(ValueError, match=rf"{name}.*k in .*3-D volume coords"):
            model(features, coords)


def test_coords_scan_permutation_is_raster_over_present_cells():
    # (i, j, k) voxel corners on a 2×2×2 grid of step 8, bag order shuffled, one cell missing
    cells = [(0, 0, 0), (8, 0, 0), (0, 8, 0), (8, 8, 0), (0, 0, 8), (8, 0, 8), (0, 8, 8)]
    shuffled = [cells[i] for i in (5, 2, 6, 0, 3, 1, 4)]
    coords = torch.tensor(shuffled)
    perm = coords_scan_permutation(coords, "zyx")          # slice (k) slowest, x (i) fastest
    assert [tuple(coords[p].tolist()) for p in perm] == cells
    perm = coords_scan_permutation(coords, "yxz")          # SegMamba's inter-slice: k fastest
    assert [tuple(coords[p].tolist()) for p in perm][:4] == [(0, 0, 0), (0, 0, 8), (8, 0, 0), (8, 0, 8)]
    rev = coords_scan_permutation(coords, "zyx_rev")
    assert [tuple(coords[p].tolist()) for p in rev] == cells[::-1]
    # 2-D slide coords are a depth-1 volume: row-major over the tissue
    xy = torch.tensor([(256, 0), (0, 256), (0, 0)])
    assert coords_scan_permutation(xy).tolist() == [2, 0, 1]


def test_mambamil_3d_depends_on_coords_not_on_bag_order():
    torch.manual_seed(0)
    model = make_small("mambamil_3d", 8, 2).eval()
    features = torch.randn(1, 30, 8)
    coords = torch.from_numpy(_coords(30, 3, seed=3)).float()[None]
    perm = torch.randperm(30)
    with torch.no_grad():
        out = model(features, coords)
        shuffled = model(features[:, perm], coords[:, perm])
    torch.testing.assert_close(out.logits, shuffled.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.instance_scores[:, perm], shuffled.instance_scores, atol=1e-6, rtol=1e-5)

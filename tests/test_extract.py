import pickle

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stages.extract import run_extract
from wsi_pipeline.cli import main
from wsi_pipeline.encoders import EncoderWeightsError, create_encoder, get_spec, list_encoders
from wsi_pipeline.features.patches import PatchDataset, PatchSource, _row_runs
from wsi_pipeline.run.config import config_from_dict
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.slides import open_slide

# Small patches keep the CPU encoder fast: 64 px at 2 µm/px (a 128 µm field of view).
TILE_CFG = "tiling:\n  target_mpp: 2.0\n  patch_size_px: 64\ntissue:\n  mask_mpp: 8.0\n"


def _random_input(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_registry_entries():
    assert {"resnet50_trunc", "vit_small_patch16", "vit_base_patch16", "vit_large_patch16"} <= set(list_encoders())
    assert get_spec("resnet50_trunc").out_dim == 1024
    assert get_spec("vit_large_patch16").native_mpp == 0.5
    assert get_spec("resnet18").out_dim == 512  # any timm name
    with pytest.raises(Exception, match="unknown encoder 'nope'"):
        get_spec("nope")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_checkpoint_reproduces_saved_model(tmp_path, fmt):
    torch.manual_seed(0)
    source = create_encoder("resnet50_trunc", "random")
    state = source.model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        # A torchvision-style full ResNet-50 checkpoint: layer4 + fc present, wrapped, DDP-prefixed.
        extra = {"layer4.0.conv1.weight": torch.zeros(512, 1024, 1, 1), "fc.weight": torch.zeros(1000, 2048)}
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in {**state, **extra}.items()}}, path)
    loaded = create_encoder("resnet50_trunc", path)
    x = _random_input()
    with torch.inference_mode():
        expected, got = source(x), loaded(x)
    assert got.shape == (3, 1024)
    torch.testing.assert_close(got, expected)
    assert loaded.weights_sha256 != "random" and len(loaded.weights_sha256) == 64


def test_wrong_or_unsafe_checkpoints_are_clear_errors(tmp_path):
    vit = create_encoder("vit_small_patch16", "random")
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.model.state_dict().items()}, str(path))
    with pytest.raises(EncoderWeightsError, match=r"does not fit the encoder: missing keys \(\d+\): .*unexpected keys"):
        create_encoder("resnet50_trunc", path)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"w": object()}))
    with pytest.raises(EncoderWeightsError, match="cannot read checkpoint"):
        create_encoder("resnet50_trunc", evil)
    with pytest.raises(EncoderWeightsError, match="checkpoint not found"):
        create_encoder("resnet50_trunc", tmp_path / "missing.pth")
    with pytest.raises(EncoderWeightsError, match="no weights given"):
        create_encoder("resnet50_trunc", None)
    with pytest.raises(EncoderWeightsError, match="local file"):
        create_encoder("uni_vit_l16", "hf-hub:MahmoodLab/uni")  # no hub here


@pytest.fixture(scope="module")
def tiled_run(demo_cohort, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = run / "c.yaml"
    cfg.write_text(TILE_CFG)
    assert main(["tile", "--manifest", str(demo_cohort), "--config", str(cfg), "--out", str(run),
                 "--no-progress"]) == 0
    return run


def _extract_cfg(checkpoint, **extract):
    return config_from_dict({"tiling": {"target_mpp": 2.0, "patch_size_px": 64},
                             "extract": {"encoder": "resnet18", "checkpoint": str(checkpoint),
                                         "batch_size": 16, "num_workers": 0, **extract}})


def test_features_equal_encoder_on_the_same_pixels(demo_cohort, tiled_run, tmp_path):
    torch.manual_seed(1)
    ckpt = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in create_encoder("resnet18", "random").model.state_dict().items()},
              str(ckpt))
    cfg = _extract_cfg(ckpt, num_workers=1)
    manifest = load_manifest(demo_cohort)
    report = run_extract(manifest, cfg, tiled_run, progress=False)
    assert report.ok and len(report.done) == len(manifest)
    encoder = create_encoder("resnet18", ckpt)
    record = manifest.records[0]
    # Read exactly as CLAM would: plain h5py.
    with h5py.File(tiled_run / "features" / "resnet18" / f"{record.slide_id}.h5", "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
        attrs = dict(f.attrs)
    with h5py.File(tiled_run / "tiles" / f"{record.slide_id}.coords.h5", "r") as f:
        np.testing.assert_array_equal(coords, f["coords"][:])
    assert feats.shape == (len(coords), 512) and feats.dtype == np.float32
    assert attrs["encoder"] == "resnet18" and attrs["out_dim"] == 512 and not attrs["random_weights"]
    assert attrs["target_mpp"] == 2.0 and attrs["patch_size"] == 64 and "torch" in attrs["versions"]
    # Direct: read the same patches with a fresh Slide, run the encoder by hand.
    idx = [0, len(coords) // 2, len(coords) - 1]
    with open_slide(record.path) as slide:
        patches = []
        for i in idx:
            level, size = int(attrs["patch_level"]), int(attrs["read_size_px"])
            patch = slide.read_region(tuple(coords[i]), level, (size, size))
            from PIL import Image
            patch = np.asarray(Image.fromarray(patch).resize((64, 64), Image.Resampling.BILINEAR))
            patches.append(torch.from_numpy(patch).permute(2, 0, 1))
    with torch.inference_mode():
        direct = encoder(torch.stack(patches)).numpy()
    np.testing.assert_allclose(feats[idx], direct, rtol=1e-4, atol=1e-4)


def test_resume_after_kill_and_skip_complete(demo_cohort, tiled_run, monkeypatch):
    cfg = _extract_cfg("random", encoder="resnet18")
    manifest = load_manifest(demo_cohort)
    out_dir = tiled_run / "features" / "resnet18"
    for f in out_dir.glob("*.h5"):
        f.unlink()
    # A run killed while writing the second slide's file: the write raises half-way.
    import wsi_pipeline.features.features_h5 as fh5

    real = h5py.File.create_dataset
    calls = {"n": 0}

    def dying(self, name, *a, **k):
        if name == "coords":
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill")
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", dying)
    with pytest.raises(KeyboardInterrupt):
        run_extract(manifest, cfg, tiled_run, progress=False)
    monkeypatch.undo()
    written = sorted(out_dir.glob("*.h5"))
    assert len(written) == 1 and not list(out_dir.glob("*.tmp-*"))  # no half-written file left
    first_mtime = written[0].stat().st_mtime_ns
    # A truncated file from an outside copy is not trusted either.
    (out_dir / f"{manifest.records[2].slide_id}.h5").write_bytes(b"\x89HDF\r\n")
    report = run_extract(manifest, cfg, tiled_run, progress=False)
    assert report.ok and report.skipped == [written[0].stem] and len(report.done) == len(manifest) - 1
    assert written[0].stat().st_mtime_ns == first_mtime
    with h5py.File(out_dir / f"{manifest.records[0].slide_id}.h5", "r") as f:
        assert f.attrs["random_weights"] and f.attrs["weights_sha256"] == "random"
    assert fh5.features_h5_is_valid(out_dir / f"{manifest.records[2].slide_id}.h5")
    # Everything complete: a rerun loads no model and does nothing.
    report = run_extract(manifest, cfg, tiled_run, progress=False)
    assert report.done == [] and len(report.skipped) == len(manifest)


def test_missing_coords_and_missing_checkpoint(demo_cohort, tmp_path, capsys):
    cfg = _extract_cfg("random")
    report = run_extract(load_manifest(demo_cohort), cfg, tmp_path / "empty_run", progress=False)
    assert len(report.failed) == 4
    assert all("run the tile stage first" in m for m in report.failed.values())
    assert main(["extract", "--manifest", str(demo_cohort), "--out", str(tmp_path / "r")]) == 2
    assert "extract.checkpoint is not set" in capsys.readouterr().err


def test_dataset_reopens_slide_per_process(demo_cohort, tiled_run):
    record = load_manifest(demo_cohort).records[0]
    with h5py.File(tiled_run / "tiles" / f"{record.slide_id}.coords.h5", "r") as f:
        coords, a = f["coords"][:4], dict(f["coords"].attrs)
    ds = PatchDataset(PatchSource(str(record.path), record.slide_id, "auto", None, coords,
                                  int(a["patch_level"]), int(a["read_size_px"]), 64))
    item = ds[0]
    assert item.dtype == torch.uint8 and item.shape == (3, 64, 64)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert torch.equal(batches[0][0], item)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("level,read,out", [(0, 64, 64), (1, 48, 32)])
def test_batched_row_reads_give_the_per_patch_pixels(make_slide, backend, level, read, out):
    """A batch read as row regions (`__getitems__`) equals reading each patch alone: overlapping and
    touching neighbours, gaps, a patch hanging off the slide's edge, off-grid x, duplicates, any order."""
    path = make_slide()
    with open_slide(path, backend=backend) as slide:
        ds_level = int(round(slide.level_downsamples[level]))
        width, height = slide.dimensions
    step = read * ds_level
    grid = [(x, y) for y in (0, step, 2 * step) for x in range(0, 40 * step // 2, step // 2)]  # overlap
    extra = [(width - step // 2, 0), (3 * step + 1, step), (0, height - step // 3), grid[5], (7 * step, 5 * step)]
    coords = np.array(grid + extra, dtype=np.int64)
    source = PatchSource(str(path), "s", backend, None, coords, level, read, out)
    ds = PatchDataset(source)
    indices = list(np.random.default_rng(0).permutation(len(coords))[:70]) + [len(coords) - 1]
    runs = _row_runs(coords[indices], step, ds_level)
    assert len(runs) < len(indices) / 3  # most patches really are cut from shared row reads
    batched = ds.__getitems__(indices)
    assert len(batched) == len(indices)
    for i, patch in zip(indices, batched):
        assert patch.shape == (3, out, out) and patch.dtype == torch.uint8
        assert torch.equal(patch, ds[i]), (i, coords[i])
    edge = batched[indices.index(len(grid))] if len(grid) in indices else ds.__getitems__([len(grid)])[0]
    assert (edge[:, :, -4:] == 255).all()  # beyond the slide: white, as per patch


def test_reader_and_batch_defaults_per_device(monkeypatch):
    from wsi_pipeline.features.patches import default_batch_size, default_workers

    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert default_workers(torch.device("cuda")) == 16 and default_workers(torch.device("cpu")) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_workers(torch.device("cuda")) == 1
    assert default_batch_size(torch.device("cpu")) == 32 and default_batch_size(torch.device("cuda")) == 256
    assert config_from_dict({"extract": {"batch_size": None}}).extract.batch_size is None
    with pytest.raises(Exception, match=r"extract.batch_size: must be >= 1 or null"):
        config_from_dict({"extract": {"batch_size": 0}})


def test_unreadable_slide_in_a_worker_is_one_clear_error_and_the_batch_goes_on(demo_cohort, tmp_path):
    """A slide truncated after tiling fails inside a DataLoader worker: the failure names the slide and
    the region, without the worker's traceback, and the other slides are still extracted."""
    import shutil

    cohort = tmp_path / "cohort"
    shutil.copytree(demo_cohort.parent, cohort)
    run = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(TILE_CFG)
    manifest_path = cohort / demo_cohort.name
    assert main(["tile", "--manifest", str(manifest_path), "--config", str(cfg_file), "--out", str(run),
                 "--no-progress"]) == 0
    manifest = load_manifest(manifest_path)
    bad = manifest.records[0]
    with open(bad.path, "r+b") as fh:
        fh.truncate(bad.path.stat().st_size // 2)
    cfg = config_from_dict({"tiling": {"target_mpp": 2.0, "patch_size_px": 64},
                            "extract": {"encoder": "stain_texture", "batch_size": 16, "num_workers": 1}})
    report = run_extract(manifest, cfg, run, progress=False)
    assert set(report.failed) == {bad.slide_id}
    assert len(report.done) == len(manifest) - 1
    message = report.failed[bad.slide_id]
    assert message.startswith(f"slide '{bad.slide_id}': the slide no longer matches its coords.h5"), message
    assert "Traceback" not in message
    assert not (run / "features" / "stain_texture" / f"{bad.slide_id}.h5").exists()


def test_read_error_in_a_worker_is_raised_as_the_slide_error(demo_cohort, tiled_run, tmp_path):
    """DataLoader re-raises a worker's exception as a RuntimeError carrying the worker's traceback;
    the read error comes back as data instead and is raised as the SlideError itself."""
    from wsi_pipeline.errors import SlideError
    from wsi_pipeline.features.patches import extract_features

    record = load_manifest(demo_cohort).records[0]
    coords = np.array([[0, 0], [256, 0]], dtype=np.int64)
    gone = PatchSource(str(tmp_path / "gone.svs"), record.slide_id, "auto", None, coords, 0, 64, 64)
    encoder = create_encoder("stain_texture", None)
    with pytest.raises(SlideError) as caught:
        extract_features(encoder, gone, batch_size=2, num_workers=1)
    assert str(caught.value) == f"slide '{record.slide_id}': file not found: {tmp_path / 'gone.svs'}"

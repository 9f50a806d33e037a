"""Tiling that fits the encoder: `tiling: auto`, the far-from-recommended warning (once per stage),
the resize and precision recorded in features.h5, `precision: auto`, and one tiling (coords.h5 made
once) serving several encoders."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import h5py
import pytest
import yaml

from stages.extract import run_extract
from stages.tile import run_tile
from wsi_pipeline.cli import main
from wsi_pipeline.encoders import ENCODERS, EncoderSpec, register_encoder
from wsi_pipeline.encoders.fit import effective_precision, tiling_fit_warning
from wsi_pipeline.encoders.vim4path import VisionMamba
from wsi_pipeline.errors import ConfigError
from wsi_pipeline.run.config import config_from_dict, load_config
from wsi_pipeline.run.manifest import load_manifest

AUTO = {"target_mpp": "auto", "patch_size_px": "auto"}


def _tiny_vim(**overrides):
    return VisionMamba(**{"embed_dim": 32, "depth": 1, "img_size": 32, **overrides})


@pytest.fixture(scope="module")
def tiny_encoders():
    """Two small Vim entries with recorded tilings: at the demo tiling (2 µm/px, 64 px) and far from it."""
    common = dict(build=_tiny_vim, out_dim=32, input_size_px=32, patch_size_px=16, resize_px=32,
                  interpolation="bicubic", antialias=True, recommended_patch_px=64, precision="bf16",
                  weights_license="test", output="middle class token", license="test", reference="test")
    specs = [EncoderSpec(name="test_vim_at_2um", native_mpp=2.0, **common),
             EncoderSpec(name="test_vim_at_1um", native_mpp=1.0, **common)]
    for spec in specs:
        register_encoder(spec)
    yield [s.name for s in specs]
    for spec in specs:   # the registry is process-wide: the README/preset tests must not see them
        ENCODERS._entries.pop(spec.name)


def test_auto_tiling_takes_the_encoders(tiny_encoders):
    cfg = config_from_dict({"tiling": AUTO, "extract": {"encoder": "vim4path_s"}})
    assert (cfg.tiling.target_mpp, cfg.tiling.patch_size_px) == (1.0, 224)
    explicit = config_from_dict({"tiling": {"target_mpp": 1.0, "patch_size_px": 224},
                                 "extract": {"encoder": "vit_small_patch16"}})
    # Same numbers, other encoder: the tile stage's hash is the same, so coords.h5 is shared.
    assert cfg.section_hash("tissue", "tiling") == explicit.section_hash("tissue", "tiling")
    mixed = config_from_dict({"tiling": {"target_mpp": "auto", "patch_size_px": 512},
                              "extract": {"encoder": "test_vim_at_2um"}})
    assert (mixed.tiling.target_mpp, mixed.tiling.patch_size_px) == (2.0, 512)


def test_auto_tiling_for_an_encoder_without_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tiling.target_mpp: auto .* 'resnet50_trunc' records none"):
        config_from_dict({"tiling": AUTO, "extract": {"encoder": "resnet50_trunc"}})
    with pytest.raises(ConfigError, match="tiling.patch_size_px must be an integer or auto, got 'big'"):
        config_from_dict({"tiling": {"patch_size_px": "big"}})


def test_far_tiling_warning_names_the_numbers():
    warning = tiling_fit_warning("vim4path_ti", 0.5, 512)
    assert "0.5 µm/px (the encoder's authors: 1 µm/px, 0.50x)" in warning
    assert "512 px tiles (the authors': 224 px)" in warning
    assert tiling_fit_warning("vim4path_ti", 0.8, 256) is None          # within 25 %
    assert tiling_fit_warning("resnet50_trunc", 0.25, 1024) is None     # records no recommendation
    assert tiling_fit_warning("resnet18", 0.25, 1024) is None           # a timm name


def test_precision_auto_is_the_encoders_on_gpu_and_fp32_on_cpu():
    assert effective_precision("auto", "vim4path_s", "cpu") == "fp32"
    assert effective_precision("auto", "vim4path_s", "cuda") == "fp32"   # the authors extract in fp32
    assert effective_precision("auto", "resnet18", "cuda") == "bf16"     # unregistered: as before
    assert effective_precision("fp16", "vim4path_s", "cpu") == "fp16"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_tiling_serves_two_encoders(tiny_encoders, demo_cohort, tmp_path, capsys):
    manifest = load_manifest(demo_cohort)
    slides = [r.slide_id for r in manifest.records[:2]]
    manifest = manifest.select(slides)
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump({
        "tissue": {"mask_mpp": 8.0}, "tiling": AUTO,
        "extract": {"encoder": "test_vim_at_2um", "checkpoint": "random", "num_workers": 0, "batch_size": 16}}))
    cfg = load_config(config)
    assert (cfg.tiling.target_mpp, cfg.tiling.patch_size_px) == (2.0, 64)
    run = tmp_path / "run"
    assert run_tile(manifest, cfg, run, progress=False).ok
    coords = [run / "tiles" / f"{s}.coords.h5" for s in slides]
    before = [(p.stat().st_mtime_ns, _sha(p)) for p in coords]

    report = run_extract(manifest, cfg, run, progress=False)
    assert report.ok and report.warnings == []   # the encoder's own tiling
    with h5py.File(run / "features" / "test_vim_at_2um" / f"{slides[0]}.h5", "r") as f:
        attrs = dict(f.attrs)
        assert f["features"].shape[1] == 32
    assert (attrs["resize_px"], attrs["resize_interpolation"], bool(attrs["resize_antialias"]), attrs["crop_px"]) \
        == (32, "bicubic", True, 0)
    assert (attrs["precision"], attrs["precision_requested"]) == ("fp32", "auto")   # CPU
    assert attrs["input_size_px"] == 64 and attrs["encoder_native_input_px"] == 32

    # A second encoder on the same run, through the CLI override: coords.h5 is reused as is.
    argv = ["extract", "--manifest", str(demo_cohort), "--config", str(config), "--out", str(run),
            "--slides", ",".join(slides), "--no-progress"]
    assert main([*argv, "--encoder", "stain_texture", "--checkpoint", "none"]) == 0
    with h5py.File(run / "features" / "stain_texture" / f"{slides[1]}.h5", "r") as f:
        assert f["features"].shape[1] == 60 and f.attrs["resize_px"] == 0 and f.attrs["resize_interpolation"] == "none"
    # One far from the tiling: warned once for the stage, not once per slide.
    capsys.readouterr()
    assert main([*argv, "--encoder", "test_vim_at_1um", "--checkpoint", "random"]) == 0
    err = capsys.readouterr().err
    assert err.count("encoder 'test_vim_at_1um': tiling at 2 µm/px (the encoder's authors: 1 µm/px, 2.00x)") == 1

    # Tiling again for another encoder with the same numbers, or with auto: nothing is redone.
    other = dataclasses.replace(cfg, extract=dataclasses.replace(cfg.extract, encoder="stain_texture",
                                                                 checkpoint="none"))
    assert run_tile(manifest, other, run, progress=False).skipped == slides
    assert run_tile(manifest, load_config(config), run, progress=False).skipped == slides
    assert [(p.stat().st_mtime_ns, _sha(p)) for p in coords] == before


def test_precision_auto_redoes_features_only_where_its_meaning_changed(tiny_encoders, tmp_path, monkeypatch):
    """`auto` used to be bf16 on GPU and fp32 on CPU for every encoder: features made so stay valid
    (same config hash) unless the encoder's recommendation now gives another autocast."""
    import torch

    import wsi_pipeline.devices
    from wsi_pipeline.features.extractor import Extractor
    from wsi_pipeline.run.folder import RunFolder

    def extractor(encoder, device):
        monkeypatch.setattr(wsi_pipeline.devices, "resolve_device", lambda name, what="": torch.device(device))
        cfg = config_from_dict({"extract": {"encoder": encoder, "checkpoint": "random"}})
        return Extractor(cfg, RunFolder(tmp_path), progress=False)

    def legacy_hash(encoder):   # extractor.config_hash before precisions were resolved
        payload = [encoder, "random", "auto", "float32", "tiling", "slide"]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]

    for encoder, device, precision, unchanged in [("test_vim_at_2um", "cpu", "fp32", True),
                                                  ("test_vim_at_2um", "cuda", "bf16", True),
                                                  ("vim4path_ti", "cuda", "fp32", False)]:
        e = extractor(encoder, device)
        assert e.precision == precision
        assert (e.config_hash("tiling", "slide") == legacy_hash(encoder)) is unchanged, (encoder, device)

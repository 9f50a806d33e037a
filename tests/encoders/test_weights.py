"""Loading the checkpoints users have (files, nestings, prefixes, DINOv2 layouts, hub snapshot
folders) offline without unpickling, and the error for a file of another model."""

from __future__ import annotations

import json
import re

import pytest

from wsi_pipeline.errors import PipelineError
import timm
import torch
from safetensors.torch import save_file

from wsi_pipeline.encoders import EncoderWeightsError, create_encoder, get_spec, list_encoders
from wsi_pipeline.encoders.registry import identify_checkpoint
from wsi_pipeline.encoders.weights import (checkpoint_sha256, describe_fit, fitting_encoders, meta_shapes,
                                           read_state_dict, state_for)

SKIP_INIT = {"weight_init": "skip"}


def _random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    model.load_state_dict({k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
                           for k, v in model.state_dict().items()})
    return model.eval()


def _shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _loads_back(name: str, model: torch.nn.Module, state: dict) -> None:
    """``state`` read the way create_encoder reads it gives ``model``'s tensors exactly."""
    expected = _shapes(model.state_dict())
    got = state_for(get_spec(name), state, expected)
    assert _shapes(got) == expected
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def small_vit():
    return _random(get_spec("kaiko_vits16").build(depth=1, **SKIP_INIT))


@pytest.mark.parametrize("layout", ["state_dict", "model+epoch", "teacher/module.", "trunk.", "backbone.",
                                    "visual.", "module.backbone.", "teacher: backbone.+dino_head"])
def test_release_nestings_and_prefixes_are_undone(tmp_path, small_vit, layout):
    sd = small_vit.state_dict()
    wrap = {
        "state_dict": lambda: {"state_dict": sd},
        "model+epoch": lambda: {"model": sd, "epoch": 12, "optimizer_name": "adamw"},
        "teacher/module.": lambda: {"teacher": {f"module.{k}": v for k, v in sd.items()}},
        "trunk.": lambda: {f"trunk.{k}": v for k, v in sd.items()},
        "backbone.": lambda: {f"backbone.{k}": v for k, v in sd.items()},
        "visual.": lambda: {f"visual.{k}": v for k, v in sd.items()},
        "module.backbone.": lambda: {f"module.backbone.{k}": v for k, v in sd.items()},
        "teacher: backbone.+dino_head": lambda: {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                                                             "dino_head.mlp.0.weight": torch.zeros(8, 384),
                                                             "dino_head.last_layer.weight_g": torch.ones(8, 1)}},
    }[layout]()
    path = tmp_path / "w.pth"
    torch.save(wrap, path)
    _loads_back("kaiko_vits16", small_vit, read_state_dict(path))


def _gpfm_small():
    return _random(get_spec("gpfm").build(depth=4, embed_dim=192, num_heads=3, **SKIP_INIT))


def test_gpfm_github_release_layout_chunked_blocks_teacher_and_heads(tmp_path):
    """The GitHub release's GPFM.pth: ckpt['teacher'], keys 'backbone.blocks.<chunk>.<i>.*' with
    DINOv2's block_chunks (global block index i inside each chunk), plus mask_token and the DINO
    head; birkhoffkiki/GPFM @ 4f8be2b, models/dinov2/__init__.py strips 'backbone.' and loads the
    chunked model. Our timm build reads it as the flat blocks.<i>."""
    model = _gpfm_small()
    teacher = {}
    for key, value in model.state_dict().items():
        m = re.match(r"blocks\.(\d+)\.(.*)", key)
        if m:  # block_chunks=2 over 4 blocks: chunk 0 holds 0, 1; chunk 1 holds 2, 3
            i = int(m.group(1))
            key = f"blocks.{i // 2}.{i}.{m.group(2)}"
        teacher[f"backbone.{key}"] = value
    teacher["backbone.mask_token"] = torch.zeros(1, 192)
    teacher["dino_head.last_layer.weight"] = torch.zeros(16, 256)
    path = tmp_path / "GPFM.pth"
    torch.save({"teacher": teacher, "iteration": 10}, path)
    _loads_back("gpfm", model, read_state_dict(path))


def test_dinov2_native_names_with_registers_match_timms_own_conversion():
    """DINOv2-hub names (register_tokens, class position in pos_embed, fused SwiGLU w12/w3,
    mask_token) -> our H-optimus build: the same tensors as timm's checkpoint_filter_fn gives
    (timm/models/vision_transformer.py, _convert_dinov2), and the same output."""
    ours = _random(get_spec("h_optimus_0").build(depth=1, embed_dim=192, num_heads=3, **SKIP_INIT))
    sd = ours.state_dict()
    g = torch.Generator().manual_seed(3)
    class_pos = torch.randn(1, 1, 192, generator=g)
    native = {}
    for key, value in sd.items():
        key = key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        native[key] = value
    native["register_tokens"] = native.pop("reg_token")
    native["cls_token"] = sd["cls_token"] - class_pos
    native["pos_embed"] = torch.cat([class_pos, sd["pos_embed"]], dim=1)
    native["mask_token"] = torch.zeros(1, 192)
    expected = _shapes(sd)
    got = state_for(get_spec("h_optimus_0"), dict(native), expected)
    reference = timm.models.vision_transformer.checkpoint_filter_fn(dict(native), ours)
    assert _shapes(got) == _shapes(reference) == expected
    for key in expected:
        torch.testing.assert_close(got[key], reference[key], rtol=0, atol=0, msg=key)
    rebuilt = get_spec("h_optimus_0").build(depth=1, embed_dim=192, num_heads=3, **SKIP_INIT).eval()
    rebuilt.load_state_dict(got, strict=True)
    x = torch.randn(1, 3, 56, 56, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), ours(x), rtol=1e-5, atol=1e-5)


def test_hub_snapshot_folders_single_and_sharded(tmp_path, small_vit):
    sd = {k: v.contiguous() for k, v in small_vit.state_dict().items()}
    single = tmp_path / "snapshot"
    single.mkdir()
    (single / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224"}))
    save_file(sd, str(single / "model.safetensors"))
    (single / "README.md").write_text("model card")
    _loads_back("kaiko_vits16", small_vit, read_state_dict(single))
    assert checkpoint_sha256(single) == checkpoint_sha256(single / "model.safetensors")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in halves.items():
        save_file({k: sd[k] for k in names}, str(sharded / shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, names in halves.items() for k in names}}))
    (sharded / "config.json").write_text("{}")
    _loads_back("kaiko_vits16", small_vit, read_state_dict(sharded))
    assert len(checkpoint_sha256(sharded)) == 64

    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text("{}")
    torch.save(sd, binary / "pytorch_model.bin")
    _loads_back("kaiko_vits16", small_vit, read_state_dict(binary))

    release = tmp_path / "gpfm-hub"  # a folder with the release's one weights file (GPFM.pth, mSTAR.pth)
    release.mkdir()
    torch.save({"state_dict": sd}, release / "GPFM.pth")
    (release / "README.md").write_text("")
    _loads_back("kaiko_vits16", small_vit, read_state_dict(release))

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(EncoderWeightsError, match=r"checkpoint folder .*empty: no model.safetensors"):
        read_state_dict(empty)


@pytest.fixture(scope="module")
def vits8_file(tmp_path_factory):
    """A full-size ViT-S/8 file (the shapes of Kaiko's vits8.pth and Lunit's DINO ViT-S/8)."""
    model = get_spec("kaiko_vits8").build(**SKIP_INIT)
    path = tmp_path_factory.mktemp("w") / "vits8.safetensors"
    save_file({k: torch.zeros(v.shape) if v.is_floating_point() else v for k, v in model.state_dict().items()},
              str(path))
    return path


def test_snapshot_folder_end_to_end_through_create_encoder(tmp_path, vits8_file):
    folder = tmp_path / "kaiko-vits8"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").symlink_to(vits8_file)
    encoder = create_encoder("kaiko_vits8", folder)
    assert encoder.weights_sha256 == checkpoint_sha256(vits8_file)
    # The file's (zero) tensors are in the model, not timm's random init.
    assert all(not v.any() for v in encoder.model.state_dict().values() if v.is_floating_point())
    # The extract stage accepts the folder too (it hashed only files) and hashes it as the encoder
    # records it, so features.h5 and the config hash name the same weights.
    from wsi_pipeline.features.extractor import weights_identity

    assert weights_identity(str(folder), "kaiko_vits8") == encoder.weights_sha256
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match=r"^extract\.checkpoint: checkpoint folder .*empty"):
        weights_identity(str(empty), "kaiko_vits8")


class TrainingArgs:  # what training scripts store next to the weights
    lr = 0.1


def test_pickled_objects_are_refused_with_the_conversion(tmp_path, small_vit):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": small_vit.state_dict(), "args": TrainingArgs()}, path)
    with pytest.raises(EncoderWeightsError) as info:
        create_encoder("kaiko_vits16", path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "torch.load(weights_only=True) refuses it" in message and "TrainingArgs" in message
    assert "save_file(" in message and "ckpt.safetensors" in message


def test_a_file_of_another_model_names_the_encoders_it_fits(tmp_path, vits8_file):
    with pytest.raises(EncoderWeightsError) as info:
        create_encoder("kaiko_vits16", vits8_file)
    message = str(info.value)
    assert "\n" not in message and f"checkpoint {vits8_file} (given as encoder 'kaiko_vits16')" in message
    assert "shape mismatches" in message and "patch_embed.proj.weight (384, 3, 8, 8) vs (384, 3, 16, 16)" in message
    # Kaiko's and Lunit's ViT-S/8 share every shape: both named, and that shapes cannot tell them apart.
    assert "fit kaiko_vits8, lunit_vits8 — shapes cannot tell these apart" in message
    assert f"`extract: {{encoder: kaiko_vits8, checkpoint: {vits8_file}}}`" in message


# -- identification over the whole registry (meta-device shapes, no files) -------------------------

def _unique_by_release():
    """One name per registered build (aliases share their entry's builder)."""
    seen, names = set(), []
    for name in list_encoders():
        spec = get_spec(name)
        if id(spec.build) not in seen and meta_shapes(spec) is not None:
            seen.add(id(spec.build))
            names.append(name)
    return names


def test_identification_separates_every_pair_whose_shapes_differ():
    names = _unique_by_release()
    specs = [get_spec(n) for n in list_encoders()]
    shapes = {n: meta_shapes(get_spec(n)) for n in list_encoders() if meta_shapes(get_spec(n)) is not None}
    for name in names:
        fits = set(fitting_encoders(shapes[name], specs))
        same = {other for other, s in shapes.items() if s == shapes[name]}
        # Every entry with other shapes is told apart; every entry with the same shapes is named.
        assert fits == same, name


def test_message_for_a_virchow2_file_given_as_uni2_h_and_for_uni_vs_mstar():
    virchow2 = meta_shapes(get_spec("virchow2"))
    assert identify_checkpoint(virchow2, "/data/Virchow2/pytorch_model.bin", "uni2_h") == (
        "its tensor shapes fit virchow2 (also virchow2_cls): use "
        "`extract: {encoder: virchow2, checkpoint: /data/Virchow2/pytorch_model.bin}`")
    message = identify_checkpoint(meta_shapes(get_spec("mstar")), "mSTAR.pth", "gigapath")
    # Phikon-v2 (DINOv2 ViT-L/16, layer scale, no registers) has UNI's shapes too, once its
    # transformers names are converted.
    assert message.startswith("its tensor shapes fit mstar, phikon_v2, uni (also uni_vit_l16, vit_large_patch16) — "
                              "shapes cannot tell these apart")
    assert "`extract: {encoder: mstar, checkpoint: mSTAR.pth}` or `extract: {encoder: phikon_v2, " in message
    assert "`extract: {encoder: uni, checkpoint: mSTAR.pth}`" in message
    assert describe_fit("x.bin", "uni", [], {}) == \
        "its tensor shapes fit no registered encoder (see `wsi-pipeline encoders`)"


def test_a_release_file_name_of_another_same_shape_entry_warns(tmp_path):
    model = _random(get_spec("kaiko_vits8").build(depth=1, **SKIP_INIT))
    path = tmp_path / "vits8.pth"  # Kaiko's release name, but given as lunit_vits8 (same shapes)
    torch.save(model.state_dict(), path)
    from wsi_pipeline.encoders.weights import warn_if_named_for_another

    files = {n: get_spec(n).files for n in list_encoders()}
    with pytest.warns(UserWarning, match=r"vits8.pth is the name of kaiko_vits8's release, loaded as 'lunit_vits8'"):
        warn_if_named_for_another(path, "lunit_vits8", files)
    generic = tmp_path / "model.safetensors"  # a hub file name many releases share: no warning
    generic.write_bytes(b"")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_named_for_another(generic, "kaiko_vits8", files)
        warn_if_named_for_another(path, "kaiko_vits8", files)

"""The one registry mechanism (wsi_pipeline.models.registry) and every entry of every registry built
on it: encoders, MIL aggregators, segmenters. A newly registered model is tested here the moment it
is registered: it must build at a tiny size, give the output dim it declares, and carry well-formed
metadata."""

from __future__ import annotations

import pytest
import torch

from wsi_pipeline.encoders import ENCODERS, get_spec, list_encoders
from wsi_pipeline.models.mil import AGGREGATORS, MILOutput, list_aggregators, register_aggregator
from wsi_pipeline.models.registry import Registry, UnknownModelError
from wsi_pipeline.models.seg import SEGMENTERS, create_segmenter, list_segmenters

from .small_models import grid_coords, make_small

REGISTRIES = {"encoder": ENCODERS, "aggregator": AGGREGATORS, "segmenter": SEGMENTERS}
ENTRIES = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.list()]
ENTRY_IDS = [f"{kind}:{name}" for kind, name in ENTRIES]

# Tiny builds: overrides keep the family and the declared output dim (ViT depth and image size,
# ResNet blocks per stage).
TINY_ENCODERS = {name: {"depth": 1, "img_size": 32} for name in
                 ("vit_small_patch16", "vit_base_patch16", "vit_large_patch16", "uni_vit_l16")}
TINY_ENCODERS["resnet50_trunc"] = {"layers": (1, 1, 1, 1)}  # one bottleneck per stage: still 1024 out
for _name in ("ctranspath", "chief_ctranspath"):  # one Swin block per stage: still 768 out
    TINY_ENCODERS[_name] = {"img_size": 32, "depths": (1, 1, 1, 1)}
for _name in ("musk", "musk_cls"):  # one BEiT3 layer at full width: still 2048 / 1024 out
    TINY_ENCODERS[_name] = {"depth": 1, "img_size": 32}
# HF-format entries and CONCH (encoders/hf_family.py, conch.py): one block, 32 px input, full width.
TINY_ENCODERS.update({name: {"depth": 1, "img_size": 32} for name in (
    "phikon", "phikon_v2", "hibou_b", "hibou_l", "midnight", "midnight_cls", "conch_v1", "conch_v15",
    "conch_v15_bicubic")})
# The pathology ViTs (encoders/vit_family.py) at full width, one block, 16 px patches for the 32 px input.
TINY_ENCODERS.update({name: {"depth": 1, "img_size": 32, "patch_size": 16} for name in ENCODERS.list()
                      if hasattr(ENCODERS.entry(name).builder.build, "arch")})
TINY_SEGMENTERS = {"vmunet_tiny": {"dims": (8, 8, 8), "d_state": 4},
                   "vmunet_small": {"dims": (8, 8, 8, 8), "depths": (1, 1, 1, 1), "d_state": 4}}
IN_DIM, N_CLASSES, N_INSTANCES = 12, 3, 7


# -- the mechanism --------------------------------------------------------------------------------

def toy_registry() -> Registry:
    registry = Registry("widget", fields={"out_dim": (int,), "coord_dims": (tuple,)})
    meta = {"out_dim": 4, "coord_dims": (2,), "license": "MIT", "reference": "a paper"}

    @registry.register("linear_widget", **meta)
    def linear_widget(in_dim: int = 3, **kwargs) -> torch.nn.Module:
        return torch.nn.Linear(in_dim, 4, **kwargs)

    registry.add("other_widget", lambda: torch.nn.Identity(), **meta)
    return registry


def test_register_create_list_and_metadata():
    registry = toy_registry()
    assert registry.list() == ["linear_widget", "other_widget"] and len(registry) == 2
    assert registry.list("linear_*") == ["linear_widget"]
    assert "linear_widget" in registry and "nope" not in registry
    model = registry.create("linear_widget", in_dim=5, bias=False)
    assert isinstance(model, torch.nn.Linear) and model.in_features == 5 and model.bias is None
    entry = registry.entry("linear_widget")
    assert entry.kind == "widget" and entry.name == "linear_widget"
    assert dict(registry.get_metadata("linear_widget")) == {"out_dim": 4, "coord_dims": (2,), "license": "MIT",
                                                            "reference": "a paper"}
    with pytest.raises(TypeError):  # read-only: a caller cannot change what the next one reads
        registry.get_metadata("linear_widget")["out_dim"] = 5


def test_unknown_name_is_a_key_error_with_close_matches():
    registry = toy_registry()
    with pytest.raises(UnknownModelError) as info:
        registry.create("linear_widgte")
    assert isinstance(info.value, KeyError)
    message = info.value.args[0]
    assert message == str(info.value)  # not repr-quoted like a plain KeyError
    assert message.startswith("unknown widget 'linear_widgte' (did you mean linear_widget")  # closest first
    assert message.endswith("registered: linear_widget, other_widget")
    with pytest.raises(KeyError, match="^unknown widget 'zzz'; registered"):  # nothing close: no hint
        registry.get_metadata("zzz")


def test_duplicate_and_malformed_registrations_are_refused():
    registry = toy_registry()
    good = {"out_dim": 4, "coord_dims": (2,), "license": "MIT", "reference": "a paper"}
    with pytest.raises(ValueError, match="widget 'linear_widget' registered twice"):
        registry.add("linear_widget", torch.nn.Identity, **good)
    with pytest.raises(ValueError, match="missing 'coord_dims'"):
        registry.add("w1", torch.nn.Identity, **{k: v for k, v in good.items() if k != "coord_dims"})
    with pytest.raises(ValueError, match="'out_dim' must be int"):
        registry.add("w2", torch.nn.Identity, **{**good, "out_dim": True})
    with pytest.raises(ValueError, match="'license' is empty"):
        registry.add("w3", torch.nn.Identity, **{**good, "license": " "})
    with pytest.raises(TypeError, match="not callable"):
        registry.add("w4", "not a builder", **good)
    assert registry.list() == ["linear_widget", "other_widget"]  # nothing half-registered


def test_public_registry_functions_use_the_shared_registries():
    assert list_encoders() == ENCODERS.list()
    assert list_aggregators() == AGGREGATORS.list()
    assert list_segmenters() == SEGMENTERS.list()
    with pytest.raises(ValueError, match="aggregator 'abmil' registered twice"):
        register_aggregator("abmil", **AGGREGATORS.get_metadata("abmil"))(lambda **cfg: None)
    # stages/segment.py reports exc.args[0] as a config error: it must be the whole message.
    with pytest.raises(KeyError) as info:
        create_segmenter("vmunet_tiyn")
    assert info.value.args[0].startswith("unknown segmenter 'vmunet_tiyn' (did you mean vmunet_tiny")


# -- every entry of every registry ---------------------------------------------------------------

@pytest.mark.parametrize("kind,name", ENTRIES, ids=ENTRY_IDS)
def test_entry_metadata_is_present_and_well_formed(kind, name):
    registry = REGISTRIES[kind]
    meta = registry.get_metadata(name)
    assert registry.metadata_problems(meta) == []
    assert meta["license"].strip() and meta["reference"].strip()
    if kind == "encoder":
        spec = get_spec(name)
        assert meta["out_dim"] == spec.out_dim > 0 and meta["input_size_px"] == spec.input_size_px > 0
        if meta["patch_size_px"] is not None:
            assert meta["patch_size_px"] > 0 and meta["input_size_px"] % meta["patch_size_px"] == 0
        assert meta["native_mpp"] is None or meta["native_mpp"] > 0
        channels = len(meta["mean"]) if meta.get("input_dims", 2) == 3 else 3   # 3-D entries: their own count
        assert len(meta["mean"]) == len(meta["std"]) == channels and min(meta["std"]) > 0
        assert meta["weights_license"].strip()
    elif kind == "aggregator":
        dims = meta["coord_dims"]
        assert 2 in dims and set(dims) <= {2, 3} and list(dims) == sorted(set(dims))
        assert meta["out_dim"] == "n_classes"
    else:
        assert meta["input_size_px"] is None or meta["input_size_px"] > 0
        assert meta["patch_size_px"] > 0 and meta["out_dim"] == "out_channels"


@pytest.mark.parametrize("kind,name", ENTRIES, ids=ENTRY_IDS)
def test_entry_builds_tiny_and_gives_its_declared_output_dim(kind, name):
    torch.manual_seed(0)
    meta = REGISTRIES[kind].get_metadata(name)
    if kind == "encoder":
        model = ENCODERS.create(name, **TINY_ENCODERS.get(name, {})).eval()
        # Sub-volume (3-D) entries take (B, C, D, H, W) with C = their channel count.
        shape = (2, len(meta["mean"]), 8, 16, 16) if meta.get("input_dims", 2) == 3 else (2, 3, 32, 32)
        with torch.no_grad():
            features = model(torch.rand(*shape))
        assert features.shape == (2, meta["out_dim"])
        assert torch.isfinite(features).all()
    elif kind == "aggregator":
        assert meta["out_dim"] == "n_classes"
        model = make_small(name, IN_DIM, N_CLASSES)
        features = torch.randn(1, N_INSTANCES, IN_DIM)
        generator = torch.Generator().manual_seed(0)
        coords_2d = grid_coords(N_INSTANCES, 5, generator)
        coord_sets = {2: coords_2d, 3: torch.cat([coords_2d, (torch.arange(N_INSTANCES) % 2)[:, None] * 256], 1)}
        for coords in [None] + [coord_sets[k][None].float() for k in meta["coord_dims"]]:
            out = model(features, coords)
            assert isinstance(out, MILOutput)
            assert out.logits.shape == (1, N_CLASSES) and out.instance_scores.shape == (1, N_INSTANCES)
            assert torch.isfinite(out.logits).all()
    else:
        assert meta["out_dim"] == "out_channels"
        model = SEGMENTERS.create(name, out_channels=2, **TINY_SEGMENTERS.get(name, {}))
        logits = model(torch.randn(1, 3, 20, 12))
        assert logits.shape == (1, 2, 20, 12)

"""Phikon, Phikon-v2, Hibou and Midnight against `transformers`' own classes (test reference only).

Reduced size: the `transformers` model is built with random weights from a small config of the
same family (patch size, SwiGLU, registers, LayerNorm eps, position grid), saved with
`save_pretrained` (the hub layout: `config.json` + `model.safetensors`, legacy key names) and
loaded through `create_encoder`; the features must equal the model card's recipe on the
`transformers` outputs. Full size: keys and shapes on the meta device. Preprocessing: against the
torchvision transforms the authors run on PIL images.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import transformers
from PIL import Image
from torchvision.transforms import InterpolationMode
from transformers.core_model_loading import revert_weight_conversion

from wsi_pipeline.encoders import create_encoder, get_spec, registry

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
TIMM_SMALL = dict(embed_dim=64, depth=2, num_heads=4)


def _vit_config(**kw):
    base = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=224, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True)
    base.update(kw)
    base["intermediate_size"] = 4 * base["hidden_size"]
    return transformers.ViTConfig(**base)


def _dinov2_config(registers: bool = False, **kw):
    base = dict(layer_norm_eps=1e-6, qkv_bias=True, mlp_ratio=4, layerscale_value=1e-5)
    base.update(kw)
    if registers:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **base)
    return transformers.Dinov2Config(**base)


# name -> (reference class, full-size config, reduced-size config overrides, output rule on the
# transformers output). Reduced Hibou/Midnight configs keep the 518 px (37x37) grid of the DINOv2
# release configs, so the load-time position resampling is compared with transformers' own.
def _cls(out):
    return out.last_hidden_state[:, 0]


def _pooler(out):
    return out.pooler_output


def _cls_mean(out):  # kaiko-ai/Midnight README, extract_classification_embedding
    tokens = out.last_hidden_state
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)


CASES = {
    "phikon": (lambda cfg: transformers.ViTModel(cfg, add_pooling_layer=False),
               partial(_vit_config), dict(image_size=224), _cls),
    "phikon_v2": (transformers.Dinov2Model,
                  partial(_dinov2_config, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          patch_size=16, image_size=224),
                  dict(patch_size=16, image_size=224), _cls),
    "hibou_b": (transformers.Dinov2WithRegistersModel,
                partial(_dinov2_config, registers=True, hidden_size=768, num_hidden_layers=12,
                        num_attention_heads=12, patch_size=14, image_size=224, use_swiglu_ffn=True),
                dict(registers=True, patch_size=14, image_size=518, use_swiglu_ffn=True), _pooler),
    "hibou_l": (transformers.Dinov2WithRegistersModel,
                partial(_dinov2_config, registers=True, hidden_size=1024, num_hidden_layers=24,
                        num_attention_heads=16, patch_size=14, image_size=224, use_swiglu_ffn=True),
                dict(registers=True, patch_size=14, image_size=224, use_swiglu_ffn=True), _pooler),
    "midnight": (transformers.Dinov2Model,
                 partial(_dinov2_config, hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                         patch_size=14, image_size=518, use_swiglu_ffn=True),
                 dict(patch_size=14, image_size=518, use_swiglu_ffn=True), _cls_mean),
    "midnight_cls": (transformers.Dinov2Model,
                     partial(_dinov2_config, hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                             patch_size=14, image_size=518, use_swiglu_ffn=True),
                     dict(patch_size=14, image_size=518, use_swiglu_ffn=True), _cls),
}


def _small_reference(name: str):
    make, full, small, _ = CASES[name]
    if name == "phikon":
        cfg = _vit_config(**SMALL, **small)
    else:
        cfg = _dinov2_config(**SMALL, **small)
    torch.manual_seed(0)
    model = make(cfg).eval()
    with torch.no_grad():  # random, non-trivial LayerScale and biases, so a mix-up shows
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def images_uint8():
    """(2, 3, 256, 256) uint8: smooth structure plus noise, like a tile before the 224 px resize."""
    g = torch.Generator().manual_seed(1)
    low = torch.rand(2, 3, 32, 32, generator=g) * 255
    img = torch.nn.functional.interpolate(low, size=(256, 256), mode="bilinear") + torch.randn(
        2, 3, 256, 256, generator=g) * 25
    return img.clamp(0, 255).round().to(torch.uint8)


@pytest.mark.parametrize("name", ["phikon", "phikon_v2", "hibou_b", "midnight", "midnight_cls"])
def test_reduced_size_equals_transformers(name, tmp_path, monkeypatch, images_uint8):
    reference = _small_reference(name)
    reference.save_pretrained(tmp_path)  # the hub layout: legacy key names in model.safetensors
    spec = get_spec(name)
    small = replace(spec, build=partial(spec.build, **TIMM_SMALL))
    monkeypatch.setattr(registry, "get_spec", lambda n: small if n == name else get_spec(n))

    encoder = create_encoder(name, checkpoint=tmp_path / "model.safetensors")
    with torch.no_grad():
        ours = encoder(images_uint8)
        expected = CASES[name][3](reference(pixel_values=encoder.preprocess(images_uint8)))
    assert ours.shape == expected.shape == (2, 128 if name == "midnight" else 64)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in CASES if n != "midnight_cls"])  # same network as midnight
def test_full_size_keys_and_shapes(name):
    make, full, _, _ = CASES[name]
    spec = get_spec(name)
    with torch.device("meta"):
        reference = make(full())
        ours = spec.build(weight_init="skip")  # no random init on meta tensors: shapes only
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # The hub files' names (what save_pretrained writes: query/key/value, weights_in, ...) and the
    # names transformers >= 5 gives the same tensors in memory (q_proj, gate_proj, ...).
    hub_layout = revert_weight_conversion(reference, reference.state_dict())
    assert any(".attention.attention.query." in k for k in hub_layout)
    for layout in (hub_layout, reference.state_dict()):
        converted = spec.convert_state_dict(layout)
        assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    assert ours.num_features == spec.out_dim


def test_midnight_pools_class_token_and_mean_of_patch_tokens():
    """The authors' classification embedding: CLS (1536) then the mean of the 256 patch tokens."""
    spec = get_spec("midnight")
    model = spec.build(depth=1, embed_dim=32, num_heads=2).eval()
    tokens = torch.randn(3, 1 + 256, 32)
    pooled = model.forward_head(tokens)
    torch.testing.assert_close(pooled, torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1))


@pytest.mark.parametrize("name,interpolation", [("phikon", InterpolationMode.BILINEAR),
                                                 ("phikon_v2", InterpolationMode.BILINEAR),
                                                 ("hibou_b", InterpolationMode.BICUBIC),
                                                 ("midnight", InterpolationMode.BILINEAR)])
@pytest.mark.parametrize("side_px", [256, 512])
def test_preprocessing_matches_torchvision_on_pil(name, interpolation, side_px, images_uint8):
    """Resize(224) + CenterCrop(224) as the authors run it on PIL tiles, within 1 uint8 level."""
    spec = get_spec(name)
    tile = torch.nn.functional.interpolate(images_uint8[:1].float(), size=(side_px, side_px),
                                           mode="nearest").to(torch.uint8)
    pil = Image.fromarray(tile[0].permute(1, 2, 0).numpy())
    official = np.asarray(T.Compose([T.Resize(224, interpolation=interpolation), T.CenterCrop(224)])(pil))
    ours = registry.resize_and_crop(tile, spec)[0].permute(1, 2, 0).numpy()
    assert ours.shape == official.shape == (224, 224, 3)
    assert np.abs(ours.astype(int) - official.astype(int)).max() <= 1
    normalised = T.Normalize(spec.mean, spec.std)(T.ToTensor()(Image.fromarray(ours)))
    encoder_in = registry.Encoder(torch.nn.Identity(), spec, "none", "none").normalise(
        torch.from_numpy(ours).permute(2, 0, 1)[None])
    torch.testing.assert_close(encoder_in[0], normalised, atol=1e-5, rtol=0)


def _dinov2_native_names(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under facebookresearch/dinov2's names, which HistAI/hibou @c453bbe
    (hibou/models/vision_transformer.py, build_model) uses for its directly downloadable weights:
    cls_token, pos_embed, register_tokens, mask_token, blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma,
    norm2, mlp.w12, mlp.w3, ls2.gamma}, norm."""
    flat = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
            "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    local = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj",
             "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
             "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3"}
    native = {}
    for key, value in hub.items():
        if key in flat:
            native[flat[key]] = value
            continue
        layer, rest = key.split(".")[2], ".".join(key.split(".")[3:])
        if rest.startswith("attention.attention.query."):
            kind = rest.rsplit(".", 1)[1]
            parts = [hub[f"encoder.layer.{layer}.attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            native[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
        elif not rest.startswith("attention.attention."):
            name, kind = rest.rsplit(".", 1) if not rest.endswith("lambda1") else (rest, None)
            native[f"blocks.{layer}.{local[name]}" + (f".{kind}" if kind else "")] = value
    return native


def test_hibou_dinov2_native_layout_equals_transformers(tmp_path, monkeypatch, images_uint8):
    """hibou.build_model's weights (DINOv2-native names) give the same features as the hub files."""
    from safetensors.torch import save_file

    reference = _small_reference("hibou_b")
    hub = revert_weight_conversion(reference, reference.state_dict())
    save_file({k: v.contiguous() for k, v in _dinov2_native_names(hub).items()}, tmp_path / "hibou-b.safetensors")
    spec = get_spec("hibou_b")
    small = replace(spec, build=partial(spec.build, **TIMM_SMALL))
    monkeypatch.setattr(registry, "get_spec", lambda n: small if n == "hibou_b" else get_spec(n))
    encoder = create_encoder("hibou_b", checkpoint=tmp_path / "hibou-b.safetensors")
    with torch.no_grad():
        ours = encoder(images_uint8)
        expected = reference(pixel_values=encoder.preprocess(images_uint8)).pooler_output
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)

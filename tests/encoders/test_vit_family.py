"""The timm-built pathology ViTs against their authors' own builds.

Each reference below is written out from the official loader (repository @ commit, path), not
read from our registry: the timm architecture and keyword arguments the loader passes to
``timm.create_model``, the output rule it applies to the model's output, and its torchvision
transform. Full-size builds are compared on the meta device (keys and shapes, output width);
numbers are compared at depth 1 with the same random weights in both builds.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms as T

from wsi_pipeline.encoders import Encoder, get_spec
from wsi_pipeline.encoders.registry import resize_and_crop

SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}
BICUBIC, BILINEAR = T.InterpolationMode.BICUBIC, T.InterpolationMode.BILINEAR
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


def cls(out, model):
    return out  # timm global_pool="token": the loader returns model(x), the class token


def cls_of_tokens(out, model):
    return out[:, 0]


def cls_mean_after(skip):
    """cat[out[:, 0], out[:, skip:].mean(1)] as the model cards write it (skip = 1 or 5)."""
    def rule(out, model):
        start = model.num_prefix_tokens if skip == "prefix" else skip
        return torch.cat([out[:, 0], out[:, start:].mean(1)], dim=-1)
    return rule


UNI_KW = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
VIRCHOW_KW = dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                  dynamic_img_size=True, **SWIGLU)
HOPT_KW = dict(num_classes=0, img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=True)
KAIKO = "kaiko-ai/towards_large_pathology_fms @ bfcde17, hubconf.py + README.md"
TRIDENT = "mahmoodlab/TRIDENT @ a91fa84, trident/patch_encoder_models/load.py"

# name: (arch, official kwargs, official output rule, out_dim, torchvision transform, mean/std, source)
OFFICIAL = {
    "uni": ("vit_large_patch16_224", UNI_KW, cls, 1024, [T.Resize(224), T.CenterCrop(224)], IMAGENET,
            "mahmoodlab/UNI @ 42715ef, uni/get_encoder/get_encoder.py + README.md"),
    "uni2_h": ("vit_giant_patch14_224",
               dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                    mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, reg_tokens=8,
                    dynamic_img_size=True, **SWIGLU),
               cls, 1536, [T.Resize(224), T.CenterCrop(224)], IMAGENET,
               "mahmoodlab/UNI @ 42715ef, uni/get_encoder/get_encoder.py + README.md"),
    "mstar": ("vit_large_patch16_224", UNI_KW, cls, 1024, [T.Resize(224)], IMAGENET,
              "Innse/mSTAR @ 6cb5016, Feature_extract/models/mSTAR.py + README.md"),
    "virchow": ("vit_huge_patch14_224", VIRCHOW_KW, cls_mean_after(1), 2560,
                [T.Resize(224, interpolation=BICUBIC)], IMAGENET, TRIDENT + " VirchowInferenceEncoder"),
    "virchow_cls": ("vit_huge_patch14_224", VIRCHOW_KW, cls_of_tokens, 1280,
                    [T.Resize(224, interpolation=BICUBIC)], IMAGENET, TRIDENT + " (return_cls=True)"),
    "virchow2": ("vit_huge_patch14_224", {**VIRCHOW_KW, "reg_tokens": 4}, cls_mean_after(5), 2560,
                 [T.Resize(224, interpolation=BICUBIC)], IMAGENET, TRIDENT + " Virchow2InferenceEncoder"),
    "virchow2_cls": ("vit_huge_patch14_224", {**VIRCHOW_KW, "reg_tokens": 4}, cls_of_tokens, 1280,
                     [T.Resize(224, interpolation=BICUBIC)], IMAGENET, TRIDENT + " (return_cls=True)"),
    # Official card: no resize (224 px tiles in); other sizes follow the hub config's timm transform.
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", HOPT_KW, cls, 1536, [T.Resize(224, interpolation=BICUBIC)],
                    HOPTIMUS, TRIDENT + " HOptimus0InferenceEncoder; huggingface.co/bioptimus/H-optimus-0"),
    "h_optimus_1": ("vit_giant_patch14_reg4_dinov2", HOPT_KW, cls, 1536, [T.Resize(224, interpolation=BICUBIC)],
                    HOPTIMUS, TRIDENT + " HOptimus1InferenceEncoder"),
    # Bioptimus's card code: model(x) -> (B, 261, 768); cat[cls, mean(out[:, num_prefix_tokens:])].
    "h0_mini": ("vit_base_patch14_reg4_dinov2", dict(img_size=224, global_pool="", dynamic_img_size=True,
                                                     num_classes=0, **SWIGLU),
                cls_mean_after("prefix"), 1536, [T.Resize(224, interpolation=BICUBIC)], HOPTIMUS,
                TRIDENT + " H0MiniInferenceEncoder; huggingface.co/bioptimus/H0-mini card"),
    "h0_mini_cls": ("vit_base_patch14_reg4_dinov2", dict(img_size=224, global_pool="", dynamic_img_size=True,
                                                         num_classes=0, **SWIGLU),
                    cls_of_tokens, 768, [T.Resize(224, interpolation=BICUBIC)], HOPTIMUS,
                    TRIDENT + " H0MiniInferenceEncoder(return_type='cls_token')"),
    "gigapath": ("vit_giant_patch14_dinov2",
                 dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                      mlp_ratio=5.33334, num_classes=0, dynamic_img_size=True),
                 cls, 1536, [T.Resize(256, interpolation=BICUBIC), T.CenterCrop(224)], IMAGENET,
                 "prov-gigapath/prov-gigapath @ 09d8e87, README.md; " + TRIDENT),
    "lunit_vits8": ("vit_small_patch8_224", dict(img_size=224, dynamic_img_size=True, num_classes=0), cls, 384,
                    [T.Resize(224, interpolation=BICUBIC)],
                    ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)),
                    TRIDENT + " LunitS8InferenceEncoder"),
    "kaiko_vits16": ("vit_small_patch16_224", dict(dynamic_img_size=True, num_classes=0), cls, 384,
                     [T.Resize(224), T.CenterCrop(224)], ((0.5,) * 3, (0.5,) * 3), KAIKO),
    "kaiko_vits8": ("vit_small_patch8_224", dict(dynamic_img_size=True, num_classes=0), cls, 384,
                    [T.Resize(224), T.CenterCrop(224)], ((0.5,) * 3, (0.5,) * 3), KAIKO),
    "kaiko_vitb16": ("vit_base_patch16_224", dict(dynamic_img_size=True, num_classes=0), cls, 768,
                     [T.Resize(224), T.CenterCrop(224)], ((0.5,) * 3, (0.5,) * 3), KAIKO),
    "kaiko_vitb8": ("vit_base_patch8_224", dict(dynamic_img_size=True, num_classes=0), cls, 768,
                    [T.Resize(224), T.CenterCrop(224)], ((0.5,) * 3, (0.5,) * 3), KAIKO),
    "kaiko_vitl14": ("vit_large_patch14_reg4_dinov2", dict(dynamic_img_size=True, num_classes=0), cls, 1024,
                     [T.Resize(224), T.CenterCrop(224)], ((0.5,) * 3, (0.5,) * 3), KAIKO),
    # The .lvd142m tag's pretrained_cfg sets num_classes=0, as TRIDENT builds it.
    "gpfm": ("vit_large_patch14_dinov2.lvd142m", dict(pretrained=False, img_size=224, init_values=1e-5,
                                                      dynamic_img_size=True),
             cls, 1024, [T.Resize((224, 224), interpolation=BICUBIC)], IMAGENET,
             "birkhoffkiki/GPFM @ 4f8be2b, models/dinov2/__init__.py (build_transform); " + TRIDENT),
}
NAMES = sorted(OFFICIAL)
SKIP_INIT = {"weight_init": "skip"}  # shapes only; both sides, keys unaffected


def _meta_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_full_size_keys_shapes_and_width_equal_the_official_build(name):
    arch, kwargs, _, out_dim, _, (mean, std), _source = OFFICIAL[name]
    spec = get_spec(name)
    with torch.device("meta"):
        ours = spec.build(**SKIP_INIT)
        reference = timm.create_model(arch, **{"pretrained": False, **kwargs, **SKIP_INIT})
        # Output width at full width (one block: a meta forward through all blocks costs seconds).
        out = spec.build(depth=1, **SKIP_INIT)(torch.empty(2, 3, 224, 224))
    assert _meta_shapes(ours) == _meta_shapes(reference)
    assert spec.out_dim == out_dim and tuple(out.shape) == (2, out_dim)
    assert spec.mean == mean and spec.std == std
    assert spec.reference and spec.files and spec.hub_repo and spec.weights_license and spec.output


def _random_weights(model: torch.nn.Module, seed: int) -> dict:
    """Every float tensor random (class/register tokens and layer scales included), so a wrong
    token or a skipped register shows in the output."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v)
            for k, v in model.state_dict().items()}


# Reduced builds: depth 1, and 1024+ wide models narrower (same family otherwise).
SMALL = {name: {"depth": 1} for name in NAMES}
for _wide in ("uni", "mstar", "uni2_h", "h_optimus_0", "h_optimus_1", "gigapath", "virchow", "virchow2",
              "virchow_cls", "virchow2_cls", "kaiko_vitl14", "gpfm"):
    SMALL[_wide] = {"depth": 1, "embed_dim": 192, "num_heads": 3}


@pytest.mark.parametrize("name", NAMES)
def test_same_weights_give_the_official_output_at_depth_one(name):
    arch, kwargs, rule, out_dim, _, _, _source = OFFICIAL[name]
    spec = get_spec(name)
    ours = spec.build(**SMALL[name], **SKIP_INIT).eval()
    reference = timm.create_model(arch, **{"pretrained": False, **kwargs, **SMALL[name], **SKIP_INIT}).eval()
    state = _random_weights(ours, seed=len(name))
    ours.load_state_dict(state, strict=True)
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))  # dynamic_img_size
    with torch.inference_mode():
        got, want = ours(x), rule(reference(x), reference)
    assert got.shape == want.shape == (2, ours.embed_dim * (2 if spec.output.startswith("cls+mean") else 1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def real_image() -> np.ndarray:
    """A real photograph (427 x 640 RGB JPEG) that scikit-learn ships, read without importing it."""
    import importlib.util
    from pathlib import Path

    folder = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0])
    return np.asarray(Image.open(folder / "datasets" / "images" / "china.jpg").convert("RGB"))


@pytest.mark.parametrize("name", NAMES)
def test_preprocessing_equals_the_official_transform_on_a_real_image(name, real_image):
    *_, transform, (mean, std), _source = OFFICIAL[name]
    spec = get_spec(name)
    for side in sorted({224, 256, 300}):
        patch = np.ascontiguousarray(real_image[40:40 + side, 120:120 + side])
        want = np.asarray(T.Compose(transform)(Image.fromarray(patch))).astype(int)
        got = resize_and_crop(torch.from_numpy(patch).permute(2, 0, 1)[None], spec)[0].permute(1, 2, 0)
        assert got.shape == want.shape, side
        # Within one uint8 level; PIL's bicubic weights are 22-bit fixed point, which moves a rare
        # pixel (1 in 150k here) by a second level.
        diff = np.abs(got.numpy().astype(int) - want)
        assert diff.max() <= 2 and (diff > 1).mean() <= 1e-4, (side, diff.max(), (diff > 1).sum())
    # ... and the Encoder's output is the official Normalize(mean, std) after ToTensor(), within
    # the one uint8 level the resize may differ by.
    encoder = Encoder(torch.nn.Identity(), spec, weights_source="random", weights_sha256="random")
    patch = np.ascontiguousarray(real_image[:256, :256])
    want = T.Normalize(mean, std)(T.ToTensor()(T.Compose(transform)(Image.fromarray(patch))))
    got = encoder(torch.from_numpy(patch).permute(2, 0, 1)[None])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1.001 / 255 / min(std))


def test_cls_mean_keeps_timm_keys_and_leaves_registers_out():
    spec = get_spec("virchow2")
    model = spec.build(depth=1, embed_dim=192, num_heads=3, **SKIP_INIT).eval()
    model.load_state_dict(_random_weights(model, seed=1))
    assert type(model).__mro__[1] is timm.models.VisionTransformer  # same module tree as timm's
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        tokens = model.forward_features(x)
        out = model(x)
    assert tokens.shape[1] == 1 + 4 + 256
    torch.testing.assert_close(out[:, 192:], tokens[:, 5:].mean(1))
    assert not torch.allclose(out[:, 192:], tokens[:, 1:].mean(1))  # registers would change it

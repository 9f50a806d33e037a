"""CONCH v1 and v1.5 against reference modules that mirror the official definitions.

The references below are written for these tests from reading:
- CONCH v1: mahmoodlab/CONCH @141cc09c7d4ff33d8eda562bd75169b457f71a62,
  conch/open_clip_custom/transformer.py (AttentionalPooler: nn.MultiheadAttention with kdim/vdim),
  vision_tower.py (VisualModel.forward_no_head), coca_model.py (_build_vision_tower: timm
  VisionTransformer at 448 px, forward = forward_features), transform.py (Resize bicubic +
  CenterCrop), factory.py / constants.py (OpenAI CLIP mean/std);
- CONCH v1.5: mahmoodlab/TRIDENT @a91fa8490e0210ebbbe58452c3babe009e0ab7ca,
  trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py (CONCHVisionTower: ViT-L/16 built at
  224 px whose position grid is interpolated at each forward, Perceiver AttentionalPooler, LN;
  Resize bilinear + CenterCrop, ImageNet mean/std).
They are independent of our implementation (nn.MultiheadAttention and einsum attention here,
scaled_dot_product_attention there; per-forward position interpolation here, load-time there).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.transforms import InterpolationMode

from wsi_pipeline.encoders import create_encoder, get_spec, registry


# --------------------------------------------------------------------------- CONCH v1 reference
class CocaPoolerReference(nn.Module):
    """Learned queries attend over LayerNorm-ed tokens through torch's MultiheadAttention
    (sequence-first), as CONCH's open_clip AttentionalPooler."""

    def __init__(self, d_model, context_dim, n_head=8, n_queries=256):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x):
        x = self.ln_k(x).permute(1, 0, 2)                       # (N, B, C)
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, x.shape[1], 1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


class ConchV1VisualReference(nn.Module):
    """CoCa's `visual` with both poolers and the contrastive projection, like the release."""

    def __init__(self, width=768, depth=12, heads=12, embed_dim=512, caption_dim=768, caption_queries=256,
                 weight_init=""):
        super().__init__()
        self.trunk = VisionTransformer(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4,
                                       img_size=448, patch_size=16, num_classes=0, dynamic_img_size=True,
                                       weight_init=weight_init)
        self.trunk.forward = self.trunk.forward_features
        self.attn_pool_contrast = CocaPoolerReference(embed_dim, width, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(width ** -0.5 * torch.randn(embed_dim, embed_dim))
        self.attn_pool_caption = CocaPoolerReference(caption_dim, width, n_head=8, n_queries=caption_queries)
        self.ln_caption = nn.LayerNorm(caption_dim)

    def forward_no_head(self, x):  # encode_image(x, proj_contrast=False, normalize=False)
        return self.ln_contrast(self.attn_pool_contrast(self.trunk(x))[:, 0])


def coca_release_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The key layout of CONCH's pytorch_model.bin: visual.*, plus text tower / decoder keys (small
    stand-ins: they must be dropped whatever their shapes) and the temperature."""
    state = {"visual." + k: v for k, v in visual.state_dict().items()}
    state.update({"text.positional_embedding": torch.zeros(128, 8), "text.token_embedding.weight": torch.zeros(10, 8),
                  "text.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8),
                  "text_decoder.resblocks.0.ln_1.weight": torch.zeros(8), "logit_scale": torch.zeros(())})
    return state


# ------------------------------------------------------------------------- CONCH v1.5 reference
class TridentTrunkReference(VisionTransformer):
    """TRIDENT's iBOT-style ViT: built at 224 px, position embeddings interpolated at each forward
    (bicubic, scale factor (grid + 0.1) / sqrt(N), CLS position kept) when the grid differs."""

    def __init__(self, **kw):
        super().__init__(img_size=224, patch_size=16, qkv_bias=True, init_values=1.0, num_classes=0, **kw)
        self.patch_embed.strict_img_size = False

    def _pos_embed(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n:
            return x + self.pos_embed
        side, grid = int(math.sqrt(n)), int(math.sqrt(npatch))
        patch = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch = nn.functional.interpolate(patch, scale_factor=((grid + 0.1) / side, (grid + 0.1) / side),
                                          mode="bicubic")
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        return x + torch.cat([self.pos_embed[:, :1], patch], dim=1)


class PerceiverPoolerReference(nn.Module):
    """TRIDENT's CONCH v1.5 AttentionalPooler, written out with einsum."""

    def __init__(self, d_model, context_dim, n_head=8, n_queries=1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads, self.scale = n_head, (d_model // n_head) ** -0.5
        self.ln_k, self.ln_q = nn.LayerNorm(context_dim), nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        b = x.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        sim = torch.einsum("bhid,bhjd->bhij", q * self.scale, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).flatten(2)
        return self.to_out(out)


class ConchV15Reference(nn.Module):
    def __init__(self, width=1024, depth=24, heads=16, weight_init=""):
        super().__init__()
        self.trunk = TridentTrunkReference(embed_dim=width, depth=depth, num_heads=heads, weight_init=weight_init)
        self.attn_pool_contrast = PerceiverPoolerReference(768, width)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x):
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


# ----------------------------------------------------------------------------------- fixtures
SMALL_TRUNK = dict(embed_dim=64, depth=2, num_heads=4)


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial 1-D parameters (LayerNorm, biases, LayerScale), so a swapped one shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim <= 1:
                p.normal_(0.0, 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def tiles_uint8():
    """(2, 3, 512, 512) uint8 tiles: smooth structure plus noise (512 px at 20x, as TRIDENT tiles)."""
    g = torch.Generator().manual_seed(3)
    low = torch.rand(2, 3, 32, 32, generator=g) * 255
    img = torch.nn.functional.interpolate(low, size=(512, 512), mode="bilinear")
    return (img + torch.randn(2, 3, 512, 512, generator=g) * 25).clamp(0, 255).round().to(torch.uint8)


def _small_encoder(name, checkpoint, monkeypatch):
    spec = get_spec(name)
    small = replace(spec, build=partial(spec.build, **SMALL_TRUNK))
    monkeypatch.setattr(registry, "get_spec", lambda n: small if n == name else get_spec(n))
    return create_encoder(name, checkpoint=checkpoint)


# -------------------------------------------------------------------------------------- tests
def test_conch_v1_equals_reference_from_full_coca_checkpoint(tmp_path, monkeypatch, tiles_uint8):
    torch.manual_seed(0)
    reference = _randomise(ConchV1VisualReference(width=64, depth=2, heads=4, caption_queries=4))
    path = tmp_path / "pytorch_model.bin"
    torch.save(coca_release_state_dict(reference), path)
    encoder = _small_encoder("conch_v1", path, monkeypatch)
    with torch.no_grad():
        ours = encoder(tiles_uint8)
        expected = reference.forward_no_head(encoder.preprocess(tiles_uint8))
    assert ours.shape == (2, 512)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("release_grid", [14, 16])
def test_conch_v15_equals_trident_tower(release_grid, tmp_path, monkeypatch, tiles_uint8):
    """The release's trunk.pos_embed (14x14 from 224 px training; 16x16 exercises TRIDENT's bilinear
    resize at load) gives the same 448 px features as TRIDENT's per-forward interpolation."""
    torch.manual_seed(0)
    reference = _randomise(ConchV15Reference(width=64, depth=2, heads=4))
    state = dict(reference.state_dict())
    release_pos = torch.randn(1, 1 + release_grid ** 2, 64)
    state["trunk.pos_embed"] = release_pos
    # TRIDENT's loader: resample the release grid to the 224 px model's 14x14 (bilinear), strict load.
    state_for_reference = dict(state, **{"trunk.pos_embed": resample_abs_pos_embed(
        release_pos, new_size=(14, 14), num_prefix_tokens=1, interpolation="bilinear", antialias=False)})
    reference.load_state_dict(state_for_reference, strict=True)
    path = tmp_path / "pytorch_model_vision.bin"
    torch.save(state, path)
    encoder = _small_encoder("conch_v15", path, monkeypatch)
    with torch.no_grad():
        ours = encoder(tiles_uint8)
        expected = reference(encoder.preprocess(tiles_uint8))
    assert ours.shape == (2, 768)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_conch_v1_full_size_keys_and_shapes():
    with torch.device("meta"):
        reference = ConchV1VisualReference(weight_init="skip")  # meta: shapes only, no random init
        ours = get_spec("conch_v1").build(weight_init="skip")
    converted = get_spec("conch_v1").convert_state_dict(coca_release_state_dict(reference))
    expected = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert expected["trunk.pos_embed"].shape == (1, 1 + 28 * 28, 768)
    assert expected["attn_pool_contrast.attn.k_proj_weight"].shape == (512, 768)


def test_conch_v15_full_size_keys_and_shapes():
    with torch.device("meta"):
        reference = ConchV15Reference(weight_init="skip")
        ours = get_spec("conch_v15").build(weight_init="skip")
    release = reference.state_dict()
    assert release["trunk.pos_embed"].shape == (1, 197, 1024)  # the 224 px grid TRIDENT loads
    converted = get_spec("conch_v15").convert_state_dict(release)
    expected = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert expected["attn_pool_contrast.to_kv.weight"].shape == (1536, 1024)


@pytest.mark.parametrize("name,interpolation,mean,std", [
    ("conch_v1", InterpolationMode.BICUBIC, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ("conch_v15", InterpolationMode.BILINEAR, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("conch_v15_bicubic", InterpolationMode.BICUBIC, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
@pytest.mark.parametrize("side_px", [256, 512])
def test_preprocessing_matches_official_transform(name, interpolation, mean, std, side_px, tiles_uint8):
    """Resize(448) + CenterCrop(448) + ToTensor + Normalize on a PIL tile, within 1 uint8 level."""
    tile = tiles_uint8[:1] if side_px == 512 else tiles_uint8[:1, :, :256, :256].contiguous()
    pil = Image.fromarray(tile[0].permute(1, 2, 0).numpy())
    official_u8 = np.asarray(T.Compose([T.Resize(448, interpolation=interpolation), T.CenterCrop(448)])(pil))
    spec = get_spec(name)
    ours_u8 = registry.resize_and_crop(tile, spec)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours_u8.astype(int) - official_u8.astype(int)).max() <= 1
    official = T.Compose([T.Resize(448, interpolation=interpolation), T.CenterCrop(448), T.ToTensor(),
                          T.Normalize(mean, std)])(pil)
    ours = registry.Encoder(nn.Identity(), spec, "none", "none").preprocess(tile)[0]
    assert ours.shape == official.shape == (3, 448, 448)
    assert (ours - official).abs().max() <= 1.0 / 255 / min(std) + 1e-5

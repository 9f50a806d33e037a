"""MUSK against the official definition.

The reference restates, in its own words, lilab-stanford/MUSK @714b666: ``musk/modeling.py`` (MUSK
= BEiT3 + vision/language heads + logit_scale; ``musk_large_patch16_384`` config), its vendored
torchscale (``musk/torchscale/model/BEiT3.py``, ``architecture/encoder.py`` + ``config.py`` with
multiway=True, subln=True -> pre-norm, normalize_output, no embedding scale;
``component/multiway_network.py``, ``multihead_attention.py``, ``feedforward_network.py``,
``embedding.py``) and ``musk/utils.py`` (``MultiScaleForward``, ``load_model_and_may_interpolate``).
Every multiway module keeps both experts (A vision, B text), so the reference's state dict has the
release's full key layout; an image runs through the A experts (split position -1).
Numerical equality at reduced width/depth; full-size keys and shapes on the meta device.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_pipeline.encoders import get_spec, read_state_dict
from wsi_pipeline.encoders.musk import convert_release_state_dict
from wsi_pipeline.encoders.registry import Encoder, resize_and_crop
from wsi_pipeline.encoders.weights import load_into

from .reference_utils import official_pil_transform, randomise_, smooth_rgb_patches


# ---- reference: MUSK's BEiT3 (torchscale, multiway) -------------------------------------------
class Multiway(nn.Module):
    """torchscale MultiwayNetwork: expert A (vision) and a copy B (text); images use A only."""

    def __init__(self, module):
        super().__init__()
        self.A, self.B = module, copy.deepcopy(module)

    def forward(self, x):
        return self.A(x)


class RefAttention(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads, self.scaling = heads, (dim // heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Multiway(nn.Linear(dim, dim)) for _ in range(4))
        self.inner_attn_ln = Multiway(nn.LayerNorm(dim, eps=eps))   # subln

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2).reshape(b * self.heads, n, -1)  # noqa: E731
        q, k, v = split(self.q_proj(x)) * self.scaling, split(self.k_proj(x)), split(self.v_proj(x))
        weights = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1, dtype=torch.float32)
        out = torch.bmm(weights, v).view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(self.inner_attn_ln(out))


class RefFFN(nn.Module):
    def __init__(self, dim, ffn_dim, eps):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=eps)       # subln

    def forward(self, x):
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x).float()).type_as(x)))


class RefEncoderLayer(nn.Module):
    def __init__(self, dim, heads, ffn_dim, eps):
        super().__init__()
        self.self_attn = RefAttention(dim, heads, eps)
        self.self_attn_layer_norm = Multiway(nn.LayerNorm(dim, eps=eps))
        self.ffn = Multiway(RefFFN(dim, ffn_dim, eps))
        self.final_layer_norm = Multiway(nn.LayerNorm(dim, eps=eps))

    def forward(self, x):  # pre-norm (encoder_normalize_before), alpha = 1 (no deepnorm)
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class RefEncoder(nn.Module):
    def __init__(self, dim, heads, ffn_dim, layers, n_vision_positions, max_source_positions, eps=1e-5):
        super().__init__()
        self.embed_positions = nn.Module()   # MutliwayEmbedding: A vision, B text position tables
        self.embed_positions.A = nn.Embedding(n_vision_positions, dim)
        self.embed_positions.B = nn.Embedding(max_source_positions, dim)
        self.layers = nn.ModuleList(RefEncoderLayer(dim, heads, ffn_dim, eps) for _ in range(layers))
        self.layer_norm = Multiway(nn.LayerNorm(dim, eps=eps))   # normalize_output

    def forward(self, tokens):
        positions = torch.arange(2, tokens.shape[1] + 2)            # fairseq: positions start at 2
        x = tokens + self.embed_positions.A(positions)[None]         # embed_scale 1 (no_scale_embedding)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class RefBEiT3(nn.Module):
    def __init__(self, img_px, patch_px, dim, heads, layers, vocab_size, max_source_positions):
        super().__init__()
        self.text_embed = nn.Embedding(vocab_size, dim)
        self.vision_embed = nn.Module()
        self.vision_embed.proj = nn.Conv2d(3, dim, patch_px, patch_px)
        self.vision_embed.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.vision_embed.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        n_patches = (img_px // patch_px) ** 2
        self.encoder = RefEncoder(dim, heads, 4 * dim, layers, n_patches + 1 + 2, max_source_positions)

    def forward(self, image):
        x = self.vision_embed.proj(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.vision_embed.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)


class RefMUSK(nn.Module):
    def __init__(self, img_px=384, patch_px=16, dim=1024, heads=16, layers=24, vocab_size=64010,
                 max_source_positions=1024):
        super().__init__()
        self.beit3 = RefBEiT3(img_px, patch_px, dim, heads, layers, vocab_size, max_source_positions)
        self.language_head = nn.Linear(dim, dim, bias=False)
        self.vision_head = nn.Linear(dim, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def cls(self, image):  # model(image, with_head=False, out_norm=False, ms_aug=False)[0]
        return self.beit3(image)[:, 0]

    def forward(self, image, ms_aug):
        if not ms_aug:
            return self.cls(image)
        # utils.MultiScaleForward, scales [1, 2], max_split_size = input size
        b, _, side, _ = image.shape
        outs = []
        for scale in (1, 2):
            x = F.interpolate(image.float(), size=int(side * scale), mode="bicubic").to(image.dtype)
            n = math.ceil(int(side * scale) / side)
            # split_chessboard: 'b c (nh h) (nw w) -> (nh nw b) c h w'
            tiles = torch.cat([x[..., i * side:(i + 1) * side, j * side:(j + 1) * side]
                               for i in range(n) for j in range(n)], dim=0)
            outs.append(torch.cat([self.cls(chunk) for chunk in tiles.split(b)], dim=0))  # batched_forward
        return torch.cat([outs[0], outs[1].view(-1, b, outs[1].shape[-1]).mean(0)], dim=-1)


def official_position_interpolation(release: dict, n_patches_new: int) -> dict:
    """utils.load_model_and_may_interpolate's resize of beit3.encoder.embed_positions.A.weight."""
    key = "beit3.encoder.embed_positions.A.weight"
    table, n_extra = release[key], 3   # num_position_embeddings() + 2 - num_patches
    old, new = int((table.shape[0] - n_extra) ** 0.5), int(n_patches_new ** 0.5)
    pos = table[n_extra:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos.float(), size=(new, new), mode="bicubic", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).flatten(1, 2)
    return {**release, key: torch.cat([table[:n_extra].unsqueeze(0), pos], dim=1).squeeze(0)}


SMALL = dict(dim=64, heads=4, layers=2, vocab_size=50, max_source_positions=40)
SMALL_OURS = dict(embed_dim=64, num_heads=4, depth=2)


# ---- tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_reference():
    reference = RefMUSK(img_px=64, **SMALL).eval()
    return randomise_(reference, seed=3)


@pytest.mark.parametrize("name,ms_aug,out_dim", [("musk", True, 128), ("musk_cls", False, 64)])
def test_features_equal_the_reference(small_reference, name, ms_aug, out_dim):
    spec = get_spec(name)
    assert spec.convert_state_dict is convert_release_state_dict   # its grid defaults to 384 / 16 = 24
    ours = spec.build(img_size=64, **SMALL_OURS).eval()
    load_into(ours, convert_release_state_dict(small_reference.state_dict(), grid=4), source="reference")
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = small_reference(x, ms_aug=ms_aug), ours(x)
    assert got.shape == (3, out_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if ms_aug:  # the first half is the single-scale class token, the second is not a copy of it
        torch.testing.assert_close(got[:, :64], small_reference(x, ms_aug=False), atol=1e-5, rtol=1e-4)
        assert (got[:, 64:] - got[:, :64]).abs().max() > 1e-2


def test_position_table_of_another_grid_is_resized_like_the_official_loader(small_reference):
    # A release at 32 px (2x2 patches) loaded into the 64 px model (4x4): MUSK's loader
    # interpolates the vision position table; ours must give the same features.
    coarse = randomise_(RefMUSK(img_px=32, **SMALL), seed=5).state_dict()
    reference = RefMUSK(img_px=64, **SMALL).eval()
    reference.load_state_dict(official_position_interpolation(coarse, n_patches_new=16))
    ours = get_spec("musk_cls").build(img_size=64, **SMALL_OURS).eval()
    load_into(ours, convert_release_state_dict(coarse, grid=4), source="coarse reference")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x, ms_aug=False), atol=1e-5, rtol=1e-4)


def test_full_size_release_keys_and_shapes_on_meta():
    with torch.device("meta"):
        release = RefMUSK().state_dict()               # musk_large_patch16_384's full layout
        ours = get_spec("musk").build()
    converted = convert_release_state_dict(release)
    expected = ours.state_dict()
    assert sorted(converted) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    assert tuple(expected["pos_embed"].shape) == (1, 577, 1024) and len(ours.blocks) == 24
    assert not any(".B." in k or "text" in k or "head" in k for k in converted)
    assert convert_release_state_dict(converted).keys() == converted.keys()   # already converted: as is


def test_text_expert_is_not_mistaken_for_the_vision_expert(small_reference):
    # A file whose vision expert is missing (only B branches) must not load.
    broken = {k: v for k, v in small_reference.state_dict().items() if ".A." not in k}
    ours = get_spec("musk").build(img_size=64, **SMALL_OURS)
    with pytest.raises(Exception, match="missing keys"):
        load_into(ours, convert_release_state_dict(broken, grid=4), source="text-only")


@pytest.mark.parametrize("side_px", [512, 384, 256])
def test_preprocessing_matches_the_official_transform(side_px):
    """MUSK README: Resize(384, interpolation=3 (bicubic), antialias=True), CenterCrop(384),
    ToTensor, Normalize(IMAGENET_INCEPTION): ours on uint8 tensors, within one uint8 level."""
    spec = get_spec("musk")
    patches = smooth_rgb_patches(2, side_px, seed=side_px)
    official = official_pil_transform(resize_px=384, interpolation="bicubic", crop_px=384,
                                      mean=spec.mean, std=spec.std)
    ours_uint8 = resize_and_crop(patches, spec)
    theirs_uint8 = torch.stack([official["resize"](p) for p in patches])
    assert ours_uint8.shape == theirs_uint8.shape == (2, 3, 384, 384)
    assert (ours_uint8.int() - theirs_uint8.int()).abs().max() <= 1
    encoder = Encoder(nn.Identity(), spec, weights_source="none", weights_sha256="none")
    theirs = torch.stack([official["full"](p) for p in patches])
    assert (encoder.preprocess(patches) - theirs).abs().max() <= 1 / 255 / 0.5 + 1e-5


def test_release_safetensors_loads_and_encodes_uint8_patches(tmp_path, small_reference):
    """model.safetensors in the release layout (flat, as xiangjx/musk ships it) -> read_state_dict
    -> converter -> strict load; the encoder's uint8 forward gives the reference's 2-scale output."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_reference.state_dict().items()}, str(path))
    spec = get_spec("musk")
    model = spec.build(img_size=64, **SMALL_OURS)
    load_into(model, convert_release_state_dict(read_state_dict(path), grid=4), source=str(path))
    encoder = Encoder(model.eval(), replace(spec, resize_px=64, crop_px=64, input_size_px=64),
                      weights_source=str(path), weights_sha256="test")
    patches = smooth_rgb_patches(2, 80, seed=9)
    with torch.no_grad():
        got, expected = encoder(patches), small_reference(encoder.preprocess(patches), ms_aug=True)
    assert got.shape == (2, 128)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

"""CTransPath / CHIEF-CTransPath against the official definition.

The reference below restates, in its own words, the model the releases were trained and saved with:
the ConvStem of Xiyue-Wang/TransPath @26c6194 ``ctran.py`` (identical in hms-dbmi/CHIEF @1abed33
``models/ctran.py`` and TRIDENT @a91fa84 ``model_zoo/ctranspath/ctran.py``) inside the Swin of
timm v0.5.4 (huggingface/pytorch-image-models @e0c4eec ``timm/models/swin_transformer.py``,
SwinTransformer with the TransPath patch that lets ``embed_layer`` replace PatchEmbed, as in
STAMP @c54ce06 ``preprocessing/extractor/ctranspath.py``): token layout (B, L, C), patch merging
at the end of stages 0-2, attention-mask and relative-position-index buffers saved in the state
dict, ``head = Identity`` and AdaptiveAvgPool1d over the final-norm tokens. Its state dict is the
release's key layout; our build (current timm Swin) must give the same features from it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsi_pipeline.encoders import get_spec, read_state_dict
from wsi_pipeline.encoders.ctranspath import convert_release_state_dict
from wsi_pipeline.encoders.registry import Encoder, resize_and_crop
from wsi_pipeline.encoders.weights import EncoderWeightsError, load_into

from .reference_utils import official_pil_transform, randomise_, smooth_rgb_patches


# ---- reference: TransPath ConvStem + timm 0.5.4 Swin (release layout) ---------------------------
class RefConvStem(nn.Module):
    def __init__(self, embed_dim=96, norm_layer=nn.LayerNorm):
        super().__init__()
        width = embed_dim // 8
        self.proj = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, embed_dim, 1))
        self.norm = norm_layer(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))  # (B, L, C)


def to_windows(x, w):  # (B, H, W, C) -> (B * nW, w, w, C)
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)


def from_windows(win, w, h, wd):
    b = win.shape[0] // ((h // w) * (wd // w))
    return win.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, -1)


class RefWindowAttention(nn.Module):
    def __init__(self, dim, window, heads):
        super().__init__()
        self.window, self.heads, self.scale = window, heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        pos = torch.stack([ys.flatten(), xs.flatten()])                    # (2, w*w)
        rel = (pos[:, :, None] - pos[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask):
        n_win_b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(n_win_b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            n_win = mask.shape[0]
            attn = (attn.view(-1, n_win, self.heads, n, n) + mask[None, :, None]).view(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(n_win_b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, resolution, heads, window, shift):
        super().__init__()
        if resolution <= window:  # 0.5.4: a stage no larger than a window is neither split nor shifted
            window, shift = resolution, 0
        self.res, self.window, self.shift = resolution, window, shift
        self.norm1, self.attn = nn.LayerNorm(dim), RefWindowAttention(dim, window, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), RefMlp(dim)
        mask = None
        if shift:
            regions = torch.zeros(1, resolution, resolution, 1)
            cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            for label, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
                regions[:, hs, ws, :] = label
            ids = to_windows(regions, window).view(-1, window * window)
            mask = (ids[:, None, :] - ids[:, :, None]).ne(0).float() * -100.0
        self.register_buffer("attn_mask", mask)

    def forward(self, x):
        b, _, c = x.shape
        h = self.norm1(x).view(b, self.res, self.res, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), (1, 2))
        win = self.attn(to_windows(h, self.window).view(-1, self.window ** 2, c), self.attn_mask)
        h = from_windows(win.view(-1, self.window, self.window, c), self.window, self.res, self.res)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), (1, 2))
        x = x + h.reshape(b, -1, c)
        return x + self.mlp(self.norm2(x))


class RefMerging(nn.Module):
    def __init__(self, resolution, dim):
        super().__init__()
        self.res = resolution
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class RefStage(nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, last):
        super().__init__()
        self.blocks = nn.ModuleList(RefBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2)
                                    for i in range(depth))
        self.downsample = None if last else RefMerging(resolution, dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class RefCTransPath(nn.Module):
    """swin_tiny_patch4_window7_224(embed_layer=ConvStem) with head = Identity (timm 0.5.4 layout)."""

    def __init__(self, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), embed_dim=96, img_px=224, window=7):
        super().__init__()
        self.patch_embed = RefConvStem(embed_dim)
        grid = img_px // 4
        self.layers = nn.Sequential(*(RefStage(embed_dim * 2 ** i, grid // 2 ** i, d, h, window,
                                               last=i == len(depths) - 1)
                                      for i, (d, h) in enumerate(zip(depths, heads))))
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))
        self.avgpool = nn.AdaptiveAvgPool1d(1)

    def forward(self, x):
        x = self.norm(self.layers(self.patch_embed(x)))
        return self.avgpool(x.transpose(1, 2)).flatten(1)


# ---- tests ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_and_ours():
    torch.manual_seed(0)
    reference = RefCTransPath().eval()
    randomise_(reference, seed=1)
    release_state = reference.state_dict()
    ours = get_spec("ctranspath").build().eval()
    load_into(ours, get_spec("ctranspath").convert_state_dict(release_state), source="reference")
    return reference, ours, release_state


def test_release_layout_is_what_trident_expects(reference_and_ours):
    # TRIDENT's loader (load.py) drops '*attn_mask' and then sees exactly these keys missing: the
    # reference's state dict is the layout of CHIEF_CTransPath.pth.
    _, _, release_state = reference_and_ours
    masks = sorted(k for k in release_state if k.endswith("attn_mask"))
    assert masks == ["layers.0.blocks.1.attn_mask", "layers.1.blocks.1.attn_mask", "layers.2.blocks.1.attn_mask",
                     "layers.2.blocks.3.attn_mask", "layers.2.blocks.5.attn_mask"]
    assert "layers.0.downsample.reduction.weight" in release_state
    assert "layers.3.downsample.reduction.weight" not in release_state


def test_full_size_features_equal_the_reference(reference_and_ours):
    reference, ours, _ = reference_and_ours
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert got.shape == (2, 768)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_stage_merge_is_remapped_not_dropped(reference_and_ours):
    # With the release's downsample keys left where 0.5.4 put them, the strict load must fail:
    # the conversion is what makes the layouts meet, and the converter leaves a converted dict as is.
    _, ours, release_state = reference_and_ours
    converted = convert_release_state_dict(release_state)
    assert convert_release_state_dict(converted).keys() == converted.keys()
    torch.testing.assert_close(converted["layers.1.downsample.reduction.weight"],
                               release_state["layers.0.downsample.reduction.weight"])
    stale = {k: v for k, v in release_state.items() if not k.endswith(("attn_mask", "relative_position_index"))}
    with pytest.raises(EncoderWeightsError, match="layers.0.downsample"):
        load_into(ours, stale, source="unconverted")  # refused before anything is loaded


def test_chief_entry_shares_the_build_and_differs_in_files():
    ctp, chief = get_spec("ctranspath"), get_spec("chief_ctranspath")
    assert chief.build is ctp.build and chief.convert_state_dict is ctp.convert_state_dict
    assert (chief.out_dim, chief.input_size_px, chief.mean, chief.std) == (768, 224, ctp.mean, ctp.std)
    assert chief.files == ("CHIEF_CTransPath.pth",) and ctp.files == ("ctranspath.pth",)


@pytest.mark.parametrize("side_px", [256, 224, 160])
def test_preprocessing_matches_the_official_transform(side_px):
    """CHIEF README / TransPath get_features_CTransPath.py: Resize(224) on a PIL image, ToTensor,
    ImageNet Normalize. Ours works on uint8 tensors on the device: within one uint8 level."""
    spec = get_spec("chief_ctranspath")
    patches = smooth_rgb_patches(2, side_px, seed=side_px)
    official = official_pil_transform(resize_px=224, interpolation="bilinear", crop_px=None,
                                      mean=spec.mean, std=spec.std)
    ours_uint8 = resize_and_crop(patches, spec)
    theirs_uint8 = torch.stack([official["resize"](p) for p in patches])
    assert ours_uint8.shape == theirs_uint8.shape == (2, 3, 224, 224)
    assert (ours_uint8.int() - theirs_uint8.int()).abs().max() <= 1
    encoder = Encoder(nn.Identity(), spec, weights_source="none", weights_sha256="none")
    theirs = torch.stack([official["full"](p) for p in patches])
    one_level = 1 / 255 / min(spec.std)
    assert (encoder.preprocess(patches) - theirs).abs().max() <= one_level + 1e-5


def test_release_file_loads_without_unpickling(tmp_path):
    """A torch file {'model': state_dict} in the release layout (as TRIDENT, STAMP and CHIEF read
    it) goes through read_state_dict (weights_only=True), the entry's converter and a strict load;
    the encoder then computes the reference's features from uint8 patches. Narrow Swin (32 wide)."""
    narrow = dict(embed_dim=32, heads=(1, 2, 4, 8))
    reference = randomise_(RefCTransPath(**narrow), seed=7).eval()
    path = tmp_path / "CHIEF_CTransPath.pth"
    torch.save({"model": reference.state_dict()}, path)
    spec = get_spec("chief_ctranspath")
    model = spec.build(embed_dim=32, num_heads=(1, 2, 4, 8))
    load_into(model, spec.convert_state_dict(read_state_dict(path)), source=str(path))
    encoder = Encoder(model.eval(), spec, weights_source=str(path), weights_sha256="test")
    patches = smooth_rgb_patches(2, 256, seed=8)
    with torch.no_grad():
        got, expected = encoder(patches), reference(encoder.preprocess(patches))
    assert got.shape == (2, 256)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

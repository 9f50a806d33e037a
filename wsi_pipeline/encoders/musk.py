"""MUSK (Xiang et al., Nature 2025): the vision path of its BEiT3-Large, as a timm VisionTransformer.

MUSK is a multiway BEiT3 (torchscale): every layer holds a vision expert (branch ``A``) and a text
expert (``B``); an image alone runs through the ``A`` branches only. That path is a pre-norm ViT-L/16
at 384 px with two "sub-LN" norms timm expresses as ``scale_attn_norm`` (LayerNorm on the attention
output before its projection) and ``scale_mlp_norm`` (LayerNorm between the MLP's activation and
fc2), LayerNorm eps 1e-5, learned absolute positions on the class token and the patches, and a final
LayerNorm. :func:`convert_release_state_dict` keeps the vision expert of the released
``model.safetensors`` (xiangjx/musk) and renames it to timm's keys; the text expert, text embedding,
mask token and the contrastive heads are dropped.

Output (the authors' recommendation for linear probe / MIL, README ``ms_aug=True``): the class token
of the 384 px input concatenated with the mean class token of the four 384 px quadrants of the
input upsampled 2x (bicubic) — (B, 2048). ``musk_cls`` is the single-scale class token, (B, 1024).
Input (B, 3, 384, 384), normalised with mean = std = 0.5.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .registry import EncoderSpec, register_encoder

EMBED_DIM = 1024
IMG_PX = 384
PATCH_PX = 16
GRID = IMG_PX // PATCH_PX        # 24 x 24 patches
FAIRSEQ_POS_OFFSET = 2           # torchscale numbers positions from 2 (fairseq); rows 0-1 unused
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    class MultiScaleViT(VisionTransformer):
        """timm ViT whose forward is MUSK's inference: (B, 3, S, S) -> (B, D * len(scales)).

        For each scale s the input is resized to s*S (bicubic, as MUSK's ``MultiScaleForward``),
        cut into ceil(s)^2 tiles of S x S, each tile encoded to its class token, and the tiles'
        tokens averaged; the scales' features are concatenated. ``scales=(1,)`` is the plain
        class token (``ms_aug=False``).
        """

        def __init__(self, scales: tuple[float, ...] = (1,), **kwargs):
            super().__init__(**kwargs)
            self.scales = tuple(scales)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.scales == (1,):
                return super().forward(x)
            b, c, side, side_w = x.shape
            if side != side_w:
                raise ValueError(f"MUSK's multi-scale features need square input, got {side}x{side_w}")
            per_scale = []
            for scale in self.scales:
                size = int(side * scale)
                # interpolate() to the same size copies; MUSK calls it at scale 1 too.
                scaled = x if size == side else F.interpolate(x.float(), size=size, mode="bicubic").to(x.dtype)
                n = math.ceil(size / side)
                tile = size // n
                # (B, C, n*t, n*t) -> (n*n*B, C, t, t), tile-major like MUSK's split_chessboard
                tiles = (scaled.view(b, c, n, tile, n, tile).permute(2, 4, 0, 1, 3, 5)
                         .reshape(n * n * b, c, tile, tile))
                per_scale.append(super().forward(tiles).view(n * n, b, -1).mean(0))
            return torch.cat(per_scale, dim=-1)

    return MultiScaleViT


def build_musk(scales: tuple[float, ...] = (1, 2), **overrides) -> nn.Module:
    """MUSK's vision path with random init, no head. ``overrides`` (embed_dim, depth, num_heads,
    img_size, ...) build a smaller model of the same layout, e.g. for tests."""
    kwargs = dict(img_size=IMG_PX, patch_size=PATCH_PX, embed_dim=EMBED_DIM, depth=24, num_heads=16,
                  mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token", num_classes=0,
                  scale_attn_norm=True, scale_mlp_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5))
    return _vit_class()(scales=scales, **{**kwargs, **overrides})


# Release key (after "beit3.encoder.layers.N.") -> timm block key; ".A." is the vision expert.
_LAYER_RENAMES = (
    ("self_attn_layer_norm.A.", "norm1."),
    ("self_attn.inner_attn_ln.A.", "attn.norm."),
    ("self_attn.out_proj.A.", "attn.proj."),
    ("final_layer_norm.A.", "norm2."),
    ("ffn.A.fc1.", "mlp.fc1."),
    ("ffn.A.ffn_layernorm.", "mlp.norm."),
    ("ffn.A.fc2.", "mlp.fc2."),
)
_LAYER_KEY = re.compile(r"^beit3\.encoder\.layers\.(\d+)\.(.+)$")
_QKV_KEY = re.compile(r"^self_attn\.([qkv])_proj\.A\.(weight|bias)$")
_DROPPED = ("beit3.text_embed.", "beit3.vision_embed.mask_token", "vision_head.", "language_head.",
            "logit_scale")


def convert_release_state_dict(state: dict[str, torch.Tensor], grid: int = GRID) -> dict[str, torch.Tensor]:
    """xiangjx/musk ``model.safetensors`` (MUSK modeling.py over torchscale BEiT3) -> our timm keys.

    Keeps the vision expert (``.A.``) and renames it; q/k/v projections are stacked into timm's
    fused ``qkv``; the position table drops its two fairseq padding rows (its row 2 is the class
    token's). A table for another patch grid is resized to ``grid`` x ``grid`` the way MUSK's
    ``load_model_and_may_interpolate`` does (bicubic on the patch rows, align_corners=False).
    Keys it does not know are kept, so a strict load names them. A dict without ``beit3.`` keys
    (already converted) passes through.
    """
    if not any(k.startswith("beit3.") for k in state):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if ".B." in key or key.startswith(_DROPPED):
            continue  # text expert, text embedding, masked-modelling token, contrastive heads
        if key == "beit3.vision_embed.cls_token":
            out["cls_token"] = value
        elif key.startswith("beit3.vision_embed.proj."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key == "beit3.encoder.embed_positions.A.weight":
            out["pos_embed"] = _position_table(value, grid)
        elif key.startswith("beit3.encoder.layer_norm.A."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif m := _LAYER_KEY.match(key):
            layer, rest = int(m.group(1)), m.group(2)
            if q := _QKV_KEY.match(rest):
                qkv.setdefault((layer, q.group(2)), {})[q.group(1)] = value
                continue
            for old, new in _LAYER_RENAMES:
                if rest.startswith(old):
                    out[f"blocks.{layer}.{new}{rest[len(old):]}"] = value
                    break
            else:
                out[key] = value
        else:
            out[key] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            out.update({f"beit3.encoder.layers.{layer}.self_attn.{p}_proj.A.{kind}": v for p, v in parts.items()})
            continue  # incomplete: left under its release name for the strict load to report
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _position_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(2 + 1 + g*g, D) torchscale table -> (1, 1 + grid*grid, D) timm pos_embed."""
    extra = FAIRSEQ_POS_OFFSET + 1   # two padding rows + the class token's
    g = math.isqrt(table.shape[0] - extra)
    if g * g != table.shape[0] - extra:
        return table  # not a square grid: left for the shape check to name
    if g != grid:
        patches = table[extra:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic", align_corners=False)
        patches = patches.to(table.dtype).permute(0, 2, 3, 1).reshape(grid * grid, -1)
        table = torch.cat([table[:extra], patches], dim=0)
    return table[FAIRSEQ_POS_OFFSET:].unsqueeze(0)


_COMMON = dict(
    input_size_px=IMG_PX, patch_size_px=PATCH_PX, mean=INCEPTION_MEAN, std=INCEPTION_STD, native_mpp=0.5,
    resize_px=IMG_PX, interpolation="bicubic", antialias=True, crop_px=IMG_PX, recommended_patch_px=IMG_PX,
    precision="fp16", gated=True, hub_repo="xiangjx/musk", files=("model.safetensors",),
    convert_state_dict=convert_release_state_dict, license="Apache-2.0",
    weights_license="CC-BY-NC-ND-4.0, non-commercial academic research (MUSK README; gated on the hub)",
    reference=("Xiang et al., Nature 2025 (MUSK); github.com/lilab-stanford/MUSK @714b666 musk/modeling.py, "
               "musk/utils.py (MultiScaleForward), musk/torchscale (BEiT3), README"),
)
_ANCHORS = ("Preprocessing as the MUSK README: Resize(384, bicubic, antialias) + CenterCrop(384), "
            "IMAGENET_INCEPTION mean/std 0.5 (lazyslide-models @0127beb multimodal/musk.py normalises with "
            "ImageNet mean/std: not followed). "
            "Tiling 384 px at 20x (TRIDENT README). fp16 as TRIDENT (autocast here; the README casts "
            "the model itself to fp16). ")

register_encoder(EncoderSpec(
    name="musk", build=build_musk, out_dim=2 * EMBED_DIM,
    output=("cat[CLS of the 384 px input, mean CLS of the 4 quadrants of its 2x bicubic upsample] "
            "(ms_aug=True)"),
    notes=(_ANCHORS + "Output follows the authors' recommendation for linear probe and MIL (README: "
           "ms_aug=True; STAMP does the same): 5 forwards per patch. TRIDENT uses ms_aug=False (CLS, "
           "1024): that is musk_cls. The official code runs the 4 quadrants as 4 batches; we run them "
           "as one (same result per patch)."),
    **_COMMON))

register_encoder(EncoderSpec(
    name="musk_cls", build=partial(build_musk, scales=(1,)), out_dim=EMBED_DIM,
    output="CLS after the final norm (ms_aug=False)",
    notes=(_ANCHORS + "Single-scale class token: TRIDENT's MUSK output and the authors' choice for zero-shot "
           "(without the contrastive head here); the authors recommend the 2048-d 'musk' for MIL."),
    **_COMMON))

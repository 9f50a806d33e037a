"""CONCH v1 and v1.5 image encoders: a timm ViT trunk, an attentional pooler, a LayerNorm.

CONCH v1 (mahmoodlab/CONCH @141cc09, open_clip_custom/{coca_model.py, vision_tower.py,
transformer.py}) is the vision tower of a CoCa model; its patch feature is
`encode_image(x, proj_contrast=False, normalize=False)`: trunk.forward_features -> the contrastive
AttentionalPooler (one learned query, `nn.MultiheadAttention` with key/value width 768) -> LayerNorm
-> 512. The released `pytorch_model.bin` holds the whole CoCa model; only `visual.trunk.*`,
`visual.attn_pool_contrast.*` and `visual.ln_contrast.*` are used.

CONCH v1.5 (MahmoodLab/conchv1_5 `pytorch_model_vision.bin`, loaded by TRIDENT @a91fa84
patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py) is a ViT-L/16 (LayerScale 1.0) with a
Perceiver-style pooler (bias-free q / kv / out projections, 8 heads) -> LayerNorm -> 768.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import EncoderSpec, register_encoder

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONCH_WEIGHTS_LICENSE = "CC-BY-NC-ND-4.0 (MahmoodLab, hub access request)"


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*Dh) -> (B, H, L, Dh)."""
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


class _QueryPooler(nn.Module):
    """What both CONCH poolers share: `n_queries` learned queries of width d_model (LayerNorm-ed)
    over LayerNorm-ed tokens of width context_dim, in `n_head` heads."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} is not divisible by {n_head} heads")
        self.n_head = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)


class AttentionalPooler(_QueryPooler):
    """CoCa's attentional pooler (CONCH v1): `n_queries` learned queries attend over the tokens.

    Queries and tokens are LayerNorm-ed; the attention is multi-head with separate query (d_model)
    and key/value (context_dim) input widths and biased in/out projections. The parameters carry
    `nn.MultiheadAttention`'s names (`attn.q_proj_weight`, `attn.k_proj_weight`,
    `attn.v_proj_weight`, `attn.in_proj_bias`, `attn.out_proj.*`) so the release loads as is.
    (B, N, context_dim) -> (B, n_queries, d_model).
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__(d_model, context_dim, n_head, n_queries)
        self.attn = nn.Module()
        self.attn.q_proj_weight = nn.Parameter(torch.empty(d_model, d_model))
        self.attn.k_proj_weight = nn.Parameter(torch.empty(d_model, context_dim))
        self.attn.v_proj_weight = nn.Parameter(torch.empty(d_model, context_dim))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.attn.out_proj = nn.Linear(d_model, d_model)
        for weight in (self.attn.q_proj_weight, self.attn.k_proj_weight, self.attn.v_proj_weight):
            nn.init.xavier_uniform_(weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens)
        q_bias, k_bias, v_bias = self.attn.in_proj_bias.chunk(3)
        q = nn.functional.linear(self.ln_q(self.query), self.attn.q_proj_weight, q_bias)
        q = _split_heads(q.unsqueeze(0).expand(tokens.shape[0], -1, -1), self.n_head)
        k = _split_heads(nn.functional.linear(keys, self.attn.k_proj_weight, k_bias), self.n_head)
        v = _split_heads(nn.functional.linear(keys, self.attn.v_proj_weight, v_bias), self.n_head)
        out = nn.functional.scaled_dot_product_attention(q, k, v)        # (B, H, Q, Dh)
        out = out.transpose(1, 2).flatten(2)                              # (B, Q, d_model)
        return self.attn.out_proj(out)


class PerceiverAttentionalPooler(_QueryPooler):
    """CONCH v1.5's pooler: LayerNorm-ed queries and tokens, bias-free `to_q`, fused `to_kv` and
    `to_out` projections, softmax(q k^T / sqrt(Dh)) v over `n_head` heads.
    (B, N, context_dim) -> (B, n_queries, d_model)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__(d_model, context_dim, n_head, n_queries)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.to_q(self.ln_q(self.query)).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        out = nn.functional.scaled_dot_product_attention(
            _split_heads(q, self.n_head), _split_heads(k, self.n_head), _split_heads(v, self.n_head))
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchVisionEncoder(nn.Module):
    """trunk.forward_features (B, 1+N, C) -> pooler query 0 (B, D) -> LayerNorm (B, D)."""

    def __init__(self, trunk: nn.Module, pooler: nn.Module, out_dim: int):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pooler
        self.ln_contrast = nn.LayerNorm(out_dim)
        self.num_features = out_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(images)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def build_conch_v1(**overrides) -> ConchVisionEncoder:
    """CONCH v1: timm ViT-B/16 at 448 px (conch_ViT-B-16.json; coca_model._build_vision_tower),
    attentional pooler d_model 512 over the 768-wide tokens, 8 heads, 1 query."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16)
    args.update(overrides)
    trunk = VisionTransformer(num_classes=0, dynamic_img_size=True, **args)
    return ConchVisionEncoder(trunk, AttentionalPooler(512, args["embed_dim"], n_head=8, n_queries=1), 512)


def build_conch_v15(**overrides) -> ConchVisionEncoder:
    """CONCH v1.5: ViT-L/16 (LayerScale init 1.0, qkv bias) fed 448 px, Perceiver pooler 768 over
    the 1024-wide tokens, 8 heads, 1 query. Built at 448 px: the release's 14x14 position grid is
    brought to 28x28 at load (`conch_v15_state_dict`)."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, img_size=448, patch_size=16)
    args.update(overrides)
    trunk = VisionTransformer(num_classes=0, init_values=1.0, qkv_bias=True, **args)
    return ConchVisionEncoder(trunk, PerceiverAttentionalPooler(768, args["embed_dim"], n_head=8), 768)


def _grid_of(pos: torch.Tensor) -> int:
    side = int(round((pos.shape[1] - 1) ** 0.5))
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"trunk.pos_embed of {pos.shape[1]} tokens is not a class token + square grid")
    return side


def _resample_bilinear(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """CONCH's `resize_pos_embed`: timm resample_abs_pos_embed, bilinear, no antialias, CLS kept."""
    from timm.layers import resample_abs_pos_embed

    if _grid_of(pos) == grid:
        return pos
    return resample_abs_pos_embed(pos, new_size=(grid, grid), num_prefix_tokens=1,
                                  interpolation="bilinear", antialias=False, verbose=False)


def conch_v1_state_dict(state: dict[str, torch.Tensor], *, grid: int = 28) -> dict[str, torch.Tensor]:
    """The full CoCa checkpoint -> this encoder's keys: keep `visual.{trunk, attn_pool_contrast,
    ln_contrast}.*` (text tower, decoder, caption pooler and contrastive projection dropped); a
    position grid other than `grid` is resampled as CONCH's loader does."""
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    keep = ("trunk.", "attn_pool_contrast.", "ln_contrast.")
    state = {k: v for k, v in state.items() if k.startswith(keep)}
    if "trunk.pos_embed" in state:
        state["trunk.pos_embed"] = _resample_bilinear(state["trunk.pos_embed"], grid)
    return state


def conch_v15_state_dict(state: dict[str, torch.Tensor], *, model_grid: int = 14,
                         input_grid: int = 28) -> dict[str, torch.Tensor]:
    """`pytorch_model_vision.bin` (keys trunk.*, attn_pool_contrast.*, ln_contrast.*) -> the 448 px
    build, with TRIDENT's position embeddings at 448 px precomputed.

    TRIDENT builds the trunk at 224 px (grid 14), resamples the release's grid to 14x14 (bilinear,
    no antialias) and, at every 448 px forward, interpolates the 14x14 grid bicubically with
    scale factor (28 + 0.1) / 14 (the DINO offset), CLS position kept. Doing both steps once here
    gives the same 28x28 embeddings. A 28x28 grid is taken as already done (an export of this
    build); TRIDENT would shrink it to 14x14 and grow it back.
    """
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    state = dict(state)
    pos = state.get("trunk.pos_embed")
    if pos is not None and _grid_of(pos) != input_grid:
        pos = _resample_bilinear(pos, model_grid)
        patch = pos[:, 1:].reshape(1, model_grid, model_grid, -1).permute(0, 3, 1, 2)
        scale = (input_grid + 0.1) / model_grid
        patch = nn.functional.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
        if patch.shape[-1] != input_grid:
            raise ValueError(f"position grid resampled to {patch.shape[-1]}, expected {input_grid}")
        patch = patch.permute(0, 2, 3, 1).reshape(1, input_grid * input_grid, -1)
        state["trunk.pos_embed"] = torch.cat([pos[:, :1], patch], dim=1)
    return state


CONCH_REF = ("Lu et al., Nature Medicine 2024 (CONCH); github.com/mahmoodlab/CONCH @141cc09 "
             "open_clip_custom/{coca_model.py, vision_tower.py, transform.py, model_configs/conch_ViT-B-16.json}")
register_encoder(EncoderSpec(
    name="conch_v1", build=build_conch_v1, out_dim=512, input_size_px=448, patch_size_px=16,
    mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resize_px=448, crop_px=448, interpolation="bicubic",
    antialias=True, native_mpp=0.5, recommended_patch_px=512, precision="fp32", gated=True,
    output="attention-pooled (1 query) + LayerNorm, no contrastive projection", hub_repo="MahmoodLab/CONCH",
    files=("pytorch_model.bin",), convert_state_dict=conch_v1_state_dict,
    license="Apache-2.0 (built with timm)", weights_license=CONCH_WEIGHTS_LICENSE, reference=CONCH_REF,
    notes=("encode_image(proj_contrast=False, normalize=False) as CONCH's README for patch features "
           "(512). Preprocessing: CONCH's image_transform, Resize(448, bicubic) + CenterCrop(448) on PIL "
           "(antialiased), OpenAI CLIP mean/std. CLAM builds CONCH at 224 px bilinear instead; TRIDENT "
           "recommends 512 px patches at 20x, CONCH's paper used 256 px at 20x (UNVERIFIED).")))

CONCH15_REF = ("Ding et al., arXiv 2411.19666 (TITAN / CONCH v1.5); TRIDENT @a91fa84 "
               "patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py, load.py (Conchv15InferenceEncoder)")
_CONCH15_NOTES = ("TRIDENT's vendored CONCHVisionTower (MahmoodLab, the model's authors): ViT-L/16 trunk "
                  "(built at 224 px, fed 448 px; its position grid is interpolated to 28x28, here once at "
                  "load), Perceiver pooler 768, LayerNorm. The authors' transform is Resize(448, "
                  "bilinear) + CenterCrop(448) on PIL, ImageNet mean/std: `conch_v15`. LazySlide uses "
                  "bicubic + antialias: `conch_v15_bicubic`. TRIDENT autocasts fp16.")
for _name, _interp in (("conch_v15", "bilinear"), ("conch_v15_bicubic", "bicubic")):
    register_encoder(EncoderSpec(
        name=_name, build=build_conch_v15, out_dim=768, input_size_px=448, patch_size_px=16,
        resize_px=448, crop_px=448, interpolation=_interp, antialias=True, native_mpp=0.5,
        recommended_patch_px=512, precision="fp16", gated=True, hub_repo="MahmoodLab/conchv1_5",
        output="attention-pooled (1 query) + LayerNorm", files=("pytorch_model_vision.bin",),
        convert_state_dict=conch_v15_state_dict, license="Apache-2.0 (built with timm)",
        weights_license=CONCH_WEIGHTS_LICENSE, reference=CONCH15_REF, notes=_CONCH15_NOTES))

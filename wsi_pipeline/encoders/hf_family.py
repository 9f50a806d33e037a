"""Pathology encoders released in Hugging Face `transformers` format, built with timm.

Phikon (ViTModel), Phikon-v2 and Midnight (Dinov2Model) and Hibou-B/-L (DINOv2 with 4 registers,
remote code) are published as `config.json` + `model.safetensors` with `transformers`' key names.
We build the same networks as timm `VisionTransformer`s (no `transformers` at runtime) and map the
release's keys onto timm's with `convert_state_dict`; tests check the outputs against
`transformers`' own classes at reduced size.

Mapping rules (one `transformers` layer -> one timm block):

- query/key/value (or `q_proj`/`k_proj`/`v_proj` as `transformers` >= 5 names them in memory) are
  concatenated into timm's fused `attn.qkv`;
- DINOv2's packed SwiGLU `mlp.weights_in` (gate rows first, then value rows) is timm's
  `SwiGLUPacked` `mlp.fc1` (GluMlp with the gate in the first half), `weights_out` its `fc2`;
- with registers, the CLS position embedding is a constant added to the CLS token only (registers
  get none), so it is folded into `cls_token` and the model is built with `no_embed_class=True`;
- a release whose position grid differs from the 224 px input's is resampled once at load the way
  `transformers` does it at every forward (bicubic, `align_corners=False`, fp32; antialias only
  for the registers class), so the 224 px output is the same.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable

import torch
from torch import nn

from .registry import EncoderSpec, register_encoder

TIMM_LICENSE = "Apache-2.0"
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
HALF = (0.5, 0.5, 0.5)

# Prefixes a task head wrapper (ViTForImageClassification, Dinov2ForImageClassification, ...) puts
# in front of the backbone's keys, and head keys that feature extraction does not use.
_WRAPPER_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.", "model.", "backbone.")
_DROPPED_PREFIXES = ("pooler.", "classifier.", "embeddings.mask_token")


def swiglu_hidden_width(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of DINOv2's SwiGLU MLP (and of `transformers`' Dinov2SwiGLUFFN): two thirds of
    `embed_dim * mlp_ratio`, rounded up to a multiple of 8 (Hibou-L: 2736, ViT-G: 4096)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def _cls_mean_head(model: nn.Module) -> nn.Module:
    """Make a timm ViT return cat[CLS, mean of patch tokens] (B, 2D) after its final norm.

    The mean skips every prefix token (CLS and registers), as the authors' recipe for Midnight
    (`tokens[:, 1:].mean(1)` on a model without registers) does.
    """
    def forward_head(x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return torch.cat([x[:, 0], x[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)

    model.forward_head = forward_head
    model.num_features = 2 * model.embed_dim
    return model


def hf_vit_builder(*, embed_dim: int, depth: int, num_heads: int, patch_size: int, mlp: str,
                   reg_tokens: int = 0, layer_scale: bool, eps: float = 1e-6, img_size: int = 224,
                   pooling: str = "cls") -> Callable[..., nn.Module]:
    """A builder of the timm ViT equal to a `transformers` ViT/DINOv2 of these sizes.

    `mlp`: "gelu" (fc1 = 4 x width) or "swiglu" (DINOv2 SwiGLU, packed). Overrides (depth,
    embed_dim, num_heads, img_size, ...) build smaller models of the same family for tests; the
    SwiGLU width follows `embed_dim` by DINOv2's rule.
    """
    def build(**overrides) -> nn.Module:
        from timm.layers import SwiGLUPacked
        from timm.models.vision_transformer import VisionTransformer

        args = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                    reg_tokens=reg_tokens, img_size=img_size)
        args.update(overrides)
        width = args["embed_dim"]
        if mlp == "swiglu":
            packed = 2 * swiglu_hidden_width(width)
            # timm sizes fc1 as int(width * mlp_ratio): +0.5 keeps float rounding from losing a unit.
            mlp_kwargs = dict(mlp_ratio=(packed + 0.5) / width, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
        else:
            mlp_kwargs = dict(mlp_ratio=4.0)
        model = VisionTransformer(
            num_classes=0, global_pool="token", class_token=True, qkv_bias=True,
            init_values=1.0 if layer_scale else None,  # the release overwrites the scale values
            no_embed_class=args["reg_tokens"] > 0, norm_layer=partial(nn.LayerNorm, eps=eps),
            **mlp_kwargs, **args)
        return _cls_mean_head(model) if pooling == "cls+mean" else model
    return build


def _strip_wrapper(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if any(k.startswith(prefix + "embeddings.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}


# transformers layer-local names -> timm block-local names (legacy hub layout, then the names
# transformers >= 5 uses for the same tensors in memory).
_LAYER_RENAMES = (
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),            # ViTModel
    ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),         # ViTModel MLP
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),  # Dinov2
    ("mlp.weights_in.", "mlp.fc1."), ("mlp.weights_out.", "mlp.fc2."),           # SwiGLU, packed
    ("mlp.down_proj.", "mlp.fc2."),
)
_QKV = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}


def _resample_grid(pos: torch.Tensor, grid: int, antialias: bool) -> torch.Tensor:
    """(1, G*G, D) patch position embeddings -> (1, grid*grid, D), as transformers interpolates."""
    old = int(round(pos.shape[1] ** 0.5))
    if old * old != pos.shape[1]:
        raise ValueError(f"position embeddings of {pos.shape[1]} tokens are not a square grid")
    img = pos.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    img = nn.functional.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False,
                                    antialias=antialias)
    return img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)


def _dinov2_native_to_timm(state: dict[str, torch.Tensor], *, grid: int, antialias: bool) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2-layout keys (Hibou's `hibou.build_model` weights: `register_tokens`,
    `mask_token`, packed SwiGLU `mlp.w12`/`mlp.w3`) -> timm's; other dicts are returned unchanged."""
    if not ({"register_tokens", "mask_token"} & state.keys() or any(".mlp.w12." in k for k in state)):
        return state
    out = {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v
           for k, v in state.items() if k != "mask_token"}
    pos = out.pop("pos_embed")
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    if patch_pos.shape[1] != grid * grid:
        patch_pos = _resample_grid(patch_pos, grid, antialias)
    if "register_tokens" in out:  # as in the HF layout: CLS position folded, registers unpositioned
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + cls_pos
        out["pos_embed"] = patch_pos
    else:
        out["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)
    return out


def hf_to_timm(state: dict[str, torch.Tensor], *, grid: int, antialias: bool = False) -> dict[str, torch.Tensor]:
    """`transformers` ViTModel / Dinov2Model / DINOv2-with-registers keys -> timm ViT keys.

    `grid`: patch grid side of the timm build (224 // patch size). A DINOv2-native dict goes
    through `_dinov2_native_to_timm`; one already in timm layout is returned unchanged.
    """
    state = _strip_wrapper(dict(state))
    if not any(k.startswith("embeddings.") for k in state):
        return _dinov2_native_to_timm(state, grid=grid, antialias=antialias)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    gates: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)", key)
        if m is None:
            out[key] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        q = re.fullmatch(r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)", rest)
        if q:
            qkv.setdefault((i, q.group(2)), {})[_QKV[q.group(1)]] = value
            continue
        g = re.fullmatch(r"mlp\.(gate_proj|up_proj)\.(weight|bias)", rest)
        if g:  # transformers >= 5 splits the packed SwiGLU; timm keeps the gate half first
            gates.setdefault((i, g.group(2)), {})[g.group(1)] = value
            continue
        for old, new in _LAYER_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[f"blocks.{i}.{rest}"] = value
    for (i, kind), parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"layer {i}: query/key/value {kind} incomplete in the checkpoint")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    for (i, kind), parts in gates.items():
        out[f"blocks.{i}.mlp.fc1.{kind}"] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=0)

    renamed = {"embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
               "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
               "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    out = {renamed.get(k, k): v for k, v in out.items()}
    cls = out.pop("embeddings.cls_token")
    pos = out.pop("embeddings.position_embeddings")
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    if patch_pos.shape[1] != grid * grid:
        patch_pos = _resample_grid(patch_pos, grid, antialias)
    registers = out.pop("embeddings.register_tokens", None)
    if registers is not None:
        out["reg_token"] = registers
        out["cls_token"] = cls + cls_pos
        out["pos_embed"] = patch_pos
    else:
        out["cls_token"] = cls
        out["pos_embed"] = torch.cat([cls_pos, patch_pos], dim=1)
    return out


def _register(name: str, *, build, patch_size: int, antialias_pos: bool = False, **fields) -> None:
    grid = 224 // patch_size
    register_encoder(EncoderSpec(
        name=name, build=build, input_size_px=224, patch_size_px=patch_size, resize_px=224, crop_px=224,
        native_mpp=0.5, recommended_patch_px=224, license=TIMM_LICENSE,
        convert_state_dict=partial(hf_to_timm, grid=grid, antialias=antialias_pos), **fields))


PHIKON_REF = ("Filiot et al., medRxiv 2023 (Phikon, iBOT ViT-B/16); github.com/owkin/HistoSSLscaling @73f1d19 "
              "README (ViTModel(add_pooling_layer=False), last_hidden_state[:, 0])")
_register(
    "phikon", patch_size=16,
    build=hf_vit_builder(embed_dim=768, depth=12, num_heads=12, patch_size=16, mlp="gelu", layer_scale=False),
    out_dim=768, output="cls", precision="fp32", hub_repo="owkin/phikon",
    files=("config.json", "pytorch_model.bin"), interpolation="bilinear", antialias=True,
    weights_license="Owkin non-commercial licence (owkin/phikon)", reference=PHIKON_REF,
    notes=("transformers ViTModel (ViT-B/16, iBOT teacher), CLS of last_hidden_state after the final "
           "LayerNorm (eps 1e-6: the hub config was fixed from 1e-12 to iBOT's 1e-6, owkin/phikon "
           "discussion #1). Preprocessing: the hub's ViTImageProcessor (224x224) / TRIDENT Resize(224) "
           "bilinear with antialias; the authors' own rl_benchmarks path feeds 224 px tiles "
           "unresized, which this equals at 224 px."))

PHIKON2_REF = ("Filiot et al., arXiv 2409.09173 (Phikon-v2, DINOv2 ViT-L/16); huggingface.co/owkin/phikon-v2; "
               "TRIDENT @a91fa84 patch_encoder_models/load.py (Phikonv2InferenceEncoder)")
_register(
    "phikon_v2", patch_size=16,
    build=hf_vit_builder(embed_dim=1024, depth=24, num_heads=16, patch_size=16, mlp="gelu", layer_scale=True),
    out_dim=1024, output="cls", precision="fp32", hub_repo="owkin/phikon-v2",
    files=("config.json", "model.safetensors"), interpolation="bilinear", antialias=True,
    weights_license="Owkin non-commercial licence (owkin/phikon-v2)", reference=PHIKON2_REF,
    notes=("transformers Dinov2Model (ViT-L/16, no registers), CLS of last_hidden_state. "
           "Preprocessing Resize(224)+CenterCrop(224) as TRIDENT; the hub processor config could "
           "not be read here (UNVERIFIED)."))

HIBOU_REF = ("Nechaev et al., arXiv 2406.05074 (Hibou); github.com/HistAI/hibou @c453bbe "
             "(build_model: patch 14, SwiGLU, 4 registers); TRIDENT @a91fa84 load.py (pooler_output)")
for _name, _dim, _depth, _heads, _repo in (("hibou_b", 768, 12, 12, "histai/hibou-b"),
                                            ("hibou_l", 1024, 24, 16, "histai/hibou-L")):
    _register(
        _name, patch_size=14, antialias_pos=True,
        build=hf_vit_builder(embed_dim=_dim, depth=_depth, num_heads=_heads, patch_size=14, mlp="swiglu",
                             reg_tokens=4, layer_scale=True),
        out_dim=_dim, output="cls (pooler_output; 4 registers not pooled)", precision="fp32",
        mean=HIBOU_MEAN, std=HIBOU_STD, interpolation="bicubic", antialias=True, gated=True,
        hub_repo=_repo, files=("config.json", "model.safetensors", "configuration_dinov2.py",
                               "modeling_dinov2.py"),
        weights_license="Apache-2.0 (Hibou README; hub access request)", reference=HIBOU_REF,
        notes=("DINOv2 ViT/14 with 4 register tokens and SwiGLU, released with remote code "
               "(trust_remote_code); pooler_output = CLS after the final LayerNorm. Keys mapped as "
               "transformers' Dinov2WithRegistersModel, which the tests use as reference (the hub's "
               "custom modeling file could not be read here: UNVERIFIED). hibou.build_model's own weights "
               "(DINOv2-native names) load too. Preprocessing Resize(224, bicubic) as TRIDENT, + "
               "CenterCrop(224) as LazySlide (identical on square tiles); the hub processor config "
               "could not be read here (UNVERIFIED)."))

MIDNIGHT_REF = ("Karasikov et al., arXiv 2504.05186 (Midnight); github.com/kaiko-ai/Midnight @e48dce1 README "
                "'Extract embeddings for classification'")
_MIDNIGHT_NOTES = ("transformers Dinov2Model ViT-G/14 (1536, 40 blocks, SwiGLU, no registers). Midnight's "
                   "authors (kaiko-ai/Midnight README, eval 'vitg14_Kaiko_Midnight_concat') recommend "
                   "cat[CLS, mean(patch tokens)] = 3072 for classification: `midnight`. TRIDENT's code "
                   "default and eva use CLS only = 1536: `midnight_cls`. Preprocessing Resize(224)+"
                   "CenterCrop(224), mean/std 0.5 (README). The release's position grid was not read here "
                   "(UNVERIFIED; DINOv2-G configs use 518 px = 37x37): a grid other than 16x16 is "
                   "resampled at load as transformers 5 does per forward (bicubic to the target size); "
                   "DINOv2's own code uses a +0.1 scale-factor form, which places positions slightly "
                   "differently.")
for _name, _pool, _dim in (("midnight", "cls+mean", 3072), ("midnight_cls", "cls", 1536)):
    _register(
        _name, patch_size=14,
        build=hf_vit_builder(embed_dim=1536, depth=40, num_heads=24, patch_size=14, mlp="swiglu",
                             layer_scale=True, pooling=_pool),
        out_dim=_dim, output=("cls+mean(patch tokens)" if _pool == "cls+mean" else "cls"), precision="fp16",
        mean=HALF, std=HALF, interpolation="bilinear", antialias=True, hub_repo="kaiko-ai/midnight",
        files=("config.json", "model.safetensors"), weights_license="MIT (kaiko-ai/midnight)",
        reference=MIDNIGHT_REF, notes=_MIDNIGHT_NOTES)

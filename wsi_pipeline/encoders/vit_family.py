"""Pathology foundation models that are timm Vision Transformers, each built exactly as its
authors' loader builds it (same timm architecture, same keyword arguments, same state-dict keys).

Every entry names the loader it follows (``reference``: repository @ commit, path). The
preprocessing fields follow the authors' torchvision transform, which runs on PIL images: PIL's
resize always antialiases, so ``antialias=True`` wherever the authors resize. Output rules:

- ``cls``: the class token after the final norm (timm ``global_pool="token"``);
- ``cls+mean``: ``cat[class token, mean of the patch tokens]`` after the final norm, registers
  excluded (Virchow, Virchow2, H0-mini) — (B, 2·D).

Weights always come from the user (``create_encoder(name, checkpoint=FILE_OR_FOLDER)``); the
release files load strictly into these builds (see :mod:`wsi_pipeline.encoders.weights` for the
layouts that are unwrapped on the way).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .registry import EncoderSpec, register_encoder

TIMM_LICENSE = "Apache-2.0"  # the architectures are built by timm
CC_BY_NC_ND = "CC-BY-NC-ND-4.0"
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HALF = (0.5, 0.5, 0.5)

# Anchors cited below (repository @ commit).
UNI_GIT = "mahmoodlab/UNI @ 42715ef"
TRIDENT_GIT = "mahmoodlab/TRIDENT @ a91fa84, trident/patch_encoder_models/load.py"
GIGAPATH_GIT = "prov-gigapath/prov-gigapath @ 09d8e87"
KAIKO_GIT = "kaiko-ai/towards_large_pathology_fms @ bfcde17, hubconf.py + README.md"
GPFM_GIT = "birkhoffkiki/GPFM @ 4f8be2b, models/dinov2/__init__.py + README.md"
MSTAR_GIT = "Innse/mSTAR @ 6cb5016, README.md + Feature_extract/models/mSTAR.py"


@functools.cache
def cls_mean_class() -> type:
    """timm's VisionTransformer whose head returns ``cat[class token, mean(patch tokens)]``.

    Only ``forward_head`` changes, so the module tree and state-dict keys are timm's own and the
    release's flat timm state dict loads strictly. (B, T, D) tokens after the final norm ->
    (B, 2·D); the ``num_prefix_tokens`` leading tokens (class + registers) are left out of the mean.
    Made on first use so that importing the registry does not import timm.
    """
    from timm.models import VisionTransformer

    class ClsMeanVisionTransformer(VisionTransformer):
        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            return torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)

    return ClsMeanVisionTransformer


def timm_vit(arch: str, output: str = "cls", swiglu: bool = False, **kwargs) -> Callable[..., nn.Module]:
    """Builder of timm ``arch`` with the authors' ``kwargs`` (``num_classes=0`` added) and output rule.

    ``swiglu``: add ``mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU`` (classes, so
    resolved at build time). ``overrides`` (depth, embed_dim, ...) build a smaller member of the
    same family for tests. The builder carries ``arch``/``kwargs``/``output`` for documentation.
    """
    if output not in ("cls", "cls+mean"):
        raise ValueError(f"unknown output rule {output!r}")

    def build(**overrides) -> nn.Module:
        import timm

        extra = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU} if swiglu else {}
        model = timm.create_model(arch, pretrained=False, **{"num_classes": 0, **extra, **kwargs, **overrides})
        if output == "cls+mean":
            # Same object, narrower behaviour: a subclass that only redefines forward_head.
            model.__class__ = cls_mean_class()
        return model

    build.arch, build.output = arch, output
    build.meta_overrides = {"weight_init": "skip"}  # shapes only: timm's init is seconds per giant
    build.kwargs = {**({"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"} if swiglu else {}),
                    **kwargs}
    return build


def _register(name: str, build, out_dim: int, *, patch_size_px: int, hub_repo: str, files: tuple[str, ...],
              weights_license: str, gated: bool, reference: str, **fields) -> None:
    output = "cls" if build.output == "cls" else "cls+mean(patch tokens, no registers)"
    register_encoder(EncoderSpec(name=name, build=build, out_dim=out_dim, patch_size_px=patch_size_px,
                                 license=TIMM_LICENSE, weights_license=weights_license, gated=gated,
                                 hub_repo=hub_repo, files=files, reference=reference, output=output,
                                 **fields))


# -- UNI family and same-shape relatives ---------------------------------------------------------
_UNI_KW = dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True)
_register(
    "uni", timm_vit("vit_large_patch16_224", **_UNI_KW), 1024, patch_size_px=16,
    aliases=("uni_vit_l16", "vit_large_patch16"), version=2,
    native_mpp=0.5, recommended_patch_px=256, resize_px=224, interpolation="bilinear", antialias=True,
    crop_px=224, precision="fp16", hub_repo="MahmoodLab/UNI", files=("pytorch_model.bin",),
    weights_license=CC_BY_NC_ND, gated=True,
    reference=f"Chen et al., Nat. Med. 2024; {UNI_GIT}, uni/get_encoder/get_encoder.py + README.md",
    notes="ViT-L/16 (timm vit_large_patch16_224, init_values 1e-5), class token 1024. Transform of "
          "the UNI README: Resize(224) + CenterCrop(224), ImageNet mean/std; 256 px tiles at 20x "
          "(TRIDENT). version 2: the names uni_vit_l16 / vit_large_patch16 fed patches at their own "
          "size before; they now follow UNI's transform. Same tensor shapes as mstar and phikon_v2 (once its "
          "transformers names are converted): a file cannot tell which of them it is.")
_register(
    "uni2_h", timm_vit("vit_giant_patch14_224", swiglu=True, img_size=224, patch_size=14, depth=24,
                           num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
                           no_embed_class=True, reg_tokens=8, dynamic_img_size=True),
    1536, patch_size_px=14,
    native_mpp=0.5, recommended_patch_px=256, resize_px=224, interpolation="bilinear", antialias=True,
    crop_px=224, precision="bf16", hub_repo="MahmoodLab/UNI2-h", files=("pytorch_model.bin",),
    weights_license=CC_BY_NC_ND, gated=True,
    reference=f"Chen et al., Nat. Med. 2024; {UNI_GIT}, uni/get_encoder/get_encoder.py + README.md",
    notes="ViT-H/14-like (24 blocks, 1536 wide, SwiGLU, 8 registers), class token 1536. Transform as "
          "UNI. bf16 autocast as TRIDENT.")
_register(
    "mstar", timm_vit("vit_large_patch16_224", **_UNI_KW), 1024, patch_size_px=16,
    native_mpp=0.5, recommended_patch_px=256, resize_px=224, interpolation="bilinear", antialias=True,
    crop_px=None, precision="fp16", hub_repo="Wangyh/mSTAR", files=("mSTAR.pth",),
    weights_license=CC_BY_NC_ND, gated=True, reference=f"Xu et al., 2024 (mSTAR); {MSTAR_GIT}",
    notes="UNI's ViT-L/16 build (same kwargs, same tensor shapes as uni: a file cannot tell them "
          "apart), class token 1024. Transform of the mSTAR README: Resize(224), no crop, ImageNet "
          "mean/std. Tile size not stated by the authors (they tile with CLAM: 256 px at 20x "
          "assumed); precision not stated (fp16 as UNI).")

# -- Virchow / Virchow2 ----------------------------------------------------------------------------
_VIRCHOW_KW = dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True)
_VIRCHOW_COMMON = dict(native_mpp=0.5, recommended_patch_px=224, resize_px=224, interpolation="bicubic",
                       antialias=True, crop_px=None, precision="fp16")
_VIRCHOW_POOL = ("Output as the Virchow model card recommends: cat[class token, mean of the patch tokens] "
                 "(TRIDENT, slideflow, LazySlide); STAMP's `virchow`/`virchow2` and eva use the class "
                 "token alone, offered as `{name}_cls` (1280).")
_VIRCHOW_REF = "Vorontsov et al., Nat. Med. 2024; huggingface.co/paige-ai/Virchow model card; " + TRIDENT_GIT
_VIRCHOW2_REF = "Zimmermann et al., arXiv 2408.00738; huggingface.co/paige-ai/Virchow2 model card; " + TRIDENT_GIT
for _name, _ref, _extra, _lic, _files in (
        ("virchow", _VIRCHOW_REF, {}, "Apache-2.0 with additional terms (model card; non-commercial, "
         "institutional e-mail); slideflow states CC-BY-NC-ND-4.0", ("pytorch_model.bin", "config.json")),
        ("virchow2", _VIRCHOW2_REF, {"reg_tokens": 4}, CC_BY_NC_ND,
         ("pytorch_model.bin", "model.safetensors", "config.json"))):
    for _suffix, _output, _dim in (("", "cls+mean", 2560), ("_cls", "cls", 1280)):
        _kw = {**_VIRCHOW_KW, **_extra}
        if _output == "cls":
            _kw["global_pool"] = "token"  # pooling only: same module tree and keys as the official build
        _register(
            _name + _suffix, timm_vit("vit_huge_patch14_224", _output, swiglu=True, **_kw), _dim,
            patch_size_px=14, hub_repo=f"paige-ai/{'Virchow2' if _name == 'virchow2' else 'Virchow'}",
            files=_files, weights_license=_lic, gated=True, reference=_ref, **_VIRCHOW_COMMON,
            notes=(f"ViT-H/14 (32 blocks, 1280 wide, SwiGLU{', 4 registers' if _extra else ''}). "
                   + ("This entry: the class token alone (1280). " if _output == "cls" else "")
                   + _VIRCHOW_POOL.format(name=_name)
                   + " Transform: Resize(224, bicubic), ImageNet mean/std (TRIDENT; the hub config's "
                     "timm transform, crop_pct 1.0, gives the same on square patches)."
                   + (" Virchow2 was trained on 5-40x tiles (mixed magnification); 224 px at 20x "
                      "is the default." if _extra else "")))

# -- Bioptimus -----------------------------------------------------------------------------------
_HOPT_KW = dict(img_size=224, global_pool="token", init_values=1e-5, dynamic_img_size=True)
_HOPT_COMMON = dict(native_mpp=0.5, recommended_patch_px=224, resize_px=224, interpolation="bicubic",
                    antialias=True, crop_px=None, precision="fp16", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD)
_HOPT_NOTE = ("ViT-g/14 (40 blocks, 1536 wide, SwiGLU, 4 registers; timm vit_giant_patch14_reg4_dinov2), "
              "class token 1536. The authors feed 224 px tiles at 0.5 um/px with no resize (model card); "
              "other sizes are resized to 224 bicubic as the hub config's timm transform does (TRIDENT: "
              "bilinear). Built with dynamic_img_size=True as TRIDENT (the card sets False): same "
              "outputs at 224 px. fp16 autocast as the card recommends.")
_register(
    "h_optimus_0", timm_vit("vit_giant_patch14_reg4_dinov2", **_HOPT_KW), 1536, patch_size_px=14,
    hub_repo="bioptimus/H-optimus-0", files=("pytorch_model.bin", "config.json"),
    weights_license="Apache-2.0", gated=True,
    reference="Saillard et al., 2024 (H-optimus-0); huggingface.co/bioptimus/H-optimus-0 model card; "
              "bioptimus/releases @ c369f8f, models/h-optimus/v0/README.md; " + TRIDENT_GIT,
    notes=_HOPT_NOTE + " Access request approved automatically.", **_HOPT_COMMON)
_register(
    "h_optimus_1", timm_vit("vit_giant_patch14_reg4_dinov2", **_HOPT_KW), 1536, patch_size_px=14,
    hub_repo="bioptimus/H-optimus-1", files=("pytorch_model.bin", "config.json"),
    weights_license=CC_BY_NC_ND, gated=True,
    reference="Bioptimus 2025 (H-optimus-1); huggingface.co/bioptimus/H-optimus-1 model card; " + TRIDENT_GIT,
    notes=_HOPT_NOTE + " Same tensor shapes as h_optimus_0: a file cannot tell which of the two it is.",
    **_HOPT_COMMON)
_H0_KW = dict(img_size=224, global_pool="", dynamic_img_size=True)
for _name, _output, _dim in (("h0_mini", "cls+mean", 1536), ("h0_mini_cls", "cls", 768)):
    _register(
        _name, timm_vit("vit_base_patch14_reg4_dinov2", _output, swiglu=True,
                            **{**_H0_KW, **({"global_pool": "token"} if _output == "cls" else {})}),
        _dim, patch_size_px=14, hub_repo="bioptimus/H0-mini", files=("pytorch_model.bin", "config.json"),
        weights_license=CC_BY_NC_ND, gated=True, **_HOPT_COMMON,
        reference="Filiot et al., arXiv 2501.16239 (H0-mini); huggingface.co/bioptimus/H0-mini model card; "
                  "docs.bioptimus.com/sdk-reference/models/types; " + TRIDENT_GIT,
        notes="ViT-B/14 distilled from H-optimus-0 (12 blocks, 768 wide, SwiGLU, 4 registers; timm "
              "vit_base_patch14_reg4_dinov2 + SwiGLUPacked/SiLU as the card passes; the hub config's "
              "mlp_ratio is not readable offline: timm's default 4 is used, as the card's create_model "
              "call passes no mlp_ratio and Bioptimus's H-optimus-0 config carries no model_args). Output "
              "as Bioptimus's SDK specifies (output_type cls+patch_mean, 1536) and the card computes: "
              "cat[class token, mean of the patch tokens without registers]; TRIDENT's default is the "
              "class token (768), offered as h0_mini_cls. H-optimus mean/std, 224 px at 0.5 um/px.")

# -- Prov-GigaPath ------------------------------------------------------------------------------
_register(
    "gigapath", timm_vit("vit_giant_patch14_dinov2", img_size=224, in_chans=3, patch_size=16,
                             embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
                             dynamic_img_size=True),
    1536, patch_size_px=16,
    native_mpp=0.5, recommended_patch_px=256, resize_px=256, interpolation="bicubic", antialias=True,
    crop_px=224, precision="fp16", hub_repo="prov-gigapath/prov-gigapath", files=("pytorch_model.bin",),
    weights_license="Apache-2.0 (with the model card's conditions)", gated=True,
    reference=f"Xu et al., Nature 2024 (Prov-GigaPath); {GIGAPATH_GIT}, README.md; " + TRIDENT_GIT,
    notes="ViT-g/16 (timm vit_giant_patch14_dinov2 with patch 16, 40 blocks, 1536 wide, SwiGLU; no "
          "registers), class token 1536. Transform of the README: Resize(256, bicubic), "
          "CenterCrop(224), ImageNet mean/std; 256 px tiles at 0.5 um/px.")

# -- Lunit and Kaiko (plain timm ViTs) ----------------------------------------------------------
_register(
    "lunit_vits8", timm_vit("vit_small_patch8_224", img_size=224, dynamic_img_size=True), 384,
    patch_size_px=8, native_mpp=0.5, recommended_patch_px=224, resize_px=224, interpolation="bicubic",
    antialias=True, crop_px=None, precision="fp32", mean=LUNIT_MEAN, std=LUNIT_STD,
    hub_repo="1aurent/vit_small_patch8_224.lunit_dino",
    files=("model.safetensors", "config.json"), weights_license="Lunit non-commercial (benchmark-ssl-pathology)",
    gated=False,
    reference="Kang et al., CVPR 2023 (Lunit DINO ViT-S/8); lunit-io/benchmark-ssl-pathology; " + TRIDENT_GIT,
    notes="DINO ViT-S/8 (timm vit_small_patch8_224), class token 384; Lunit's own mean/std. The "
          "GitHub release file dino_vit_small_patch8_ep200.torch holds the same timm keys. 224 px at "
          "20x (TRIDENT); other sizes resized bicubic as timm's default transform (hub config not "
          "verified offline). Same tensor shapes as kaiko_vits8: a file cannot tell them apart.")
_KAIKO = (("kaiko_vits16", "vit_small_patch16_224", 384, 16, "vits16.pth", "vit_small_patch16_224"),
          ("kaiko_vits8", "vit_small_patch8_224", 384, 8, "vits8.pth", "vit_small_patch8_224"),
          ("kaiko_vitb16", "vit_base_patch16_224", 768, 16, "vitb16.pth", "vit_base_patch16_224"),
          ("kaiko_vitb8", "vit_base_patch8_224", 768, 8, "vitb8.pth", "vit_base_patch8_224"),
          ("kaiko_vitl14", "vit_large_patch14_reg4_dinov2", 1024, 14, "vitl14.pth",
           "vit_large_patch14_reg4_dinov2"))
for _name, _arch, _dim, _patch, _file, _port in _KAIKO:
    _register(
        _name, timm_vit(_arch, dynamic_img_size=True), _dim, patch_size_px=_patch,
        native_mpp=0.5, recommended_patch_px=256, resize_px=224, interpolation="bilinear", antialias=True,
        crop_px=224, precision="fp32", mean=HALF, std=HALF,
        hub_repo=f"github.com/kaiko-ai/towards_large_pathology_fms release 0.0.1 (or 1aurent/{_port}"
                 f".kaiko_ai_towards_large_pathology_fms)",
        files=(_file,), weights_license="Kaiko Non-Commercial Public License v1", gated=False,
        reference=f"Aben et al., arXiv 2404.15217 (kaiko.ai); {KAIKO_GIT}; " + TRIDENT_GIT,
        notes=f"timm {_arch} as the authors' hubconf builds it (num_classes 0, dynamic_img_size), class "
              f"token {_dim}. Transform of the README: Resize(224), CenterCrop(224), mean/std 0.5; 256 "
              "px tiles at 20x (TRIDENT)."
              + (" Built at timm's native 518 px grid (pos_embed 37x37) like the release; 224 px input "
                 "interpolates it." if _arch.endswith("dinov2") else "")
              + (" Same tensor shapes as lunit_vits8." if _name == "kaiko_vits8" else ""))

# -- GPFM ------------------------------------------------------------------------------------------
_register(
    "gpfm", timm_vit("vit_large_patch14_dinov2", img_size=224, init_values=1e-5, dynamic_img_size=True),
    1024, patch_size_px=14, native_mpp=0.25, recommended_patch_px=512, resize_px=224,
    interpolation="bicubic", antialias=True, crop_px=None, precision="fp16",
    hub_repo="majiabo/GPFM (or github.com/birkhoffkiki/GPFM release ckpt)", files=("GPFM.pth",),
    weights_license=CC_BY_NC_ND, gated=False, reference=f"Ma et al., 2024 (GPFM); {GPFM_GIT}; " + TRIDENT_GIT,
    notes="DINOv2 ViT-L/14 (GELU MLP, no registers; timm vit_large_patch14_dinov2 at 224), class token "
          "1024. The authors tile 512 px at 40x (0.25 um/px) and Resize((224, 224), bicubic), ImageNet "
          "mean/std; TRIDENT tiles 224 at 20x. The GitHub release file (teacher, chunked DINOv2 blocks) "
          "and the hub file (flat timm keys) both load.")

__all__ = ["cls_mean_class", "timm_vit"]

"""CTransPath (Wang et al., MedIA 2022) and the CHIEF-trained CTransPath (Wang et al., Nature 2024).

Both are timm's ``swin_tiny_patch4_window7_224`` whose 4x4 patchify conv is replaced by a small
convolutional stem, with the classifier removed: features are the global average of the final
LayerNorm's tokens, (B, 768). The releases were trained with a patched timm 0.5.4, whose Swin puts
each stage's patch merging at the *end* of the stage and saves the attention-mask and relative-
position-index buffers; :func:`convert_release_state_dict` maps that layout to the current timm Swin
(merging at the *start* of the next stage, buffers rebuilt, not loaded).

Input (B, 3, 224, 224), ImageNet-normalised; output (B, 768).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .registry import EncoderSpec, register_encoder

EMBED_DIM = 96             # Swin-T stage-0 width; the stem's last conv outputs it
STEM_PATCH_PX = 4          # two stride-2 convs: one token per 4x4 pixels, as Swin-T's patchify
OUT_DIM = 768              # Swin-T final width, 96 * 2**3

# Weights' sha256 as pinned by STAMP (KatherLab/STAMP @c54ce06, preprocessing/extractor/
# ctranspath.py and chief_ctranspath.py) for the Google-Drive files; TRIDENT's CHIEF_CTransPath.pth
# (MahmoodLab/hest-bench) has no published digest.
RELEASE_SHA256 = {
    "ctranspath.pth": "7c998680060c8743551a412583fac689db43cec07053b72dfec6dcd810113539",
    "chief_ctranspath.pth": "1646f23001214f74cf432ef0e80b808ee6605143802ae6ed53a87564ddc4924a",
}


class ConvStem(nn.Module):
    """CTransPath's patch embedding: (B, 3, H, W) -> (B, H/4, W/4, embed_dim) tokens (NHWC).

    2 x [3x3 conv stride 2 (no bias), BatchNorm, ReLU] widening 3 -> embed_dim/8 -> embed_dim/4,
    then a 1x1 conv (with bias) to embed_dim, then ``norm_layer`` over channels. The Sequential's
    indices (proj.0/1/3/4/6) are the release's key names. Takes timm's SwinTransformer
    ``embed_layer`` keyword arguments (timm hands it NHWC output format and device/dtype).
    """

    def __init__(self, img_size=224, patch_size=STEM_PATCH_PX, in_chans=3, embed_dim=EMBED_DIM,
                 norm_layer=None, strict_img_size=True, output_fmt="NHWC", device=None, dtype=None, **_):
        super().__init__()
        if patch_size != STEM_PATCH_PX or embed_dim % 8:
            raise ValueError(f"ConvStem needs patch_size {STEM_PATCH_PX} and embed_dim divisible by 8, "
                             f"got {patch_size}, {embed_dim}")
        if output_fmt != "NHWC":
            raise ValueError(f"ConvStem outputs NHWC tokens (timm's Swin); got output_fmt {output_fmt!r}")
        dd = {"device": device, "dtype": dtype}
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (STEM_PATCH_PX, STEM_PATCH_PX)
        self.grid_size = (self.img_size[0] // STEM_PATCH_PX, self.img_size[1] // STEM_PATCH_PX)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        layers: list[nn.Module] = []
        width_in, width_out = in_chans, embed_dim // 8
        for _stage in range(2):
            layers += [nn.Conv2d(width_in, width_out, kernel_size=3, stride=2, padding=1, bias=False, **dd),
                       nn.BatchNorm2d(width_out, **dd), nn.ReLU(inplace=True)]
            width_in, width_out = width_out, width_out * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1, **dd))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"CTransPath expects {self.img_size[0]}x{self.img_size[1]} px input, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def build_ctranspath(**overrides) -> nn.Module:
    """The Swin-T + ConvStem trunk, no head: (B, 3, 224, 224) -> (B, 768). ``overrides`` go to
    timm (e.g. ``depths=(2, 2, 2, 2)`` for a smaller model of the same layout in tests)."""
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0,
                             embed_layer=ConvStem, **overrides)


_OLD_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
# Buffers timm 0.5.4 saved; the current Swin rebuilds them from the geometry (non-persistent).
_REBUILT_BUFFERS = (".attn_mask", ".relative_position_index")


def convert_release_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release (patched timm 0.5.4) keys -> current timm Swin keys.

    - ``layers.i.downsample.*`` (merging at the end of stage i) -> ``layers.{i+1}.downsample.*``
      (timm >= 0.9 merges at the start of the next stage; same weights, same 2x2 concat order);
    - ``*.attn_mask`` / ``*.relative_position_index`` dropped (rebuilt by the model);
    - ``head.*`` dropped: the releases are headless, a classifier would be unused anyway.
    A dict already in the current layout (no ``layers.0.downsample``) passes through unchanged.
    """
    old_layout = "layers.0.downsample.reduction.weight" in state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(_REBUILT_BUFFERS) or key.startswith("head."):
            continue
        if old_layout:
            key = _OLD_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out[key] = value
    return out


_COMMON = dict(
    build=build_ctranspath, out_dim=OUT_DIM, input_size_px=224, patch_size_px=None,
    resize_px=224, interpolation="bilinear", antialias=True, crop_px=None,
    output="mean of the final-norm tokens (Swin global average pool)", precision="fp32",
    convert_state_dict=convert_release_state_dict, license="Apache-2.0",
)

register_encoder(EncoderSpec(
    name="ctranspath", native_mpp=1.0, recommended_patch_px=224,
    gated=False, hub_repo="drive.google.com/file/d/1DoDx_70_TLj98gTf6YTXnu4tFhsFocDX (TransPath README)",
    files=("ctranspath.pth",),
    weights_license="GPL-3.0 (TransPath repository licence; no separate weights licence stated)",
    reference=("Wang et al., Medical Image Analysis 2022 (CTransPath); github.com/Xiyue-Wang/TransPath "
               "@26c6194 ctran.py + get_features_CTransPath.py"),
    notes=("Original TransPath weights. Preprocessing: Resize(224) (bilinear, on PIL images, i.e. "
           "antialiased), no crop, ImageNet mean/std, as TransPath get_features_CTransPath.py; STAMP adds "
           "CenterCrop(224), which changes nothing for square patches. TransPath README: 'first try to "
           "extract features at 1.0mpp'; 224 px there needs no resize (STAMP tiles 224 px at 1.143 "
           "µm/px, TRIDENT's CHIEF entry 256 px at 10x). Release: torch file {'model': state_dict} in patched-timm-0.5.4 "
           "keys, converted on load; sha256 " + RELEASE_SHA256["ctranspath.pth"][:16] + "... (STAMP). "
           "Whether this file loads with weights_only=True is unverified (STAMP unpickles it)."),
    **_COMMON))

register_encoder(EncoderSpec(
    name="chief_ctranspath", native_mpp=1.0, recommended_patch_px=256,
    gated=True, hub_repo="MahmoodLab/hest-bench (dataset, fm_v1/ctranspath/); CHIEF Google-Drive folder",
    files=("CHIEF_CTransPath.pth",),
    weights_license="GPL-3.0, non-commercial academic use (CHIEF README)",
    reference=("Wang et al., Nature 2024 (CHIEF); github.com/hms-dbmi/CHIEF @1abed33 README + models/ctran.py "
               "(identical to TransPath ctran.py); TRIDENT @a91fa84 patch_encoder_models/load.py"),
    notes=("CHIEF-trained CTransPath: same architecture and key layout as ctranspath, other weights. "
           "TRIDENT calls this entry 'ctranspath'; STAMP keeps 'ctranspath' and 'chief-ctranspath' apart "
           "(different sha256) and so do we. Preprocessing: Resize(224) bilinear antialiased, no crop, "
           "ImageNet mean/std (CHIEF README; TRIDENT the same). Tiling 256 px at 10x (TRIDENT README). "
           "STAMP's copy (chief_ctranspath.pth) has sha256 " + RELEASE_SHA256["chief_ctranspath.pth"][:16]
           + "...; TRIDENT loads CHIEF_CTransPath.pth with weights_only=True."),
    **_COMMON))

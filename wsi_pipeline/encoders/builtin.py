"""Registered timm-built encoders. Weights always come from the caller (file, hub id, or 'random').
The parameter-free `stain_texture` registers itself in its own file (handcrafted.py), the
pathology foundation-model ViTs in vit_family.py."""

from __future__ import annotations

from torch import nn

from . import conch, ctranspath, handcrafted, hf_family, musk, vim4path, vit_family, volume3d  # noqa: F401  (register their entries)
from .registry import EncoderSpec, register_encoder

TIMM_LICENSE = "Apache-2.0"  # the architectures are built by timm
VIT_REFERENCE = "Dosovitskiy et al., ICLR 2021 (ViT), built by timm (github.com/huggingface/pytorch-image-models)"
USER_WEIGHTS = "the checkpoint's (weights are supplied by the user)"
# What `extract.precision: auto` ran these generic entries at on a GPU before each entry carried a
# recommendation (bf16; tests/gpu and BENCHMARKS.md measured them so): kept, so their features stay valid.
GENERIC_PRECISION = "bf16"


def _resnet50_trunc(**overrides) -> nn.Module:
    """CLAM's encoder: ImageNet ResNet-50 up to layer3 (1024 channels), global average pooled."""
    import timm

    model = timm.create_model("resnet50", pretrained=False, num_classes=0, **overrides)
    model.layer4 = nn.Identity()
    model.num_features = 1024
    return model


def _vit(name: str, **kwargs):
    def build(**overrides) -> nn.Module:
        # overrides (depth, img_size, ...) build a smaller model of the same family, e.g. for tests.
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True,
                                 **{**kwargs, **overrides})
    build.meta_overrides = {"weight_init": "skip"}  # shape checks on the meta device skip timm's init
    return build


register_encoder(EncoderSpec(
    name="resnet50_trunc", build=_resnet50_trunc, out_dim=1024,
    # torchvision/timm ImageNet checkpoints carry layer4 and fc, which this encoder drops.
    ignore_prefixes=("layer4.", "fc."), native_mpp=None, precision=GENERIC_PRECISION,
    notes="CLAM baseline; load torchvision/timm ImageNet ResNet-50 weights",
    license=TIMM_LICENSE, weights_license=USER_WEIGHTS,
    reference="Lu et al., Nature Biomedical Engineering 2021 (CLAM); github.com/mahmoodlab/CLAM"))
register_encoder(EncoderSpec(name="vit_small_patch16", build=_vit("vit_small_patch16_224"), out_dim=384,
                             patch_size_px=16, precision=GENERIC_PRECISION, license=TIMM_LICENSE, weights_license=USER_WEIGHTS,
                             reference=VIT_REFERENCE))
register_encoder(EncoderSpec(name="vit_base_patch16", build=_vit("vit_base_patch16_224"), out_dim=768,
                             patch_size_px=16, precision=GENERIC_PRECISION, license=TIMM_LICENSE, weights_license=USER_WEIGHTS,
                             reference=VIT_REFERENCE))

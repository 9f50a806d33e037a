"""Registered encoders. Weights always come from the caller (file, hub id, or 'random');
`stain_texture` has none."""

from __future__ import annotations

from torch import nn

from .handcrafted import STAIN_TEXTURE_DIM, STAIN_TEXTURE_VERSION, StainTextureFeatures
from .registry import EncoderSpec, register_encoder


def _resnet50_trunc() -> nn.Module:
    """CLAM's encoder: ImageNet ResNet-50 up to layer3 (1024 channels), global average pooled."""
    import timm

    model = timm.create_model("resnet50", pretrained=False, num_classes=0)
    model.layer4 = nn.Identity()
    model.num_features = 1024
    return model


def _vit(name: str, **kwargs):
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    return build


register_encoder(EncoderSpec(
    name="resnet50_trunc", build=_resnet50_trunc, out_dim=1024,
    # torchvision/timm ImageNet checkpoints carry layer4 and fc, which this encoder drops.
    ignore_prefixes=("layer4.", "fc."), native_mpp=None,
    notes="CLAM baseline; load torchvision/timm ImageNet ResNet-50 weights"))
register_encoder(EncoderSpec(name="vit_small_patch16", build=_vit("vit_small_patch16_224"), out_dim=384))
register_encoder(EncoderSpec(name="vit_base_patch16", build=_vit("vit_base_patch16_224"), out_dim=768))
register_encoder(EncoderSpec(
    name="vit_large_patch16", build=_vit("vit_large_patch16_224", init_values=1e-5), out_dim=1024,
    native_mpp=0.5, notes="UNI-style ViT-L/16 (init_values 1e-5, no head); UNI weights from a local file"))
register_encoder(EncoderSpec(
    name="uni_vit_l16", build=_vit("vit_large_patch16_224", init_values=1e-5), out_dim=1024,
    native_mpp=0.5, notes="alias of vit_large_patch16 under UNI's name"))
register_encoder(EncoderSpec(
    name="stain_texture", build=StainTextureFeatures, out_dim=STAIN_TEXTURE_DIM,
    # The descriptors take RGB in [0, 1]: Encoder.normalise divides by 255 and nothing else.
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), parameter_free=True, version=STAIN_TEXTURE_VERSION,
    notes="colour-deconvolution and texture descriptors, no weights (checkpoint: none); "
          "the offline demo's encoder, not a foundation-model substitute"))

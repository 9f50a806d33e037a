"""Segmenter registry: pixel segmentation networks, images in, logits out (`create_segmenter`)."""

from . import vmunet  # noqa: F401  (registers the VM-UNet variants)
from .registry import SEGMENTERS, create_segmenter, list_segmenters, register_segmenter
from .vmunet import SS2D, VMUNet, VSSBlock

__all__ = ["SEGMENTERS", "create_segmenter", "list_segmenters", "register_segmenter", "SS2D", "VMUNet", "VSSBlock"]

"""Slide reading: `open_slide(path) -> Slide` over OpenSlide or tiffslide."""

from .slide import Slide, mpp_from_properties, open_slide

__all__ = ["Slide", "open_slide", "mpp_from_properties"]

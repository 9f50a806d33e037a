"""Synthetic cohorts with ground truth: H&E-like slides (slides.py) and CT volumes (volumes.py).

`from wsi_pipeline.demo import make_demo_cohort` (the path before this package) still works:
slides.py's names load from here on first use.
"""

import importlib

_SLIDE_NAMES = ("DemoSlideSpec", "GT_DOWNSAMPLE", "HARD_SIZE_PX", "make_demo_cohort", "render_slide",
                "write_demo_slide")


def __getattr__(name: str):
    if name in _SLIDE_NAMES:
        return getattr(importlib.import_module(f"{__name__}.slides"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

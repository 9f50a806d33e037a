"""Compatibility: `wsi_pipeline.tissue` moved to `wsi_pipeline.tiling.tissue` (detect_tissue and the tissue mask; issue 28).

Kept because users' scripts and earlier READMEs import this path. This module replaces itself with
the new one, so both names are one module object (monkeypatching either patches both).
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("wsi_pipeline.tiling.tissue")

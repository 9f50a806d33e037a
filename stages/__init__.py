"""The pipeline's stages, one thin module each, all of one shape (`stages.base.Stage`).

`STAGES` is the list cli.py builds its subcommands from and the workflow's rules call; adding a
stage means one module here (with its `Stage`), one entry below, one rule and one config section.
Torch and the models load inside `run`, never at import, so building the CLI stays fast.
"""

from __future__ import annotations

import importlib

from .base import Stage, StageReport, invoke

# name -> "module:attribute" of its Stage, in pipeline order.
_STAGE_OBJECTS = {
    "tile": "stages.tile:TILE",
    "extract": "stages.extract:EXTRACT",
    "train": "stages.train:TRAIN",
    "predict": "stages.predict:PREDICT",
    "heatmap": "stages.heatmap:HEATMAP",
    "segment": "stages.segment:SEGMENT",
    "train-detector": "stages.detect:TRAIN_DETECTOR",
    "detect": "stages.detect:DETECT",
    "eval-detect": "stages.detect:EVAL_DETECT",
    "export": "stages.export:EXPORT",   # not a workflow rule: run on a finished run's features
}
STAGE_NAMES = tuple(_STAGE_OBJECTS)


def get_stage(name: str) -> Stage:
    module, attr = _STAGE_OBJECTS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def all_stages() -> list[Stage]:
    return [get_stage(name) for name in STAGE_NAMES]


__all__ = ["STAGE_NAMES", "Stage", "StageReport", "all_stages", "get_stage", "invoke"]

"""Detector checkpoints in the common format: model.safetensors + config.json, written atomically.

config.json is written last, so a folder with config.json has complete weights. Loading never
unpickles: weights come from safetensors, the architecture from the registry by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PipelineError
from ..io import atomic_path, sha256_file, write_json_atomic
from ..models.detect import create_detector

FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_detector(folder: str | Path, model: torch.nn.Module, config: dict) -> Path:
    """config: {"detector", "model_args", "classes", "work_mpp", "sigma_um", ...} (JSON-able)."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json_atomic(folder / CONFIG, {"format_version": FORMAT_VERSION, **config})
    return folder


def load_detector(folder: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, its config). A missing or broken checkpoint: PipelineError."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise PipelineError(f"no detector checkpoint in {folder} (need {WEIGHTS} and {CONFIG}; "
                            f"train one with `wsi-pipeline train-detector`)")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        model = create_detector(config["detector"], n_classes=len(config["classes"]), **config.get("model_args", {}))
        model.load_state_dict(load_file(str(folder / WEIGHTS)))
    except (KeyError, ValueError, RuntimeError, OSError, json.JSONDecodeError, SafetensorError) as exc:
        # SafetensorError: not a safetensors file (a pickle put in its place is never unpickled).
        raise PipelineError(f"detector checkpoint {folder} cannot be loaded: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval(), config


def checkpoint_hash(folder: str | Path) -> str:
    folder = Path(folder)
    return sha256_file(folder / WEIGHTS)[:16] + "-" + sha256_file(folder / CONFIG)[:16]

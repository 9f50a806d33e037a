"""The trained segmenter of a run: built from the config, saved as RUN/segment/model/
(model.safetensors + config.json written last), and what it depends on (its identity), so a rerun
retrains only when the CAMs, labels or settings change. Weights are safetensors: no pickle."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_path, write_json_atomic
from ..run.config import Config

# Keys that only shape the masks drawn from the probability map: changing them redoes the slides'
# outputs but keeps the trained segmenter.
INFERENCE_ONLY_KEYS = ("mask_mpp", "threshold", "min_lesion_area_um2", "cam_gate",
                       "gate_negatives")


def training_config(cfg: Config) -> dict:
    """What the trained segmenter depends on: the segment section (less inference-only keys), tissue
    detection (pseudo-labels use it) and the slide reader."""
    segment = {k: v for k, v in dataclasses.asdict(cfg.segment).items() if k not in INFERENCE_ONLY_KEYS}
    return {"segment": segment, "tissue": dataclasses.asdict(cfg.tissue), "slides": dataclasses.asdict(cfg.slides)}


def train_params(cfg: Config):
    """The segment section's training parameters as the trainer's `TrainParams` (the section
    composes them: config.SegmentConfig derives from `params.SegmenterFitParams`)."""
    from .params import SegmenterFitParams
    from .train import TrainParams

    shared = {f.name: getattr(cfg.segment, f.name) for f in dataclasses.fields(SegmenterFitParams)}
    return TrainParams(**shared)


def build_segmenter(cfg: Config):
    import torch

    from ..models.seg import create_segmenter

    torch.manual_seed(cfg.segment.seed)
    try:
        return create_segmenter(cfg.segment.model, **cfg.segment.model_args)
    except KeyError as exc:
        raise ConfigError(f"segment.model: {exc.args[0]}") from None
    except TypeError as exc:
        raise ConfigError(f"segment.model_args: {exc}") from None


def model_is_current(model_dir: Path, identity: str) -> bool:
    meta_path = model_dir / "config.json"
    if not (meta_path.is_file() and (model_dir / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")).get("identity") == identity
    except (OSError, json.JSONDecodeError):
        return False


def save_segmenter(model, model_dir: Path, meta: dict) -> None:
    """Weights first, config.json (the completion marker) last; both atomic."""
    from safetensors.torch import save_model

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").unlink(missing_ok=True)
    with atomic_path(model_dir / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    write_json_atomic(model_dir / "config.json", meta)


def load_segmenter(cfg: Config, model_dir: Path, device):
    from safetensors.torch import load_model

    from safetensors import SafetensorError

    from ..errors import PipelineError

    model = build_segmenter(cfg)
    weights = model_dir / "model.safetensors"
    try:
        load_model(model, str(weights), device=str(device))
    except (SafetensorError, RuntimeError, OSError) as exc:   # not safetensors (never unpickled), or another shape
        raise PipelineError(f"segmenter checkpoint {weights} cannot be loaded: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval()

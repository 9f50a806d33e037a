"""Everything a run needs checked before its first job starts: the manifest, the config, the names
in them (wsi_pipeline.names) and the models they name (the encoder, MIL and segmenter registries).

`wsi-pipeline run` and the workflow's Snakefile call `validate_run_inputs`; every problem is listed
at once (InputsError, exit 2), and nothing is created in the run folder or handed to a shell.
The registry checks import torch (and timm for an encoder outside our registry), so the per-slide
stage commands, which load the config once per job, keep to the cheap name checks.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from .config import Config, load_config
from .errors import ConfigError, InputsError, ManifestError
from .manifest import Manifest, load_manifest
from .names import name_problem


def validate_run_inputs(manifest_path: str | Path, config_path: str | Path | None, *,
                        model: str | None = None, model_key: str = "--model") -> tuple[Manifest, Config]:
    """Load and check a run's manifest and config (and the `model` override, if any, named
    `model_key` in messages); raise InputsError listing every problem. Missing slide files are not
    problems here: a batch reports them per slide."""
    problems = []
    manifest = cfg = None
    try:
        manifest = load_manifest(manifest_path)
    except ManifestError as exc:
        problems += [f"manifest {exc.path}: {p}" for p in exc.problems]
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        problems.append(f"config {config_path}: {exc}" if config_path else f"config: {exc}")
    model_ok = True
    if model is not None:
        problem = name_problem(model)
        if problem:
            problems.append(f"{model_key}: {problem}")
            model_ok = False
    if cfg is not None:
        problems += registry_problems(cfg, model=model if model_ok else None, model_key=model_key)
    if problems:
        raise InputsError(problems)
    return manifest, cfg


def registry_problems(cfg: Config, *, model: str | None = None, model_key: str = "--model") -> list[str]:
    """The config's model names (train.model, or `model` given as --model; extract.encoder;
    segment.model) that no registry knows, each with the closest registered names."""
    from .encoders import list_encoders
    from .models.mil import list_aggregators
    from .models.seg import list_segmenters

    problems = []
    mil_name, mil_key = (model, model_key) if model else (cfg.train.model, "train.model")
    if mil_name not in list_aggregators():
        problems.append(f"{mil_key}: unknown MIL aggregator {mil_name!r}"
                        f"{_suggest(mil_name, list_aggregators())}; registered: {', '.join(list_aggregators())}")
    encoder = cfg.extract.encoder
    if encoder not in list_encoders():
        import timm  # any timm architecture is an encoder too (registry.get_spec)

        if not timm.is_model(encoder):
            problems.append(f"extract.encoder: unknown encoder {encoder!r}: not registered "
                            f"({', '.join(list_encoders())}) and not a timm architecture"
                            f"{_suggest(encoder, list_encoders() + timm.list_models())}")
    if cfg.segment.model not in list_segmenters():
        problems.append(f"segment.model: unknown segmenter {cfg.segment.model!r}"
                        f"{_suggest(cfg.segment.model, list_segmenters())}; "
                        f"registered: {', '.join(list_segmenters())}")
    return problems


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""

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
        if manifest is not None and model_ok:
            problems += volume_model_problems(manifest, model or cfg.train.model,
                                              model_key if model else "train.model")
    if problems:
        raise InputsError(problems)
    return manifest, cfg


def registry_problems(cfg: Config, *, model: str | None = None, model_key: str = "--model") -> list[str]:
    """The config's model names (train.model, or `model` given as --model; the keys of
    train.per_model; extract.encoder; segment.model) that no registry knows, each with the closest
    registered names."""
    problems = [aggregator_problem(model, model_key) if model else aggregator_problem(cfg.train.model),
                encoder_problem(cfg.extract.encoder), segmenter_problem(cfg.segment.model)]
    # A misspelt per_model key would never apply its settings, silently: refused like train.model.
    problems += [aggregator_problem(name, "train.per_model") for name in cfg.train.per_model]
    return [p for p in problems if p]


def volume_model_problems(manifest: Manifest, model: str, key: str) -> list[str]:
    """A manifest with volume rows needs an aggregator that takes 3-D coords (N, 3)."""
    from .models.mil import list_aggregators
    from .models.mil.registry import AGGREGATORS

    volumes = [r for r in manifest if r.is_volume]
    if not volumes or model not in list_aggregators():
        return []
    accepted = tuple(AGGREGATORS.get_metadata(model).get("coord_dims", (2,)))
    if 3 in accepted:
        return []
    fit = [n for n in list_aggregators() if 3 in tuple(AGGREGATORS.get_metadata(n).get("coord_dims", ()))]
    return [f"{key}: {model!r} takes 2-D slide coords only, but the manifest has volume rows "
            f"({', '.join(r.slide_id for r in volumes[:3])}{' ...' if len(volumes) > 3 else ''}); "
            f"aggregators for volumes: {', '.join(fit)}"]


def aggregator_problem(name: str, key: str = "train.model") -> str | None:
    from .models.mil import list_aggregators

    known = list_aggregators()
    if name in known:
        return None
    return f"{key}: unknown MIL aggregator {name!r}{_suggest(name, known)}; registered: {', '.join(known)}"


def encoder_problem(name: str, key: str = "extract.encoder") -> str | None:
    from .encoders import list_encoders

    known = list_encoders()
    if name in known:
        return None
    import timm  # any timm architecture is an encoder too (encoders.registry.get_spec)

    if timm.is_model(name):
        return None
    return (f"{key}: unknown encoder {name!r}: not registered ({', '.join(known)}) and not a timm "
            f"architecture{_suggest(name, known + timm.list_models())}")


def segmenter_problem(name: str, key: str = "segment.model") -> str | None:
    from .models.seg import list_segmenters

    known = list_segmenters()
    if name in known:
        return None
    return f"{key}: unknown segmenter {name!r}{_suggest(name, known)}; registered: {', '.join(known)}"


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""

"""Everything a run needs checked before its first job starts: the manifest, the config, the names
in them (wsi_pipeline.run.names) and the models they name (the encoder, MIL and segmenter registries).

`wsi-pipeline run` and the workflow's Snakefile call `validate_run_inputs`; every problem is listed
at once (InputsError, exit 2), and nothing is created in the run folder or handed to a shell.
The registry checks import torch (and timm for an encoder outside our registry), so a stage command
(`stage_problems`, called by stages/base.py before it writes any record) checks only the names of
the sections it reads: extract its encoder, train its aggregator, per_model keys and labels (the
same `label_problems` the train stage's preflight uses), segment its segmenter, detect and
eval-detect their detector's files, train-detector its init_from; tile checks none.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import ConfigError, InputsError, ManifestError
from .config import Config, load_config
from .manifest import Manifest, load_manifest
from .names import name_problem


def validate_run_inputs(manifest_path: str | Path, config_path: str | Path | None, *,
                        model: str | None = None, model_key: str = "--model",
                        train: bool = True) -> tuple[Manifest, Config]:
    """Load and check a run's manifest and config (and the `model` override, if any, named
    `model_key` in messages); raise InputsError listing every problem. Missing slide files are not
    problems here: a batch reports them per slide. With `train`, labels outside train.classes are
    problems too (`label_problems`, which the train stage also runs)."""
    problems = []
    manifest = cfg = None
    try:
        manifest = load_manifest(manifest_path, check_same_files=True)
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
        if manifest is not None and train and model_ok and not problems:
            # Labels outside train.classes: the train stage would refuse each cohort's job later.
            problems += label_problems(manifest, cfg, model=model, require=False)
        if manifest is not None and model_ok:
            problems += volume_model_problems(manifest, model or cfg.train.model,
                                              model_key if model else "train.model")
        if manifest is not None and not problems:
            problems += volume_encoder_problems(manifest, cfg)
    if problems:
        raise InputsError(problems)
    return manifest, cfg


def registry_problems(cfg: Config, *, model: str | None = None, model_key: str = "--model") -> list[str]:
    """The config's model names (train.model, or `model` given as --model; the keys of
    train.per_model; extract.encoder; segment.model) that no registry knows, each with the closest
    registered names."""
    return [*train_model_problems(cfg, model=model, model_key=model_key),
            *[p for p in (encoder_problem(cfg.extract.encoder), segmenter_problem(cfg.segment.model)) if p]]


def train_model_problems(cfg: Config, *, model: str | None = None, model_key: str = "--model") -> list[str]:
    """train.model (or `model`, named `model_key`) and every key of train.per_model against the MIL
    registry: a misspelt per_model key would never apply its settings, silently."""
    problems = [aggregator_problem(model, model_key) if model else aggregator_problem(cfg.train.model)]
    problems += [aggregator_problem(name, "train.per_model") for name in cfg.train.per_model]
    return [p for p in problems if p]


def label_problems(manifest: Manifest, cfg: Config, *, model: str | None = None,
                   cohorts: list[str] | None = None, require: bool = True) -> list[str]:
    """Labels training cannot use, per row: outside train.classes (of `model`'s settings, per_model
    applied); with `require`, empty. `wsi-pipeline run` and the train stage both refuse these
    before anything is written."""
    train = cfg.train.for_model(model or cfg.train.model)
    wanted = None if cohorts is None else set(cohorts)
    problems = []
    by_cohort: dict[str, list] = {}
    for r in manifest:
        if wanted is None or r.cohort in wanted:
            by_cohort.setdefault(r.cohort, []).append(r)
    for cohort, records in sorted(by_cohort.items()):
        unlabelled = sorted(r.slide_id for r in records if not r.label)
        if unlabelled:
            if require:
                problems.append(f"cohort {cohort!r}: slide(s) without a label: {', '.join(unlabelled)}")
            continue
        classes = cohort_classes(records, train.classes)
        for r in sorted(records, key=lambda r: r.slide_id):
            if r.label not in classes:
                problems.append(f"slide {r.slide_id!r} (cohort {cohort!r}, row {r.row}): label {r.label!r} "
                                f"is not one of the classes {classes}")
    return problems


def cohort_classes(records, configured) -> list[str]:
    """train.classes where set, else the cohort's sorted labels."""
    return [str(c) for c in configured] or sorted({r.label for r in records})


def stage_problems(stage, cfg: Config, manifest: Manifest, args) -> list[str]:
    """What a single-stage command checks before it writes anything (stages/base.py `invoke`):
    the registry names of the config sections the stage reads (as `wsi-pipeline run` checks
    them), the labels for training, and the detector a detection stage needs."""
    model = getattr(args, "model", None)
    problems = []
    if stage.name == "train":   # predict reads its model from --model-dir, not train.model
        problems += train_model_problems(cfg, model=model)
    if stage.name == "extract":  # the stages after it read features by the encoder's folder name only
        problems += [p for p in [encoder_problem(cfg.extract.encoder)] if p]
        if not problems:
            problems += volume_encoder_problems(manifest, cfg)
    if "segment" in stage.sections:
        problems += [p for p in [segmenter_problem(cfg.segment.model)] if p]
    if stage.name == "train" and not problems:
        problems += label_problems(manifest, cfg, model=model, cohorts=_split(getattr(args, "cohort", None)))
    if stage.name in ("detect", "eval-detect"):
        problems += detector_problems(Path(args.run), model or cfg.detect.train.detector)
    if stage.name == "train-detector" and cfg.detect.train.init_from:
        problems += checkpoint_folder_problems(Path(cfg.detect.train.init_from), "detect.train.init_from")
    return problems


def detector_problems(run_dir: Path, model: str) -> list[str]:
    """A detection stage's detector: RUN/detect/{model}/model/ with weights and config.json."""
    from .folder import RunFolder

    folder = RunFolder(run_dir).detect_dir(model) / "model"
    return checkpoint_folder_problems(folder, f"--model {model}")


def checkpoint_folder_problems(folder: Path, key: str) -> list[str]:
    """A detector checkpoint folder needs model.safetensors and config.json (loading it, later,
    checks their contents)."""
    missing = [n for n in ("model.safetensors", "config.json") if not (folder / n).is_file()]
    if missing:
        return [f"{key}: no detector checkpoint in {folder} (missing {', '.join(missing)}); "
                f"train one with `wsi-pipeline train-detector`"]
    return []


def _split(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def volume_model_problems(manifest: Manifest, model: str, key: str) -> list[str]:
    """A manifest with volume rows needs an aggregator that takes 3-D coords (N, 3)."""
    from ..models.mil import list_aggregators
    from ..models.mil.registry import AGGREGATORS

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


def volume_encoder_problems(manifest: Manifest, cfg: Config) -> list[str]:
    """A manifest with volume rows: the instance box (volumes geometry on the target grid) must be
    at least the encoder's smallest input (`min_input_px` of its registry entry), else every scan
    would fail alone with non-finite features; the coarse scale's too."""
    from ..encoders import get_spec, list_encoders

    volumes = [r for r in manifest if r.is_volume]
    name = cfg.extract.encoder
    if not volumes or name not in list_encoders():
        return []
    spec = get_spec(name)
    params = cfg.volumes.instance_params()
    smallest = params.smallest_box_vox(in_plane=spec.input_dims == 2)
    # Learned 2-D entries see the box resized to their input size; the others at its own size.
    if spec.input_dims == 2 and not spec.parameter_free:
        return []
    if smallest >= spec.min_input_px:
        return []
    v = cfg.volumes
    geometry = (f"box_mm {v.box_mm}, slab_mm {v.slab_mm}, coarse_scale_mm {v.coarse_scale_mm} at "
                f"target_spacing_mm {v.target_spacing_mm}"
                if v.patch_size_vox is None else f"patch_size_vox {v.patch_size_vox}, slice_step {v.slice_step}")
    return [f"volumes: the smallest instance box is {smallest} voxels ({geometry}), below the "
            f"{spec.min_input_px} {'voxels' if spec.input_dims == 3 else 'px'} encoder {name!r} accepts "
            f"(extract.encoder); use a larger box, a finer target_spacing_mm, or another encoder "
            f"(volume_texture_3d takes boxes from 2 voxels)"]


def aggregator_problem(name: str, key: str = "train.model") -> str | None:
    from ..models.mil import list_aggregators

    known = list_aggregators()
    if name in known:
        return None
    return f"{key}: unknown MIL aggregator {name!r}{_suggest(name, known)}; registered: {', '.join(known)}"


def encoder_problem(name: str, key: str = "extract.encoder") -> str | None:
    from ..encoders import list_encoders

    known = list_encoders()
    if name in known:
        return None
    import timm  # any timm architecture is an encoder too (encoders.registry.get_spec)

    if timm.is_model(name):
        return None
    return (f"{key}: unknown encoder {name!r}: not registered ({', '.join(known)}) and not a timm "
            f"architecture{_suggest(name, known + timm.list_models())}")


def segmenter_problem(name: str, key: str = "segment.model") -> str | None:
    from ..models.seg import list_segmenters

    known = list_segmenters()
    if name in known:
        return None
    return f"{key}: unknown segmenter {name!r}{_suggest(name, known)}; registered: {', '.join(known)}"


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""

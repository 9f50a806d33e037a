"""Stage 4 — heatmap: features.h5 + trained fold ensemble -> per-patch scores -> exports.

For each slide: RUN/features/{encoder}/{slide_id}.h5 and the fold ensemble in
RUN/mil/{model}/{cohort}/ (or --model-dir) give per-patch scores (`ensemble_predict`); the exports
go to RUN/heatmaps/{model}/: {slide_id}.png, .tif, .geojson, {slide_id}_topk/ (see
`wsi_pipeline.exports`), then {slide_id}.done.json last. The done file records what the outputs
were made from (checkpoint sha256s, features file, heatmap config hash, slide file); a rerun skips a
slide whose done file matches and whose outputs all exist, and redoes it otherwise.

The training API (`wsi_pipeline.training`) and torch are imported only when a slide needs scores,
so `wsi-pipeline --help` and no-op reruns stay fast. The ensemble runs on `train.device` and is
loaded once per model folder (cohort) per batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from wsi_pipeline.config import Config
from wsi_pipeline.errors import ConfigError, PipelineError, SlideError
from wsi_pipeline.exports import export_heatmaps, export_paths, list_colormaps
from wsi_pipeline.features_h5 import read_features_h5
from wsi_pipeline.io import remove_stale_temps, write_json_atomic
from wsi_pipeline.manifest import Manifest, SlideRecord
from wsi_pipeline.names import check_name
from wsi_pipeline.run_folder import RunFolder
from wsi_pipeline.slides import open_slide

from wsi_pipeline.training.ensemble import EnsembleCache

from .base import CONFIG, check_model_arg, FORCE, MANIFEST, NO_PROGRESS, Stage, StageReport, arg
from .batch import run_batch

STAGE = "heatmap"
DONE_FORMAT_VERSION = 1


def _load_training_api(device: str):
    """(load(model_dir) -> ensemble on `device` ("auto": cuda if available), ensemble_predict).

    Lazy: torch and the models load only when some slide needs scores."""
    from wsi_pipeline.devices import resolve_device
    from wsi_pipeline.training.checkpoints import load_ensemble
    from wsi_pipeline.training.inference import ensemble_predict

    resolved = resolve_device(device, "train.device")
    return (lambda model_dir: load_ensemble(model_dir, device=resolved)), ensemble_predict


def _features_identity(path: Path) -> dict:
    stat = path.stat()
    try:
        with h5py.File(path, "r") as f:
            config_hash = str(f.attrs.get("config_hash", ""))
    except OSError as exc:
        raise PipelineError(f"cannot read features {path}: {exc}") from None
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "config_hash": config_hash}


class HeatmapRunner:
    """Per-batch state: model dirs' checkpoint hashes and loaded ensembles (one per cohort)."""

    def __init__(self, cfg: Config, run: RunFolder, model_name: str, model_dir: str | Path | None):
        self.cfg = cfg
        self.run = run
        self.model_name = model_name
        self.model_dir = Path(model_dir) if model_dir else None
        self.out_dir = run.heatmaps_dir(model_name)
        self.ensembles = EnsembleCache(cfg.train.device)   # models load on the first slide that needs them

    def model_dir_for(self, record: SlideRecord) -> Path:
        return self.model_dir or self.run.mil_dir(self.model_name, record.cohort)

    def hashes(self, model_dir: Path) -> dict[str, str]:
        return self.ensembles.hashes(model_dir)

    def remove_stale_temps(self, slide_id: str) -> None:
        """Temp files/folders a killed run left for this slide. Per slide and by exact output name,
        not per folder: Snakemake runs other slides' jobs in the same folder at the same time, and
        slide `X`'s names must not match slide `X.done`'s."""
        outputs = [*export_paths(self.out_dir, slide_id).values(), self.done_path(slide_id)]
        remove_stale_temps(self.out_dir, outputs)

    def done_path(self, slide_id: str) -> Path:
        return self.run.inside(self.out_dir / f"{self.run.name(slide_id, 'slide_id')}.done.json")

    def identity(self, record: SlideRecord, features_path: Path, model_dir: Path) -> dict:
        return {
            "format_version": DONE_FORMAT_VERSION,
            "slide_id": record.slide_id,
            "slide_path": str(record.path),
            "slide_mpp_override": record.mpp,
            "model": self.model_name,
            "model_dir": str(model_dir.resolve()),
            "checkpoints": self.hashes(model_dir),
            "features": _features_identity(features_path),
            "heatmap_config_hash": self.cfg.section_hash("heatmap", "slides"),
        }

    def is_complete(self, slide_id: str, identity: dict) -> bool:
        done = self.done_path(slide_id)
        if not done.is_file():
            return False
        try:
            recorded = json.loads(done.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        outputs = export_paths(self.out_dir, slide_id, tuple(self.cfg.heatmap.exports))
        return recorded.get("identity") == identity and all(p.exists() for p in outputs.values())

    def scores(self, record: SlideRecord, model_dir: Path, features: np.ndarray,
               coords: np.ndarray) -> tuple[np.ndarray, list[str], dict]:
        """(scores (N, C'), names, prediction) with the mapped score in column 0."""
        if self.ensembles._load is None:
            self.ensembles._load, self.ensembles._predict = _load_training_api(self.cfg.train.device)
        try:
            out = self.ensembles.score(model_dir, features, coords)
        except ValueError as exc:
            raise SlideError(record.slide_id, str(exc)) from None
        columns = {f"{self.model_name} score": out.instance}
        if out.class_probs is not None:
            for j, name in enumerate(out.classes):
                columns[f"{self.model_name} p({name})"] = out.class_probs[:, j]
        wanted = self.cfg.heatmap.score
        primary = f"{self.model_name} score" if wanted == "instance" else f"{self.model_name} p({wanted})"
        if wanted != "instance" and wanted not in out.classes:
            raise ConfigError(f"heatmap.score: class {wanted!r} not among the model's classes {out.classes}")
        if primary not in columns:
            raise SlideError(record.slide_id, f"heatmap.score {wanted!r} needs per-patch class logits, which "
                                              f"model {self.model_name!r} does not give; use 'instance'")
        names = [primary] + [k for k in columns if k != primary]
        table = np.column_stack([columns[k] for k in names])
        return table, names, {"classes": out.classes, "probs": [float(v) for v in out.slide_probs]}

    def __call__(self, record: SlideRecord, force: bool = False) -> str:
        # The exports' file names start with the slide_id (exports.export_paths): checked here once.
        slide_id = self.run.name(record.slide_id, "slide_id")
        features_path = self.run.features_h5(self.cfg.extract.encoder, slide_id)
        if not features_path.is_file():
            raise SlideError(slide_id, f"no features at {features_path}: run the extract stage first")
        model_dir = self.model_dir_for(record)
        if not model_dir.is_dir():
            raise SlideError(slide_id, f"no trained model at {model_dir}: run the train stage first "
                                       f"(or pass --model-dir)")
        if not self.hashes(model_dir):
            raise SlideError(slide_id, f"no fold checkpoints (fold_*/) in {model_dir}")
        identity = self.identity(record, features_path, model_dir)
        if not force and self.is_complete(slide_id, identity):
            return "skipped"
        self.done_path(slide_id).unlink(missing_ok=True)
        self.remove_stale_temps(slide_id)

        try:
            features, coords, attrs = read_features_h5(features_path)
        except (OSError, KeyError) as exc:
            raise SlideError(slide_id, f"cannot read features {features_path}: {exc}") from None
        if len(coords) == 0:
            raise SlideError(slide_id, f"{features_path} has no patches")
        patch_size_level0 = attrs.get("patch_size_level0")
        if patch_size_level0 is None:
            raise SlideError(slide_id, f"{features_path} lacks the patch_size_level0 attribute")
        table, names, prediction = self.scores(record, model_dir, features, coords)

        if not record.path.is_file():
            raise SlideError(slide_id, f"file not found: {record.path}")
        with open_slide(record.path, slide_id=slide_id, backend=self.cfg.slides.backend,
                        mpp_override=record.mpp) as slide:
            expected = (attrs.get("level0_width"), attrs.get("level0_height"))
            if None not in expected and tuple(int(v) for v in expected) != tuple(slide.dimensions):
                w, h = slide.dimensions
                raise SlideError(slide_id, f"features were made on a {expected[0]}x{expected[1]} slide, "
                                           f"but {record.path} is {w}x{h}")
            try:
                result = export_heatmaps(slide, coords, table, float(patch_size_level0), self.out_dir,
                                         slide_id, self.cfg.heatmap, score_names=names, primary=0,
                                         patch_size_px=attrs.get("patch_size"),
                                         caption=prediction_caption(prediction))
            except ValueError as exc:  # non-finite scores and the like: this slide's problem
                raise SlideError(slide_id, str(exc)) from None
            slide_mpp = slide.mpp

        write_json_atomic(self.done_path(slide_id), {
            "identity": identity,
            "outputs": {k: p.name for k, p in result.paths.items()},
            "score": names[0],
            "measurements": names,
            "normalize": self.cfg.heatmap.normalize,
            "n_patches": int(len(coords)),
            "patch_size_level0": float(patch_size_level0),
            "map_downsample": int(result.score_map.downsample),
            "slide_mpp": float(slide_mpp),
            "prediction": prediction,
        })
        return "done"


def prediction_caption(prediction: dict) -> str:
    """'slide: tumor 0.97' (the fold ensemble's most likely class and its probability)."""
    probs, classes = prediction.get("probs") or [], prediction.get("classes") or []
    if len(probs) != len(classes) or not probs:
        return ""
    best = int(np.argmax(probs))
    return f"slide: {classes[best]} {probs[best]:.2f}"


def check_colormap(cfg: Config, args=None) -> None:
    if cfg.heatmap.colormap not in list_colormaps():
        raise ConfigError(f"heatmap.colormap: unknown {cfg.heatmap.colormap!r}; "
                          f"known: {', '.join(list_colormaps())}")


def run_heatmap(manifest: Manifest, cfg: Config, run_dir: str | os.PathLike, *,
                model_dir: str | os.PathLike | None = None, model: str | None = None,
                slides: Iterable[str] | None = None, force: bool = False,
                progress: bool = True) -> StageReport:
    """Heatmap exports for every slide of `manifest` (or the `slides` subset) into
    RUN/heatmaps/{model}/; per-slide failures are recorded and the batch goes on."""
    check_colormap(cfg)
    if slides is not None:
        manifest = manifest.select(slides)
    run = RunFolder(run_dir)
    model_name = check_name(model, "--model") if model else cfg.train.model
    runner = HeatmapRunner(cfg, run, model_name, model_dir)
    runner.out_dir.mkdir(parents=True, exist_ok=True)
    report = run_batch(STAGE, manifest, run, lambda r: runner(r, force=force), progress=progress)
    report.outputs = {sid: str(runner.done_path(sid)) for sid in [*report.done, *report.skipped]}
    return report


HEATMAP = Stage(
    name=STAGE, sections=("heatmap",), run=run_heatmap, run_arg=("run",), check=check_colormap,
    help="stage 4: per-patch score heatmaps (PNG overlay, pyramidal TIFF, QuPath GeoJSON, top-k patches)",
    args=(MANIFEST, arg("--run", required=True, help="run folder with features (and mil/ models)"), CONFIG,
          arg("--model", default=None, help="MIL model name (default: train.model); outputs "
                                            "go to RUN/heatmaps/MODEL/"),
          arg("--model-dir", default=None,
              help="fold ensemble folder (fold_*/); default RUN/mil/MODEL/{slide's cohort}"),
          arg("--slides", default=None, help="comma-separated slide_ids (default: all)"), FORCE, NO_PROGRESS),
    options=lambda a: {"model": a.model, "model_dir": a.model_dir}, check_args=check_model_arg)

"""Heatmaps of one slide: features.h5 + a trained fold ensemble -> per-patch scores -> exports.

`HeatmapRunner(cfg, run, model_name, model_dir)(record)` does one slide (the heatmap stage,
stages/heatmap.py, runs it over a manifest): RUN/features/{encoder}/{slide_id}.h5 and the fold
ensemble in RUN/mil/{model}/{cohort}/ (or `model_dir`) give per-patch scores; the exports go to
RUN/heatmaps/{model}/ (`wsi_pipeline.exports`), then {slide_id}.done.json last. The done file records
what the outputs were made from (checkpoint sha256s, features file, heatmap config hash, slide file);
a rerun skips a slide whose done file matches and whose outputs all exist. Features are read from
RUN/features/{the model's encoder}/ and checked against the model's training features and the
manifest's slide file first (`wsi_pipeline.features.provenance`; `check_inputs` does every slide before any
output is written).

The training API and torch are imported only when a slide needs scores, so no-op reruns stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import ConfigError, PipelineError, SlideError
from ..io import remove_stale_temps, write_json_atomic
from ..run.config import Config
from ..run.folder import RunFolder
from ..run.manifest import SlideRecord
from ..slides import open_slide
from ..training.ensemble import EnsembleCache
from . import export_heatmaps, export_paths

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
        self._training: dict[Path, dict | None] = {}

    def training(self, model_dir: Path) -> dict | None:
        """What the model in `model_dir` was trained on (its first fold's config.json); None when
        there is no readable fold (the slide then fails with that reason)."""
        from ..features.provenance import model_training_features
        from ..training.checkpoints import fold_dirs, read_fold_meta

        model_dir = Path(model_dir)
        if model_dir not in self._training:
            dirs = fold_dirs(model_dir) if model_dir.is_dir() else []
            try:
                self._training[model_dir] = (model_training_features(read_fold_meta(dirs[0]), self.cfg.extract.encoder)
                                           if dirs else None)
            except PipelineError:
                self._training[model_dir] = None
        return self._training[model_dir]

    def encoder_for(self, model_dir: Path) -> str:
        """The encoder whose features the model takes (extract.encoder for a model that names none)."""
        training = self.training(model_dir)
        return (training or {}).get("encoder") or self.cfg.extract.encoder

    def check_inputs(self, records) -> None:
        """Every slide's features against its model, before anything is written (ProvenanceError)."""
        from ..features.provenance import check_features

        check_features("heatmap", self.run, records, lambda r: self.training(self.model_dir_for(r)))

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
        if record.is_volume:  # NIfTI heatmap on the scan's grid, montage, CAM mask (+ Dice)
            from ..volumes.stages import heatmap_volume

            return heatmap_volume(self, record, force=force)
        # The exports' file names start with the slide_id (exports.export_paths): checked here once.
        slide_id = self.run.name(record.slide_id, "slide_id")
        model_dir = self.model_dir_for(record)
        features_path = self.run.features_h5(self.encoder_for(model_dir), slide_id)
        training = self.training(model_dir)
        if training is not None and features_path.is_file():
            from ..features.provenance import locate_features

            locate_features(self.run, record, training)  # the model's kind of features, of this file
        if not features_path.is_file():
            raise SlideError(slide_id, f"no features at {features_path}: run the extract stage first")
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

        from ..training.bags import read_bag

        # The one bag reader (training/bags.py): checked, features in their stored dtype.
        features, coords, attrs = read_bag(features_path, slide_id)
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

"""Stage 4 — heatmap: features.h5 + trained fold ensemble -> per-patch scores -> exports.

For each slide: RUN/features/{encoder}/{slide_id}.h5 and the fold ensemble in
RUN/mil/{model}/{cohort}/ (or --model-dir) give per-patch scores (`ensemble_predict`); the exports
go to RUN/heatmaps/{model}/: {slide_id}.png, .tif, .geojson, {slide_id}_topk/ (see
`wsi_pipeline.exports`), then {slide_id}.done.json last. The done file records what the outputs
were made from (checkpoint sha256s, features file, heatmap config hash, slide file); a rerun skips a
slide whose done file matches and whose outputs all exist, and redoes it otherwise. Features are
read from the model's encoder folder; features it cannot use (made otherwise than its training
features, or from another file than the manifest's) refuse the command before anything is written
(exit 2; wsi_pipeline/features/provenance.py).
A volume row gets {id}.heatmap.nii.gz (on the scan's own grid and affine), .montage.png and
.cam_mask.nii.gz instead, and Dice against its truth_mask where the manifest gives one
(wsi_pipeline/volumes/stages.py).

Wiring only: one slide's work is `wsi_pipeline.exports.heatmaps.HeatmapRunner` (torch loads only when a
slide needs scores). The ensemble runs on `train.device`, loaded once per model folder per batch.
"""

from __future__ import annotations

import os
from typing import Iterable

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.exports import list_colormaps
from wsi_pipeline.exports.heatmaps import HeatmapRunner
from wsi_pipeline.run.config import Config
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import Manifest
from wsi_pipeline.run.names import check_name

from .base import BATCH, CONFIG, check_model_arg, FORCE, MANIFEST, NO_PROGRESS, Stage, StageReport, arg
from .batch import run_batch

STAGE = "heatmap"


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
    runner.check_inputs(manifest)  # features the models cannot use: refused before anything is written
    runner.out_dir.mkdir(parents=True, exist_ok=True)
    report = run_batch(STAGE, manifest, run, lambda r: runner(r, force=force), progress=progress)
    report.outputs = {sid: str(runner.done_path(sid)) for sid in [*report.done, *report.skipped]}
    return report


HEATMAP = Stage(
    name=STAGE, sections=("heatmap",), volume_sections=("volumes",), run=run_heatmap, run_arg=("run",), check=check_colormap,
    help="stage 4: per-patch score heatmaps (PNG overlay, pyramidal TIFF, QuPath GeoJSON, top-k patches)",
    args=(MANIFEST, arg("--run", required=True, help="run folder with features (and mil/ models)"), CONFIG,
          arg("--model", default=None, help="MIL model name (default: train.model); outputs "
                                            "go to RUN/heatmaps/MODEL/"),
          arg("--model-dir", default=None,
              help="fold ensemble folder (fold_*/); default RUN/mil/MODEL/{slide's cohort}"),
          arg("--slides", default=None, help="comma-separated slide_ids (default: all)"), FORCE, NO_PROGRESS, *BATCH),
    options=lambda a: {"model": a.model, "model_dir": a.model_dir}, check_args=check_model_arg)

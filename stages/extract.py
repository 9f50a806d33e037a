"""Stage 2 — extract: coords.h5 → patches → encoder → RUN/features/{encoder}/{slide_id}.h5.

Wiring only: one slide's work is `wsi_pipeline.features.extractor.Extractor`. The encoder is built once per
batch and only if some slide needs it, so a rerun over a finished run loads no model. A features.h5 is trusted when it is complete, its coords equal the current
coords.h5, and its config hash (encoder, weights sha256, precision, dtype, tiling, and the content
fingerprint of the slide file coords.h5 was tiled from) matches. Before that, the slide file must
still be the one coords.h5 was made from (slides/identity.py): a slide replaced since tiling is an
error naming the fix (re-run the tile stage), never "already complete".
"""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.features.extractor import Extractor, weights_identity
from wsi_pipeline.io import remove_stale_temps
from wsi_pipeline.run.config import Config
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import Manifest

from .base import BATCH, CONFIG, FORCE, MANIFEST, NO_PROGRESS, SLIDES, Stage, StageReport, arg
from .batch import run_batch

__all__ = ["EXTRACT", "Extractor", "run_extract", "weights_identity"]

STAGE = "extract"


def run_extract(manifest: Manifest, cfg: Config, run_dir: str | Path, *, force: bool = False,
                progress: bool = True) -> StageReport:
    run = RunFolder(run_dir)
    extractor = Extractor(cfg, run, progress=progress)
    run.features_dir(cfg.extract.encoder).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run.features_dir(cfg.extract.encoder))
    report = run_batch(STAGE, manifest, run, lambda r: extractor(r, force=force), progress=progress)
    report.warnings += extractor.fit_warnings   # once per stage, however many slides
    report.outputs = {sid: str(run.features_h5(cfg.extract.encoder, sid)) for sid in [*report.done, *report.skipped]}
    return report


def _check_encoder_name(args) -> None:
    from wsi_pipeline.run.names import check_name

    if args.encoder:
        check_name(args.encoder, "--encoder")


def _check_encoder(cfg: Config, args) -> None:
    """Before any slide: else every slide fails with the same message."""
    from wsi_pipeline.errors import ConfigError
    from wsi_pipeline.run.validation import encoder_problem

    problem = encoder_problem(cfg.extract.encoder, "--encoder" if args.encoder else "extract.encoder")
    if problem:
        raise ConfigError(problem)


EXTRACT = Stage(
    name=STAGE, sections=("tiling", "extract"), run=run_extract, record_root_config=True,
    help="stage 2: patch features with a pretrained encoder",
    args=(MANIFEST, CONFIG, arg("--out", required=True, help="run folder"), SLIDES, FORCE, NO_PROGRESS,
          arg("--encoder", default=None, help="override extract.encoder"),
          arg("--checkpoint", default=None, help="override extract.checkpoint (file, hf-hub:id, random)"), *BATCH),
    overrides={"encoder": "extract.encoder", "checkpoint": "extract.checkpoint"},
    check_args=_check_encoder_name, check=_check_encoder)

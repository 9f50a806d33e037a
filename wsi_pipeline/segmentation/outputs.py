"""The segment stage's per-run bookkeeping in RUN/segment/: per-slide temp clean-up, and the
metrics.csv gathered from the slides' done files (stages/segment.py runs the stage)."""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

import numpy as np

from ..io import remove_stale_temps, write_csv_atomic
from ..run.folder import RunFolder
from .slide_work import METRIC_COLUMNS


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def remove_slide_temps(run: RunFolder, slide_id: str) -> None:
    """Temp files a dead run left for exactly this slide's outputs ({id}.tif, .geojson, .done.json):
    other slides' jobs share the folder, and slide `X`'s names must not match slide `X.done`'s."""
    remove_stale_temps(run.segment_dir, [run.segment_tif(slide_id), run.segment_geojson(slide_id),
                                         run.segment_done(slide_id)])


def collect_metrics(run: RunFolder, slide_ids: Iterable[str], failed: Iterable[str]) -> tuple[dict, dict, str | None]:
    """(outputs {slide_id: mask TIFF}, metrics {slide_id: {dice_cam, ...}}, a one-line mean Dice or
    None) from the done files of the slides not in `failed`; writes RUN/segment/metrics.csv."""
    failed = set(failed)
    outputs, metrics = {}, {}
    for sid in slide_ids:
        done = run.segment_done(sid)
        if sid in failed or not done.is_file():
            continue
        outputs[sid] = str(run.segment_tif(sid))
        m = json.loads(done.read_text(encoding="utf-8")).get("metrics")
        if m:
            metrics[sid] = m
    write_csv_atomic(run.segment_metrics_csv, ["slide_id", *METRIC_COLUMNS],
                     [[sid, *(f"{m[k]:.4f}" if k != "truth_lesion_um2" else f"{m[k]:.0f}" for k in METRIC_COLUMNS)]
                      for sid, m in metrics.items()])
    with_lesion = [m for m in metrics.values() if m["truth_lesion_um2"] > 0]
    if not with_lesion:
        return outputs, metrics, None
    # Slides without a true lesion score 1.0 or 0.0 (empty masks); the mean is over the others.
    mean = {k: float(np.mean([m[k] for m in with_lesion])) for k in ("dice_cam", "dice")}
    return outputs, metrics, (f"segment: mean Dice vs ground truth over {len(with_lesion)} slide(s) with a lesion: "
                              f"CAM only {mean['dice_cam']:.3f}, stage 2 {mean['dice']:.3f} (per slide: "
                              f"{run.segment_metrics_csv})")

"""A volume cohort end to end: a manifest's CT/MR rows → coords.h5 + features.h5 → patient-level CV
of one MIL aggregator (`training.cv.cross_validate`, the train stage's own) → NIfTI heatmaps,
montages, CAM masks.

    run_volumes(manifest, cfg, run_dir, params)   the whole path for the manifest's volume rows
    summarise_volume_run(run_dir, manifest, model) RUN/volumes_summary.json of a workflow run

Heatmap figures use, for each volume, the fold model that held it out (no volume is explained by
a model that trained on it). Results: RUN/volumes_summary.json (CV AUC, peak-in-lesion rate, Dice).
`wsi-pipeline demo-volumes` (generate a cohort, then run the workflow on it) is stage wiring, so it
lives in stages/volume_demo.py: the library never calls the stages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from ..errors import PipelineError
from ..io import write_json_atomic
from ..run.config import Config, config_from_dict
from ..run.folder import RunFolder
from ..run.manifest import Manifest


log = logging.getLogger("wsi_pipeline")
DEMO_MODEL = "mambamil_3d"


def extract_volumes(manifest: Manifest, run: RunFolder, encoder_name: str, checkpoint, params) -> dict:
    """coords.h5 + features.h5 of every volume row; {volume_id: error} for those that failed (the
    others go on; each failure is also recorded in RUN/failures.csv)."""
    from ..encoders.registry import create_encoder
    from .pipeline import extract_volume

    encoder = create_encoder(encoder_name, checkpoint)
    failed = {}
    for record in manifest:
        if not record.is_volume:
            continue
        try:
            extract_volume(record, run, encoder, encoder_name, params)
            run.clear_failure("extract", record.slide_id)
        except (PipelineError, ValueError, OSError) as exc:
            failed[record.slide_id] = str(exc)
            run.record_failure("extract", record.slide_id, str(exc), source=record.path)
            log.error("extract %s failed: %s", record.slide_id, exc)
    return failed


def explain_volumes(manifest: Manifest, run: RunFolder, model_dir: Path, cfg: Config, params,
                    truth_dir: Path | None) -> list[dict]:
    """Per volume: the held-out fold's heatmap/montage/CAM mask and localisation numbers."""
    from ..training.checkpoints import fold_dirs, load_fold_model, read_fold_meta
    from .pipeline import explain_volume

    fold_of = {}
    for d in fold_dirs(model_dir):
        for volume_id in read_fold_meta(d).get("test_slide_ids", []):
            fold_of[volume_id] = d
    rows, loaded = [], {}
    for record in manifest:
        if record.slide_id not in fold_of:
            continue
        d = fold_of[record.slide_id]
        if d not in loaded:
            loaded[d] = load_fold_model(d)
        truth = record.truth_mask or (truth_dir / f"{record.slide_id}_lesion.nii.gz" if truth_dir else None)
        e = explain_volume(record, run, [loaded[d]], cfg.train.model, cfg.extract.encoder, params, truth)
        rows.append({"volume_id": e.volume_id, "label": record.label, "probs": e.probs,
                     "peak_source_vox": list(e.peak_source_vox), "peak_in_lesion": e.peak_in_lesion,
                     "dice": e.dice, "heatmap": str(e.heatmap_path), "mask": str(e.mask_path)})
    return rows


def run_volumes(manifest: Manifest, cfg: Config, run_dir: str | Path, params, truth_dir: Path | None = None,
                progress: bool = False) -> dict:
    run = RunFolder(run_dir)
    t0 = time.perf_counter()
    failed = extract_volumes(manifest, run, cfg.extract.encoder, cfg.extract.checkpoint, params)
    t_extract = time.perf_counter() - t0
    if failed:
        manifest = manifest.without(failed)
    from ..training.cv import cross_validate

    results = cross_validate(manifest, cfg, run, run, cfg.train.model, None, progress)
    t_train = time.perf_counter() - t0 - t_extract
    summary = {"model": cfg.train.model, "model_args": cfg.train.model_args, "encoder": cfg.extract.encoder,
               "instances": dataclasses.asdict(params), "failed": failed, "seconds_extract": round(t_extract, 1),
               "seconds_train": round(t_train, 1), "cohorts": {}}
    for cohort, result in results.items():
        if result["status"] != "done":
            summary["cohorts"][cohort] = {"status": "failed", "error": result["error"]}
            continue
        rows = explain_volumes(manifest, run, Path(result["model_dir"]), cfg, params, truth_dir)
        positives = [r for r in rows if r["peak_in_lesion"] is not None]
        summary["cohorts"][cohort] = {
            "status": "done", "auc": result["metrics"]["auc"], "n_volumes": result["metrics"]["n_slides"],
            "peak_in_lesion_rate": (sum(r["peak_in_lesion"] for r in positives) / len(positives)) if positives else None,
            "mean_dice": (sum(r["dice"] for r in positives) / len(positives)) if positives else None,
            "n_positive_with_truth": len(positives), "volumes": rows}
    summary["seconds_total"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(Path(run_dir) / "volumes_summary.json", summary)
    return summary


def demo_config_path() -> Path:
    """configs/volumes_demo.yaml: package data in an installed wheel (setup.py ships it as
    wsi_pipeline/configs/), else the checkout's configs/ beside this package."""
    packaged = Path(__file__).resolve().parents[1] / "configs" / "volumes_demo.yaml"
    return packaged if packaged.is_file() else Path(__file__).resolve().parents[2] / "configs" / "volumes_demo.yaml"


def demo_config(epochs: int = 20, folds: int = 5, model: str = DEMO_MODEL, seed: int = 0) -> Config:
    """The demo's settings (configs/volumes_demo.yaml) with these overrides; the small Mamba width
    applies to the Mamba aggregators only."""
    path = demo_config_path()
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    train = raw.setdefault("train", {})
    train.update({"model": model, "folds": folds, "epochs": epochs, "seed": seed})
    if "mamba" not in model:
        # The Mamba width and instance head (and so the instance top-k loss) are MambaMIL's.
        train["model_args"] = {}
        train.pop("instance_loss_weight", None)
        train.pop("instance_topk", None)
    return config_from_dict(raw, source=str(path))


def summarise_volume_run(run_dir: str | Path, manifest: Manifest, model: str) -> dict:
    """RUN/volumes_summary.json of a workflow run over volume rows: per volume cohort the CV AUC
    (metrics.json) and, from the heatmap stage's done files, each volume's prediction, heatmap
    peak, peak-in-lesion and CAM-mask Dice (where its row has a truth_mask)."""
    run = RunFolder(run_dir)
    summary = {"model": model, "cohorts": {}}
    for cohort in sorted({r.cohort for r in manifest if r.is_volume}):
        metrics_file = run.mil_dir(model, cohort) / "metrics.json"
        try:
            pooled = json.loads(metrics_file.read_text(encoding="utf-8"))["pooled"]
        except (OSError, KeyError, json.JSONDecodeError) as exc:
            summary["cohorts"][cohort] = {"status": "failed", "error": f"no readable {metrics_file}: {exc}"}
            continue
        rows = []
        for record in manifest:
            done = run.heatmaps_dir(model) / f"{record.slide_id}.done.json"
            if record.cohort != cohort or not done.is_file():
                continue
            d = json.loads(done.read_text(encoding="utf-8"))
            folder = done.parent
            rows.append({"volume_id": record.slide_id, "label": record.label,
                         "probs": dict(zip(d["prediction"]["classes"], d["prediction"]["probs"])),
                         "model_fold": d.get("model_fold"), "peak_source_vox": d["peak_source_vox"],
                         "peak_in_lesion": d["peak_in_lesion"], "dice": d["dice"],
                         "heatmap": str(folder / d["outputs"]["heatmap"]), "mask": str(folder / d["outputs"]["cam_mask"])})
        positives = [r for r in rows if r["peak_in_lesion"] is not None]
        summary["cohorts"][cohort] = {
            "status": "done", "auc": pooled["auc"], "n_volumes": pooled["n_slides"], "n_explained": len(rows),
            "peak_in_lesion_rate": (sum(r["peak_in_lesion"] for r in positives) / len(positives)) if positives else None,
            "mean_dice": (sum(r["dice"] for r in positives) / len(positives)) if positives else None,
            "n_positive_with_truth": len(positives), "volumes": rows}
    write_json_atomic(Path(run_dir) / "volumes_summary.json", summary)
    return summary


def instance_probe_auc(run_dir: str | Path, manifest: Manifest, encoder: str, params, folds: int = 5,
                       seed: int = 0, min_lesion_fraction: float = 0.3) -> dict:
    """How well the features alone tell lesion instances from the rest, on held-out scans: a
    logistic-regression probe (scans split into `folds` groups) on each scan's median-centred,
    standardised features; an instance is a lesion one when its box is at least
    `min_lesion_fraction` lesion (truth mask on the resampled grid), and every instance of a
    negative scan is a negative. A high probe AUC with a low CV AUC places a failure in the
    aggregator, a low one in the encoder or the geometry."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    from ..features.features_h5 import read_features_h5
    from .checks import load_truth_mask
    from .instances import instance_box_sizes, prepare
    from .pipeline import read_instance_scale
    from .readers import open_volume
    from .resample import to_grid

    run = RunFolder(run_dir)
    xs, ys, groups = [], [], []
    for n, record in enumerate(r for r in manifest if r.is_volume):
        path = run.features_h5(encoder, record.slide_id)
        if not path.is_file() or record.truth_mask is None or not record.truth_mask.is_file():
            continue
        features, coords, _ = read_features_h5(path)
        volume = open_volume(record.path, volume_id=record.slide_id, modality=record.modality, frame=record.frame)
        truth = load_truth_mask(volume, record.truth_mask)
        grid, _, _ = prepare(volume, params)
        on_grid = to_grid(truth.astype(np.float32), volume.source_affine, grid.shape, grid.affine, order=0) > 0.5
        integral = np.pad(on_grid.cumsum(0).cumsum(1).cumsum(2), ((1, 0), (1, 0), (1, 0)))
        sizes = instance_box_sizes(params, read_instance_scale(run.coords_h5(record.slide_id), len(coords)), len(coords))
        (i0, j0, k0), (bi, bj, bk) = coords.T, sizes.T
        i1, j1, k1 = i0 + bi, j0 + bj, k0 + bk
        inside = (integral[i1, j1, k1] - integral[i0, j1, k1] - integral[i1, j0, k1] - integral[i1, j1, k0]
                  + integral[i0, j0, k1] + integral[i0, j1, k0] + integral[i1, j0, k0] - integral[i0, j0, k0])
        fraction = inside / (bi * bj * bk)
        centred = features - np.median(features, axis=0, keepdims=True)
        xs.append(centred)
        ys.append(fraction >= min_lesion_fraction)
        groups.append(np.full(len(coords), n))
    if not xs:
        return {"auc": None, "n_lesion_instances": 0}
    x, y, g = np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    scores = np.zeros(len(y))
    splits = GroupKFold(n_splits=min(folds, len(np.unique(g))))
    for train, test in splits.split(x, y, g):
        if y[train].any() and not y[train].all():
            probe = LogisticRegression(max_iter=500, class_weight="balanced", C=1.0)
            probe.fit(x[train], y[train])
            scores[test] = probe.decision_function(x[test])
    auc = float(roc_auc_score(y, scores)) if y.any() and not y.all() else None
    return {"auc": auc, "n_lesion_instances": int(y.sum()), "n_instances": int(len(y))}


def format_summary(summary: dict) -> str:
    lines = []
    for cohort, c in summary["cohorts"].items():
        if c["status"] != "done":
            lines.append(f"{cohort}: FAILED: {c['error']}")
            continue
        auc = c["auc"]["value"]
        text = f"{cohort}: {summary['model']} CV AUC " + (f"{auc:.3f}" if auc is not None else "undefined")
        text += f" over {c['n_volumes']} volumes"
        if c["n_positive_with_truth"]:
            text += (f"; heatmap peak in lesion {c['peak_in_lesion_rate']:.0%} of {c['n_positive_with_truth']} "
                     f"positives; mean CAM-mask Dice {c['mean_dice']:.3f}")
        lines.append(text)
    return "\n".join(lines)


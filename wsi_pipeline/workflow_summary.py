"""What `wsi-pipeline run` prints at the end of a workflow: each cohort's CV AUC, the segmenter's
Dice, and the cohorts a failed tile/extract slide kept from training."""

from __future__ import annotations

import json
from pathlib import Path


def summarise_metrics(path: Path) -> str:
    """'CV AUC 0.93 [0.81, 1.00] over 16 slides' from a metrics.json (pooled out-of-fold)."""
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "metrics.json unreadable"
    pooled = metrics.get("pooled", metrics)
    auc = pooled.get("auc")
    if isinstance(auc, dict):
        value, ci = auc.get("value"), auc.get("ci95") or auc.get("ci")
    else:
        value, ci = auc, pooled.get("auc_ci95")
    if value is None:
        return "no AUC in metrics.json"
    text = f"CV AUC {value:.3f}"
    if ci and len(ci) == 2 and None not in ci:
        text += f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]"
    n = pooled.get("n_slides") or pooled.get("n")
    return text + (f" over {n} slides" if n else "")


def summarise_segmentation(path: Path) -> str:
    """Mean Dice of the CAM alone and of the segmenter over slides whose ground truth has a lesion."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh) if float(r.get("truth_lesion_um2") or 0) > 0]
    except (OSError, ValueError):
        return "metrics.csv unreadable"
    if not rows:
        return "no slide with ground truth"
    cam = sum(float(r["dice_cam"]) for r in rows) / len(rows)
    seg = sum(float(r["dice"]) for r in rows) / len(rows)
    return f"mean Dice CAM {cam:.3f} -> segmenter {seg:.3f} over {len(rows)} slides with a lesion"


def failed_before_training(manifest_path, failures: list[dict]) -> dict[str, list[str]]:
    """{cohort: [slide_id]} of the manifest's slides with a tile or extract failure on record: while
    they are in the manifest, their cohort cannot train (unless --exclude-failed leaves them out)."""
    from wsi_pipeline.manifest import load_manifest

    failed = {r["slide_id"] for r in failures if r.get("stage") in ("tile", "extract")}
    if not failed:
        return {}
    try:
        records = list(load_manifest(manifest_path))
    except Exception:  # the workflow has already reported a manifest it cannot read
        return {}
    by_cohort: dict[str, list[str]] = {}
    for r in records:
        if r.slide_id in failed:
            by_cohort.setdefault(r.cohort, []).append(r.slide_id)
    return by_cohort

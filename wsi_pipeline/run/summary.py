"""What `wsi-pipeline run` prints at the end of a workflow: each cohort's CV AUC, the segmenter's
Dice, the cohorts a failed tile/extract slide kept from training, and for every cohort that was
not trained, why. Also which slides `--exclude-failed` leaves out (`excluded_failures`, which the
workflow's common.smk uses): those whose failure record still describes their file."""

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
    from wsi_pipeline.run.manifest import load_manifest

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


EARLY_STAGES = ("tile", "extract")


def excluded_failures(records, failures: list[dict]) -> list[str]:
    """The slides of `records` (manifest rows) that --exclude-failed leaves out: a tile or extract
    failure on record that still applies to the row's file (`run.folder.failure_still_applies`).
    A slide whose file was replaced or fixed since is tried again (and its record cleared when it
    passes), never kept out with its old error."""
    from wsi_pipeline.run.folder import failure_still_applies

    by_id = {r.slide_id: r for r in records}
    return sorted({f["slide_id"] for f in failures
                   if f.get("stage") in EARLY_STAGES and f.get("slide_id") in by_id
                   and failure_still_applies(f, by_id[f["slide_id"]].path)})


def untrained_cohorts(run_dir: Path, records, model: str, failures: list[dict], *, exclude_failed: bool,
                      snakemake_code: int) -> dict[str, str]:
    """{cohort: why it was not trained} for every cohort of the manifest rows `records` that has no
    metrics.json of `model` in RUN, or a failed slide (without --exclude-failed): its failed slides
    (left out or not), unlabelled rows, its train job's error (from the job's log), or a workflow
    that stopped before it."""
    failed = {f["slide_id"]: f for f in failures if f.get("stage") in EARLY_STAGES}
    by_cohort: dict[str, list] = {}
    for r in records:
        by_cohort.setdefault(r.cohort, []).append(r)
    # The workflow trains only when every (not left-out) row has a label (common.smk: trainable).
    unlabelled_anywhere = [r.slide_id for r in records if not r.label and not (exclude_failed and r.slide_id in failed)]
    reasons = {}
    for cohort, rows in sorted(by_cohort.items()):
        bad = [r.slide_id for r in rows if r.slide_id in failed]
        # A failed slide blocks its cohort even where metrics.json exists: that one is from a
        # training on other slides (the manifest's rows have changed since).
        if (Path(run_dir) / "mil" / model / cohort / "metrics.json").is_file() and not (bad and not exclude_failed):
            continue
        unlabelled = [r.slide_id for r in rows if not r.label]
        log = Path(run_dir) / "logs" / "snakemake" / "train" / model / f"{cohort}.log"
        if bad and not exclude_failed:
            them = "them" if len(bad) > 1 else "it"
            reasons[cohort] = (f"{', '.join(bad)} failed before training. Fix {them}, remove {them} from the "
                               f"manifest, or rerun with --exclude-failed to train without {them}.")
        elif bad and len(bad) == len(rows):
            reasons[cohort] = (f"every slide of it failed before training ({', '.join(bad)}; left out by "
                               f"--exclude-failed).")
        elif unlabelled or unlabelled_anywhere:
            ids = unlabelled or unlabelled_anywhere
            where = "" if unlabelled else " in the manifest"
            reasons[cohort] = (f"slide(s) without a label{where}: {', '.join(ids[:5])}"
                               f"{' ...' if len(ids) > 5 else ''} (the workflow trains when every slide has one).")
        elif log.is_file():
            reasons[cohort] = f"its train job failed: {_last_error(log)} (log: {log})."
        else:
            reasons[cohort] = (f"the workflow stopped before its train job (snakemake exited with "
                               f"{snakemake_code}; job logs under {Path(run_dir) / 'logs' / 'snakemake'}).")
    return reasons


def _last_error(log: Path) -> str:
    """The job's `error: ...` line (the CLI prints one), else its last line."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
    except OSError:
        return "its log is unreadable"
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if errors:   # the error line and its listed problems ("  - ...")
        first = errors[-1]
        detail = [line for line in lines[first + 1:first + 4] if line.startswith("- ")]
        return " ".join([lines[first][len("error:"):].strip(), *detail])
    return lines[-1] if lines else "its log is empty"

"""What a run folder holds, read for the report and the viewer (read-only; every file optional).

Models and cohorts are the folders RUN/mil/{model}/{cohort}/ that have a metrics.json; a folder
name that is not a safe name (wsi_pipeline.run.names) is skipped, never turned into a path.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..run.names import is_safe_name

log = logging.getLogger("wsi_pipeline")


def read_json(path: Path):
    """The JSON at `path`, or None when it is missing or unreadable (the report shows what it has)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("report: cannot read %s: %s", path, exc)
        return None


def read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        log.warning("report: cannot read %s: %s", path, exc)
        return []


def safe_children(folder: Path, *, dirs: bool = True) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_safe_name(p.name) and (p.is_dir() if dirs else p.is_file()))


@dataclass
class CohortResult:
    """One model trained on one cohort: RUN/mil/{model}/{cohort}/."""
    model: str
    cohort: str
    folder: Path
    metrics: dict
    classes: list[str]
    predictions: list[dict]
    folds: list[dict] = field(default_factory=list)   # fold_k/config.json (history, best epoch, ...)

    @property
    def positive(self) -> str:
        return self.classes[-1]

    def arrays(self):
        """(y class index (N,), probs (N, C), patient ids (N,)) of the out-of-fold predictions."""
        index = {c: i for i, c in enumerate(self.classes)}
        rows = [r for r in self.predictions if r.get("label") in index]
        y = np.array([index[r["label"]] for r in rows], dtype=np.int64)
        probs = np.array([[float(r[f"prob_{c}"]) for c in self.classes] for r in rows], dtype=np.float64)
        return y, probs.reshape(len(rows), len(self.classes)), np.array([r["patient_id"] for r in rows])


def cohort_results(run: Path) -> list[CohortResult]:
    out = []
    for model_dir in safe_children(run / "mil"):
        for cohort_dir in safe_children(model_dir):
            metrics = read_json(cohort_dir / "metrics.json")
            if not isinstance(metrics, dict) or not metrics.get("classes"):
                continue
            classes = [str(c) for c in metrics["classes"]]
            predictions = read_csv(cohort_dir / "predictions.csv")
            if predictions and not all(f"prob_{c}" in predictions[0] for c in classes):
                log.warning("report: %s lacks prob_ columns for %s", cohort_dir / "predictions.csv", classes)
                predictions = []
            folds = []
            for fold_dir in sorted(cohort_dir.glob("fold_*"), key=lambda p: _fold_number(p.name)):
                meta = read_json(fold_dir / "config.json")
                if isinstance(meta, dict):
                    folds.append(meta)
            out.append(CohortResult(model_dir.name, cohort_dir.name, cohort_dir, metrics, classes,
                                    predictions, folds))
    return out


def _fold_number(name: str) -> int:
    tail = name.split("_", 1)[-1]
    return int(tail) if tail.isdigit() else 1 << 30


def failures(run: Path) -> list[dict]:
    """slide_id, stage, error of every failure: the per-slide records under RUN/failures/ (current
    while the workflow still runs) and RUN/failures.csv (which `wsi-pipeline run` rebuilds)."""
    from ..run.folder import RunFolder

    merged = {(r.get("stage"), r.get("slide_id")): r for r in read_csv(run / "failures.csv")}
    for r in RunFolder(run).failures():
        if isinstance(r, dict):
            merged[(r.get("stage"), r.get("slide_id"))] = r
    return [{"slide_id": r.get("slide_id"), "stage": r.get("stage"), "error": r.get("error")}
            for r in merged.values()]


def heatmap_models(run: Path) -> list[str]:
    return [p.name for p in safe_children(run / "heatmaps")]


def detection_summaries(run: Path) -> dict[str, list[dict]]:
    """{detector: [summary.json of each slide]} from RUN/detect/{detector}/{slide}.summary.json."""
    out = {}
    for model_dir in safe_children(run / "detect"):
        rows = [s for p in sorted(model_dir.glob("*.summary.json")) if isinstance(s := read_json(p), dict)]
        if rows:
            out[model_dir.name] = rows
    return out


def segment_rows(run: Path) -> list[dict]:
    return read_csv(run / "segment" / "metrics.csv")


def resolved_configs(run: Path) -> dict[str, str]:
    """{file name: text} of RUN/config.yaml and RUN/configs/*.yaml (what each stage ran with)."""
    files = [run / "config.yaml", *sorted((run / "configs").glob("*.yaml"))]
    out = {}
    for f in files:
        if f.is_file() and is_safe_name(f.name):
            try:
                out[str(f.relative_to(run))] = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
    return out


def slide_ids(run: Path, manifest_rows: list[dict] | None, results: list[CohortResult],
              failed: list[dict] = ()) -> list[str]:
    """Every slide the run knows: the manifest's, then those of the predictions, the tiles and the
    failures."""
    seen = {}
    for r in manifest_rows or []:
        seen.setdefault(r["slide_id"], None)
    for res in results:
        for r in res.predictions:
            seen.setdefault(r["slide_id"], None)
    for p in sorted((run / "tiles").glob("*.coords.h5")):
        seen.setdefault(p.name[: -len(".coords.h5")], None)
    for f in failed:
        seen.setdefault(f.get("slide_id"), None)
    return [s for s in seen if is_safe_name(s)]

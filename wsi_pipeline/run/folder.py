"""The run folder layout and its failure register.

Failures are one small file per (stage, slide) under RUN/failures/, written atomically, so parallel
per-slide jobs (Snakemake) never race on one CSV; `RUN/failures.csv` is rebuilt from them.

Every path built from a name (slide_id, encoder, model, cohort, stage) is checked: the name must
follow the name rule (wsi_pipeline.run.names) and the path must stay inside RUN. Manifest and config
validation already refuse bad names; this is the second line, for code that builds records or
names some other way. The check is lexical (no symlink resolution), so a RUN/features that the
user made a symlink to another disk keeps working.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import UnsafePathError
from ..io import write_csv_atomic, write_json_atomic
from .names import name_problem


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def name(self, value: str, what: str) -> str:
        """`value` if it is a safe name to put in a path under RUN, else UnsafePathError."""
        problem = name_problem(value)
        if problem is not None:
            raise UnsafePathError(f"{what} {problem} (refusing to build a path from it in {self.root})")
        return value

    def inside(self, path: str | Path) -> Path:
        """`path` if it stays inside RUN once `..` and absolute parts are applied, else UnsafePathError."""
        path = Path(path)
        root = os.path.normpath(os.path.abspath(self.root))
        target = os.path.normpath(os.path.abspath(path if path.is_absolute() else self.root / path))
        if os.path.commonpath([root, target]) != root:
            raise UnsafePathError(f"{path} is outside the run folder {root}: refused")
        return path

    # -- tiling outputs ---------------------------------------------------------------------
    @property
    def tiles_dir(self) -> Path:
        return self.root / "tiles"

    def coords_h5(self, slide_id: str) -> Path:
        return self.inside(self.tiles_dir / f"{self.name(slide_id, 'slide_id')}.coords.h5")

    def tissue_geojson(self, slide_id: str) -> Path:
        return self.inside(self.tiles_dir / f"{self.name(slide_id, 'slide_id')}.tissue.geojson")

    def qc_png(self, slide_id: str) -> Path:
        return self.inside(self.tiles_dir / f"{self.name(slide_id, 'slide_id')}.qc.png")

    # -- feature outputs --------------------------------------------------------------------
    def features_dir(self, encoder: str) -> Path:
        return self.inside(self.root / "features" / self.name(encoder, "encoder"))

    def features_h5(self, encoder: str, slide_id: str) -> Path:
        return self.inside(self.features_dir(encoder) / f"{self.name(slide_id, 'slide_id')}.h5")

    # -- MIL, heatmaps, segmentation --------------------------------------------------------
    def mil_dir(self, model: str, cohort: str) -> Path:
        """RUN/mil/{model}/{cohort}/: splits.json, fold_{k}/, predictions.csv, metrics.json."""
        return self.inside(self.root / "mil" / self.name(model, "model") / self.name(cohort, "cohort"))

    def heatmaps_dir(self, model: str) -> Path:
        return self.inside(self.root / "heatmaps" / self.name(model, "model"))

    @property
    def segment_dir(self) -> Path:
        """RUN/segment/: cams/, model/, per-slide {id}.tif/.geojson/.done.json, metrics.csv."""
        return self.root / "segment"

    def _segment_file(self, folder: Path, slide_id: str, suffix: str) -> Path:
        return self.inside(folder / f"{self.name(slide_id, 'slide_id')}{suffix}")

    @property
    def segment_cams_dir(self) -> Path:
        return self.segment_dir / "cams"

    def segment_cams(self, slide_id: str) -> Path:
        return self._segment_file(self.segment_cams_dir, slide_id, ".npz")

    @property
    def segment_model_dir(self) -> Path:
        return self.segment_dir / "model"

    def segment_tif(self, slide_id: str) -> Path:
        return self._segment_file(self.segment_dir, slide_id, ".tif")

    def segment_geojson(self, slide_id: str) -> Path:
        return self._segment_file(self.segment_dir, slide_id, ".geojson")

    def segment_done(self, slide_id: str) -> Path:
        return self._segment_file(self.segment_dir, slide_id, ".done.json")

    @property
    def segment_metrics_csv(self) -> Path:
        return self.segment_dir / "metrics.csv"

    def log_traceback(self, stage: str, header: str) -> str:
        """Append the current exception's traceback to RUN/logs/{stage}.log; returns 'traceback in
        PATH', or why it could not be written (a full disk must not turn one failure into a crash)."""
        import traceback

        from ..io import describe_os_error

        log_path = self.root / "logs" / f"{self.name(stage, 'stage')}.log"
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"--- {header}\n{traceback.format_exc()}\n")
        except OSError as exc:
            return f"traceback not saved: {describe_os_error(exc)}"
        return f"traceback in {log_path}"

    # -- detection --------------------------------------------------------------------------
    def detect_dir(self, model: str) -> Path:
        """RUN/detect/{model}/: model/ (checkpoint), thresholds.json, eval.json, per-slide outputs."""
        return self.inside(self.root / "detect" / self.name(model, "model"))

    def detect_file(self, model: str, slide_id: str, suffix: str) -> Path:
        """RUN/detect/{model}/{slide_id}.{suffix}: candidates.csv, csv, geojson, midog.json, summary.json, done.json."""
        return self.inside(self.detect_dir(model) / f"{self.name(slide_id, 'slide_id')}.{suffix}")

    # -- failures ---------------------------------------------------------------------------
    def _failure_file(self, stage: str, slide_id: str) -> Path:
        if name_problem(slide_id) is None:
            name = f"{slide_id}.json"
        else:
            # A failure must stay recordable even for a slide whose id cannot be a file name (too long
            # for the file system, or unsafe): the record holds the full slide_id, its file name a digest.
            name = f"id-sha256-{hashlib.sha256(str(slide_id).encode()).hexdigest()[:16]}.json"
        return self.inside(self.root / "failures" / self.name(stage, "stage") / name)

    def record_failure(self, stage: str, slide_id: str, error: str, source: str | Path | None = None) -> None:
        """`source`: the slide's file, whose identity then is in the record ("source": path, size,
        mtime, or missing), so that a later run can tell a repaired slide from the one that failed."""
        record = {"slide_id": slide_id, "stage": stage, "error": error}
        if source is not None:
            record["source"] = file_state(source)
        write_json_atomic(self._failure_file(stage, slide_id), record)

    def clear_failure(self, stage: str, slide_id: str) -> None:
        self._failure_file(stage, slide_id).unlink(missing_ok=True)

    def failures(self) -> list[dict]:
        rows = []
        for f in sorted((self.root / "failures").glob("*/*.json")):
            try:
                rows.append(json.loads(f.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                continue
        return rows

    def write_failures_csv(self, unrecorded: list[dict] | None = None) -> Path:
        """Rebuild RUN/failures.csv (slide_id, stage, error) from the per-slide records, plus
        `unrecorded` failures (same keys) whose own record could not be written."""
        path = self.root / "failures.csv"
        merged = {(r["stage"], r["slide_id"]): r for r in [*self.failures(), *(unrecorded or [])]}
        rows = [[r["slide_id"], r["stage"], r["error"]] for r in merged.values()]
        write_csv_atomic(path, ["slide_id", "stage", "error"], rows)
        return path


def file_state(path: str | Path) -> dict:
    """{"path", "size_bytes", "mtime_ns"} of a file (a folder: a DICOM series), or {"path",
    "missing": True}: enough to see that a failed slide's file was replaced or fixed since."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return {"path": str(path), "missing": True}
    return {"path": str(path), "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def failure_still_applies(failure: dict, slide_path: str | Path) -> bool:
    """Whether a tile/extract failure record still describes the manifest's slide: the same file,
    unchanged (or still missing). A record from before sources were recorded counts as current."""
    source = failure.get("source")
    if not isinstance(source, dict):
        return True
    return source == file_state(slide_path)

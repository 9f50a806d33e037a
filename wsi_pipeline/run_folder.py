"""The run folder layout and its failure register.

Failures are one small file per (stage, slide) under RUN/failures/, written atomically, so parallel
per-slide jobs (Snakemake) never race on one CSV; `RUN/failures.csv` is rebuilt from them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .io import write_csv_atomic, write_json_atomic


# Longest failure-record file name used as is: file systems allow 255 bytes, and the atomic
# writer's temp name adds about 20.
_MAX_RECORD_NAME_BYTES = 200


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- tiling outputs ---------------------------------------------------------------------
    @property
    def tiles_dir(self) -> Path:
        return self.root / "tiles"

    def coords_h5(self, slide_id: str) -> Path:
        return self.tiles_dir / f"{slide_id}.coords.h5"

    def tissue_geojson(self, slide_id: str) -> Path:
        return self.tiles_dir / f"{slide_id}.tissue.geojson"

    def qc_png(self, slide_id: str) -> Path:
        return self.tiles_dir / f"{slide_id}.qc.png"

    # -- feature outputs --------------------------------------------------------------------
    def features_dir(self, encoder: str) -> Path:
        return self.root / "features" / encoder

    def features_h5(self, encoder: str, slide_id: str) -> Path:
        return self.features_dir(encoder) / f"{slide_id}.h5"

    # -- MIL, heatmaps, segmentation --------------------------------------------------------
    def mil_dir(self, model: str, cohort: str) -> Path:
        """RUN/mil/{model}/{cohort}/: splits.json, fold_{k}/, predictions.csv, metrics.json."""
        return self.root / "mil" / model / cohort

    def heatmaps_dir(self, model: str) -> Path:
        return self.root / "heatmaps" / model

    @property
    def segment_dir(self) -> Path:
        return self.root / "segment"

    # -- failures ---------------------------------------------------------------------------
    def _failure_file(self, stage: str, slide_id: str) -> Path:
        name = f"{slide_id}.json"
        if len(name.encode()) > _MAX_RECORD_NAME_BYTES:
            # A name the file system would refuse (ENAMETOOLONG) must still be recordable: the
            # record holds the full slide_id, its file name a prefix and a digest of it.
            digest = hashlib.sha256(slide_id.encode()).hexdigest()[:16]
            name = f"{slide_id.encode()[:64].decode(errors='ignore')}~{digest}.json"
        return self.root / "failures" / stage / name

    def record_failure(self, stage: str, slide_id: str, error: str) -> None:
        write_json_atomic(self._failure_file(stage, slide_id),
                          {"slide_id": slide_id, "stage": stage, "error": error})

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

"""The record a multi-slide workflow job leaves (cluster.slides_per_job > 1): RUN/batches/{stage}/{name}.json.

Snakemake sees one output per job, the record; the slides' own outputs stay where the per-slide
rules put them, and their failures in RUN/failures/. The record says which slides finished, which
failed (with the one-line error) and which an upstream batch had failed already, plus the rerun
token the workflow gave the job (workflow/rules/batches.smk: a record whose slides lost an output
or still have a failure gets a new token, so Snakemake runs the job again; the stage then redoes
only the slides that need it).
"""

from __future__ import annotations

import json
from pathlib import Path

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.io import write_json_atomic

BATCHES_DIR = "batches"


def record_path(run_dir: str | Path, given: str | Path) -> Path:
    """`given` resolved inside RUN/batches/ (a record path never points anywhere else)."""
    root = (Path(run_dir) / BATCHES_DIR).resolve()
    path = Path(given)
    path = (path if path.is_absolute() else Path(run_dir) / path).resolve()
    if root not in path.parents or path.suffix != ".json":
        raise PipelineError(f"batch record {given}: must be a .json file under {root}")
    return path


def write_batch_record(run_dir, given, stage: str, token: str, report, upstream_failed: list[str]) -> Path:
    path = record_path(run_dir, given)
    write_json_atomic(path, {
        "stage": stage,
        "token": token,
        "done": list(report.done),
        "skipped": list(report.skipped),
        "failed": dict(report.failed),
        "upstream_failed": list(upstream_failed),
    })
    return path


def read_batch_record(run_dir, given) -> dict:
    path = record_path(run_dir, given)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"batch record {path} not found (its upstream job has not run)") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"batch record {path}: unreadable ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("failed", {}), dict):
        raise PipelineError(f"batch record {path}: not a batch record")
    return record


def failed_in(run_dir, given) -> list[str]:
    """The slides an upstream batch record lists as failed (there or further upstream)."""
    record = read_batch_record(run_dir, given)
    return [*record.get("failed", {}), *record.get("upstream_failed", [])]

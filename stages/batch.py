"""Running one stage over many slides: one bad slide never stops the batch.

Expected failures (`PipelineError`) are reported in one line; so are the run folder's storage
errors (disk full, read-only, no permission, name too long: `STORAGE_ERRNOS`). Anything else is a
bug or an unreadable file deep in a library, so its traceback goes to RUN/logs/{stage}.log and the
user sees one line pointing there.

The bookkeeping itself may fail on a full or read-only disk: a failure that cannot be recorded in
RUN/failures/ is kept in memory and still goes into RUN/failures.csv; when that cannot be written
either, `BatchReport.problems` says so in one line and the failures are on stderr. Either way the
batch goes on and the command exits 1.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable

from tqdm import tqdm

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.io import STORAGE_ERRNOS, describe_os_error
from wsi_pipeline.manifest import SlideRecord
from wsi_pipeline.run_folder import RunFolder

log = logging.getLogger("wsi_pipeline")


@dataclass
class BatchReport:
    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    # Run-level problems, one line each: failure records or failures.csv that could not be written.
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.problems

    def summary(self) -> str:
        text = (f"{self.stage}: {len(self.done)} done, {len(self.skipped)} already complete, "
                f"{len(self.failed)} failed")
        return text + "".join(f"\n{self.stage}: {p}" for p in self.problems)


def run_batch(stage: str, records: Iterable[SlideRecord], run: RunFolder,
              process: Callable[[SlideRecord], str], *, progress: bool = True) -> BatchReport:
    """Call `process(record)` for each slide; it returns "done" or "skipped" or raises."""
    records = list(records)
    report = BatchReport(stage)
    unrecorded: list[dict] = []
    bar = tqdm(records, desc=stage, unit="slide", disable=not progress, dynamic_ncols=True)
    for record in bar:
        try:
            status = process(record)
        except PipelineError as exc:
            message = str(exc)
        except OSError as exc:
            message = (f"slide {record.slide_id!r}: {describe_os_error(exc)}" if exc.errno in STORAGE_ERRNOS
                       else _unexpected(stage, record.slide_id, run, exc))
        except Exception as exc:  # noqa: BLE001 — keep the batch going, keep the traceback
            message = _unexpected(stage, record.slide_id, run, exc)
        else:
            (report.done if status == "done" else report.skipped).append(record.slide_id)
            try:
                run.clear_failure(stage, record.slide_id)
            except OSError as exc:
                report.problems.append(f"cannot clear the old failure record of {record.slide_id!r}: "
                                       f"{describe_os_error(exc)}")
            continue
        report.failed[record.slide_id] = message
        bar.write(f"FAILED {message}")
        log.error(message)
        try:
            run.record_failure(stage, record.slide_id, message)
        except OSError as exc:
            unrecorded.append({"slide_id": record.slide_id, "stage": stage, "error": message})
            note = f"cannot record the failure of {record.slide_id!r}: {describe_os_error(exc)}"
            bar.write(f"WARNING {note}")
            log.warning(note)
    try:
        run.write_failures_csv(unrecorded)
    except OSError as exc:
        report.problems.append(f"cannot write failures.csv: {describe_os_error(exc)}"
                               + (f" ({len(report.failed)} failure(s) above)" if report.failed else ""))
    return report


def _unexpected(stage: str, slide_id: str, run: RunFolder, exc: BaseException) -> str:
    """One line for an unexpected error; its traceback goes to RUN/logs/{stage}.log if it can."""
    where = write_traceback_log(run, stage, f"slide {slide_id}")
    return f"slide {slide_id!r}: unexpected {type(exc).__name__}: {exc} ({where})"


def write_traceback_log(run: RunFolder, stage: str, header: str) -> str:
    """Append the current exception's traceback to RUN/logs/{stage}.log; returns 'traceback in
    PATH', or why it could not be written (a full disk must not turn one failure into a crash)."""
    log_path = run.root / "logs" / f"{stage}.log"
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {header}\n{traceback.format_exc()}\n")
    except OSError as exc:
        return f"traceback not saved: {describe_os_error(exc)}"
    return f"traceback in {log_path}"

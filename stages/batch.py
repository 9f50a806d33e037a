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
from typing import Callable, Iterable

from tqdm import tqdm

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.io import STORAGE_ERRNOS, describe_os_error
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import SlideRecord

from .base import StageReport

log = logging.getLogger("wsi_pipeline")


# The report every stage returns (stages/base.py); the old name stays for callers of run_batch.
BatchReport = StageReport


def run_batch(stage: str, records: Iterable[SlideRecord], run: RunFolder,
              process: Callable[[SlideRecord], str], *, progress: bool = True) -> StageReport:
    """Call `process(record)` for each slide; it returns "done" or "skipped" or raises."""
    records = list(records)
    report = StageReport(stage)
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
            run.record_failure(stage, record.slide_id, message, source=record.path)
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
    """Append the current exception's traceback to RUN/logs/{stage}.log (`RunFolder.log_traceback`)."""
    return run.log_traceback(stage, header)

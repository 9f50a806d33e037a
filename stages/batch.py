"""Running one stage over many slides: one bad slide never stops the batch.

Expected failures (`PipelineError`) are reported in one line; anything else is a bug or an
unreadable file deep in a library, so its traceback goes to RUN/logs/{stage}.log and the user sees
one line pointing there.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable

from tqdm import tqdm

from wsi_pipeline.errors import PipelineError
from wsi_pipeline.manifest import SlideRecord
from wsi_pipeline.run_folder import RunFolder

log = logging.getLogger("wsi_pipeline")


@dataclass
class BatchReport:
    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (f"{self.stage}: {len(self.done)} done, {len(self.skipped)} already complete, "
                f"{len(self.failed)} failed")


def run_batch(stage: str, records: Iterable[SlideRecord], run: RunFolder,
              process: Callable[[SlideRecord], str], *, progress: bool = True) -> BatchReport:
    """Call `process(record)` for each slide; it returns "done" or "skipped" or raises."""
    records = list(records)
    report = BatchReport(stage)
    bar = tqdm(records, desc=stage, unit="slide", disable=not progress, dynamic_ncols=True)
    for record in bar:
        try:
            status = process(record)
        except PipelineError as exc:
            message = str(exc)
        except Exception as exc:  # noqa: BLE001 — keep the batch going, keep the traceback
            log_path = run.root / "logs" / f"{stage}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"--- slide {record.slide_id}\n{traceback.format_exc()}\n")
            message = (f"slide {record.slide_id!r}: unexpected {type(exc).__name__}: {exc} "
                       f"(traceback in {log_path})")
        else:
            (report.done if status == "done" else report.skipped).append(record.slide_id)
            run.clear_failure(stage, record.slide_id)
            continue
        report.failed[record.slide_id] = message
        run.record_failure(stage, record.slide_id, message)
        bar.write(f"FAILED {message}")
        log.error(message)
    run.write_failures_csv()
    return report

"""The run report: `build_report(RUN, manifest)` writes RUN/report/index.html (+ assets/), a page
that opens from disk: per model x cohort ROC / PR with patient bootstrap bands, calibration,
confusion, folds and loss curves; the slides with thumbnails, heatmaps and top-k patches;
detection, weak segmentation, failures, configs (build.py)."""

from .build import build_report

__all__ = ["build_report"]

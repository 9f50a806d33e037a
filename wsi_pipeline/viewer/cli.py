"""`wsi-pipeline report RUN` and `wsi-pipeline view RUN`: argument parsing and dispatch (kept out of
cli.py so the shared command line grows by two lines)."""

from __future__ import annotations

from pathlib import Path


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="RUN/report/index.html: ROC/PR with bootstrap bands, calibration, folds, "
                                      "loss curves, slides with heatmaps and top-k, detection, segmentation, "
                                      "failures, configs (opens from disk)")
    p.add_argument("run", help="run folder")
    p.add_argument("--manifest", default=None,
                   help="the run's manifest (slide thumbnails, slides without predictions; recorded for `view`)")
    p.add_argument("--config", default=None, help="accepted for the workflow's rule; the report reads "
                                                  "the resolved configs in RUN")
    p.add_argument("--viewer-url", default="http://127.0.0.1:8000/",
                   help="where the report's slide links point (default http://127.0.0.1:8000/)")


def add_view_parser(sub) -> None:
    p = sub.add_parser("view", help="local slide viewer over a run: deep-zoom slides with heatmap, tissue, "
                                    "lesion and detection overlays (read-only; 127.0.0.1 unless --host)")
    p.add_argument("run", help="run folder")
    p.add_argument("--manifest", default=None,
                   help="slides to serve (default: the manifest RUN/report/run.json records)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")


def load_run_manifest(run: Path, manifest: str | None):
    """The Manifest given, else the one run.json records, else None."""
    from ..errors import PipelineError
    from ..report.collect import read_json
    from ..run.manifest import load_manifest

    if manifest is None:
        recorded = read_json(run / "report" / "run.json")
        manifest = recorded.get("manifest") if isinstance(recorded, dict) else None
        if manifest is None or not Path(manifest).is_file():
            return None
    if not Path(manifest).is_file():
        raise PipelineError(f"manifest not found: {manifest}")
    return load_manifest(manifest)


def dispatch(args) -> int:
    from ..errors import PipelineError

    run = Path(args.run).resolve()
    if not run.is_dir():
        raise PipelineError(f"run folder not found: {run}")
    manifest = load_run_manifest(run, args.manifest)
    if args.command == "report":
        from ..report import build_report

        index = build_report(run, manifest, viewer_url=args.viewer_url)
        print(f"report: {index}")
        return 0
    from .server import serve

    return serve(run, manifest, host=args.host, port=args.port)

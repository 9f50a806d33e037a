"""export: a run's features in the layout CLAM, TRIDENT or STAMP reads (wsi_pipeline.interop).

    wsi-pipeline export --to clam|trident|stamp --manifest M --run RUN --out OUT [--encoder E]

Reads RUN/features/{encoder}/{slide_id}.h5 for the manifest's slides and writes OUT in that tool's
layout (interop/clam.py, trident.py, stamp.py say which files, and which upstream code reads them),
each file atomically; then the tool's tables. Nothing is written in RUN.
Before anything is written (exit 2, one line): an unknown target, a RUN with no features for the
encoder, a manifest the tool cannot represent (STAMP: one label per patient), an OUT that is RUN or
inside it, an OUT that holds files but is not an earlier export for the same tool and encoder
(OUT/wsi-pipeline-export.json tells; `--force` writes there anyway, and names the tables it replaced).
Into an earlier export of the same kind, `--slides A,B` merges: the tables keep every slide whose
files are there. A slide whose features are missing or unusable fails on its own (exit 1,
OUT/failures.csv) and the others are exported. OUT/configs/export.yaml records the config used.
"""

from __future__ import annotations

import os
from pathlib import Path

from wsi_pipeline.errors import ConfigError, ManifestError
from wsi_pipeline.interop import TARGETS, ExportOut, get_target, load_export_slide
from wsi_pipeline.interop.common import EXPORT_RECORD, files_present, read_export_record, write_export_record
from wsi_pipeline.run.config import Config
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import Manifest
from wsi_pipeline.run.names import check_name

from .base import CONFIG, MANIFEST, NO_PROGRESS, SLIDES, Stage, StageReport, arg, split_list
from .batch import run_batch

STAGE = "export"


def check_export(manifest: Manifest, cfg: Config, run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 to: str, encoder: str | None = None, force: bool = False) -> str:
    """Everything that must hold before OUT is touched; returns the encoder name. Raises a
    PipelineError (exit 2) naming the problem and its fix."""
    target = get_target(to)
    encoder = check_name(encoder, "--encoder") if encoder else cfg.extract.encoder
    run = RunFolder(run_dir)
    if not run.root.is_dir():
        raise ConfigError(f"--run {run_dir}: no such run folder")
    _check_out(run.root, Path(out_dir), to, encoder, force)
    features_dir = run.features_dir(encoder)
    have = [r.slide_id for r in manifest if run.features_h5(encoder, r.slide_id).is_file()]
    if not have:
        found = sorted(p.name for p in (run.root / "features").glob("*") if p.is_dir())
        where = (f"{features_dir} has none of the manifest's {len(manifest)} slides" if features_dir.is_dir()
                 else f"there is no {features_dir}")
        raise ConfigError(f"--run {run_dir}: no features to export for encoder {encoder!r} ({where}; "
                          f"encoders with features: {', '.join(found) or 'none'}): run "
                          f"`wsi-pipeline extract` first, or name the encoder with --encoder")
    problems = target.manifest_problems(manifest)
    if problems:
        raise ManifestError(manifest.path, [f"cannot export to {to}: {p}" for p in problems])
    return encoder


def _same_kind(record: dict | None, to: str, encoder: str) -> bool:
    return record is not None and record.get("to") == to and record.get("encoder") == encoder


def _check_out(run_root: Path, out: Path, to: str, encoder: str, force: bool) -> None:
    run_root, out = run_root.resolve(), out.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_relative_to(run_root):
        # RUN's folders are the pipeline's (its clean-up, a retrain, `run --force` may rewrite them)
        raise ConfigError(f"--out {out}: is the run folder {run_root} or inside it; export to a folder of its own")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held == ["configs"] and [p.name for p in (out / "configs").iterdir()] == [f"{STAGE}.yaml"]:
        held = []   # only the config record the command itself writes after these checks
    if not held or force:
        return
    record = read_export_record(out)
    if record is None:
        shown = ", ".join(held[:4]) + (f" (+{len(held) - 4} more)" if len(held) > 4 else "")
        raise ConfigError(f"--out {out}: holds files that are not a wsi-pipeline export ({shown}; no "
                          f"{EXPORT_RECORD}); export to an empty or new folder, or pass --force to write "
                          f"there (files of the export's names are then replaced)")
    if not _same_kind(record, to, encoder):
        raise ConfigError(f"--out {out}: is an export for {record.get('to')} of encoder "
                          f"{record.get('encoder')!r}, not for {to} of {encoder!r}; export to another folder, "
                          f"or pass --force to write there")


def run_export(manifest: Manifest, cfg: Config, out_dir: str | os.PathLike, *, to: str,
               run: str | os.PathLike, encoder: str | None = None, force: bool = False,
               progress: bool = True) -> StageReport:
    """Export every slide of `manifest` from RUN (`run`) to `out_dir` in `to`'s layout; per-slide
    failures are recorded in OUT/failures.csv and the others go on. Into an earlier export of the
    same kind (OUT's export record: same tool and encoder) the slides are merged: the tables hold
    every slide of the record whose files are still there, with the slides written now."""
    encoder = check_export(manifest, cfg, run, out_dir, to, encoder, force)
    target = get_target(to)
    source, out = RunFolder(run), ExportOut(out_dir)
    earlier_record = read_export_record(out.root)
    same_kind = _same_kind(earlier_record, to, encoder)
    earlier = {sid: row for sid, row in (earlier_record["slides"].items() if same_kind else ())
               if isinstance(row, dict) and files_present(out, row)}
    replaced = [t for t in target.tables if not same_kind and out.path(t).is_file()]
    rows: dict[str, dict] = {}

    def export_slide(record) -> str:
        slide = load_export_slide(source.features_h5(encoder, record.slide_id), record)
        rows[record.slide_id] = target.write_slide(out, slide)
        return "done"

    out.root.mkdir(parents=True, exist_ok=True)
    # Recorded first, so an export cut short is still known as ours and can be run again.
    write_export_record(out, to, encoder, str(run), earlier)
    report = run_batch(f"{STAGE}-{to}", manifest, RunFolder(out_dir), export_slide, progress=progress)
    report.stage = f"{STAGE} {to}"
    merged = dict(earlier)
    merged.update((r.slide_id, rows[r.slide_id]) for r in manifest if r.slide_id in rows)
    written = list(merged.values())
    tables = target.write_tables(out, written) if written else []
    write_export_record(out, to, encoder, str(run), merged)
    report.outputs = {sid: row for sid, row in rows.items()}
    report.details = {"target": to, "encoder": encoder, "tables": [str(t) for t in tables]}
    kept = len(merged) - len(rows)
    report.notes.append(f"{to}: {len(rows)} slide(s) written in {out.root}"
                        + (f", {kept} kept from the earlier export" if kept else "")
                        + (f"; tables {', '.join(Path(t).name for t in tables)} ({len(written)} slides)"
                           if tables else ""))
    if replaced:
        report.warnings.append(f"export: --force: replaced {', '.join(replaced)} in {out.root}, which "
                               f"held no {to} export of {encoder!r}")
    return report


def _check_args(args) -> None:
    get_target(args.to)
    if args.encoder:
        check_name(args.encoder, "--encoder")


def _check(cfg: Config, args) -> None:
    """Before OUT/configs/export.yaml is written: the same checks run_export makes first."""
    from wsi_pipeline.run.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    if args.slides:
        manifest = manifest.select(split_list(args.slides))
    check_export(manifest, cfg, args.run, args.out, args.to, args.encoder, args.force)


EXPORT = Stage(
    name=STAGE, sections=("extract",), run=run_export, run_arg=("out",), check_args=_check_args, check=_check,
    help="write a run's features for CLAM, TRIDENT or STAMP (their file layouts and tables)",
    args=(arg("--to", required=True, choices=TARGETS, help="the tool to write for"), MANIFEST,
          arg("--run", required=True, help="run folder with features (RUN/features/ENCODER/)"),
          arg("--out", required=True, help="export folder (not RUN itself)"), CONFIG,
          arg("--encoder", default=None, help="whose features (default: extract.encoder of the config)"),
          SLIDES, NO_PROGRESS,
          arg("--force", action="store_true",
              help="write into an --out that is not an earlier export of this kind (its files of the "
                   "export's names are replaced)")),
    options=lambda a: {"to": a.to, "run": a.run, "encoder": a.encoder})

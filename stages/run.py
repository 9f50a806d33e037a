"""`wsi-pipeline run`: the whole workflow over a manifest, through Snakemake.

Wraps `snakemake -s workflow/Snakefile --directory RUN` with the defaults a user wants: the local
profile (or the one given), keep going past failed slides, rerun incomplete jobs. At the end it
rebuilds RUN/failures.csv and prints where the results are and each cohort's CV AUC.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from wsi_pipeline.run.lock import one_run_per_folder
from wsi_pipeline.run.summary import failed_before_training, summarise_metrics, summarise_segmentation

__all__ = ["HELP", "add_arguments", "cli", "failed_before_training", "snakemake_command", "summarise_metrics",
           "summarise_segmentation", "workflow_dir"]


def workflow_dir() -> Path:
    """The workflow (Snakefile, rules, profiles, schemas): package data `wsi_pipeline/workflow/` in an
    installed wheel (pyproject maps the repository's workflow/ there), else the checkout's workflow/
    beside this package (a source tree on sys.path, or an editable install)."""
    from importlib.resources import files

    packaged = Path(str(files("wsi_pipeline"))) / "workflow"
    if (packaged / "Snakefile").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "workflow"


SNAKEFILE = workflow_dir() / "Snakefile"
PROFILES = workflow_dir() / "profiles"


HELP = "the whole workflow (Snakemake): tile -> extract -> train -> heatmap"


def add_arguments(p) -> None:
    p.add_argument("--manifest", required=True, help="slide manifest CSV (see manifests/README.md)")
    p.add_argument("--config", default=None, help="pipeline YAML config (default: built-in defaults)")
    p.add_argument("--out", required=True, help="run folder (Snakemake's working directory)")
    p.add_argument("--profile", default="local",
                   help="Snakemake profile: a name under workflow/profiles (local, slurm) or a folder")
    p.add_argument("--model", default=None, help="MIL aggregator to train (default: train.model)")
    p.add_argument("--cores", default=None, help="cores for local runs (default: the profile's, all)")
    p.add_argument("--gpu", action="store_true", help="request a GPU for extract/train/heatmap jobs")
    p.add_argument("--no-train", action="store_true", help="stop after feature extraction")
    p.add_argument("--no-heatmaps", action="store_true", help="train but write no heatmaps")
    p.add_argument("--segment", action="store_true",
                   help="also weak lesion segmentation from the model's CAMs (FMaMIL stage 2; best with "
                        "--model fmamil)")
    p.add_argument("--detect", action="store_true",
                   help="also dense cell/mitosis detection on every slide (RUN/detect/DETECTOR/)")
    p.add_argument("--exclude-failed", action="store_true",
                   help="go on without the slides whose tile/extract failed (in this run: the workflow then "
                        "runs once more; or in an earlier run of RUN, while their file is unchanged): their "
                        "cohorts train without them (default: a failed slide blocks its cohort's training)")
    p.add_argument("--no-report", action="store_true",
                   help="write no RUN/report/index.html at the end (wsi-pipeline report)")
    p.add_argument("--slides-per-job", type=_slides_per_job, default=None, metavar="K",
                   help="slides per tile/extract/heatmap job: one process (one cluster job) runs K slides of "
                        "a cohort in turn (default: cluster.slides_per_job of the config, 1)")
    p.add_argument("--dry-run", "-n", action="store_true", help="show the jobs that would run")
    p.add_argument("snakemake_args", nargs="*",
                   help="extra Snakemake arguments, after `--` (e.g. -- --forceall)")


def _slides_per_job(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def profile_dir(profile: str) -> Path:
    candidate = Path(profile)
    if candidate.is_dir():
        return candidate.resolve()
    named = PROFILES / profile
    if named.is_dir():
        return named
    from wsi_pipeline.errors import PipelineError

    known = ", ".join(sorted(p.name for p in PROFILES.iterdir() if p.is_dir()))
    raise PipelineError(f"--profile {profile!r}: not a folder and not one of {known}")


def snakemake_command(args) -> list[str]:
    """The snakemake command line `wsi-pipeline run` executes (also printed for the user)."""
    from wsi_pipeline.errors import PipelineError

    manifest = Path(args.manifest).resolve()
    if not manifest.is_file():
        raise PipelineError(f"manifest not found: {manifest}")
    pipeline_config = Path(args.config).resolve() if args.config else None
    if pipeline_config is not None and not pipeline_config.is_file():
        raise PipelineError(f"config file not found: {pipeline_config}")
    cli = f"{shlex.quote(sys.executable)} -m wsi_pipeline.cli"
    config = [f"manifest={manifest}", f"cli={cli}"]
    if pipeline_config is not None:
        config.append(f"pipeline_config={pipeline_config}")
    if args.model:
        config.append(f"model={args.model}")
    if args.gpu:
        config.append("gpu=True")
    if args.no_train:
        config.append("train=False")
    if args.no_heatmaps:
        config.append("heatmaps=False")
    if args.segment:
        config.append("segment=True")
    if args.exclude_failed:
        config.append("exclude_failed=True")
    if args.detect:
        config.append("detect=True")
    if getattr(args, "no_report", False):
        config.append("report=False")
    if getattr(args, "slides_per_job", None):
        config.append(f"slides_per_job={args.slides_per_job}")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE),
           "--directory", str(Path(args.out).resolve()), "--profile", str(profile_dir(args.profile)),
           "--config", *config]
    if args.cores:
        cmd += ["--cores", str(args.cores)]
    if args.dry_run:
        cmd.append("--dry-run")
    cmd += list(args.snakemake_args)
    return cmd


def cli(args) -> int:
    from wsi_pipeline.run.validation import validate_run_inputs

    # Before the lock, before Snakemake starts and before RUN is created: every manifest/config/
    # name/registry problem at once, as InputsError -> exit 2 (even when RUN is in use by a run).
    manifest, cfg = validate_run_inputs(args.manifest, args.config, model=args.model, train=not args.no_train)
    if any(not r.is_volume for r in manifest):
        from wsi_pipeline.encoders.fit import tiling_fit_warning

        # Once for the run: the workflow's extract jobs are one slide each (their logs repeat it).
        warning = tiling_fit_warning(cfg.extract.encoder, cfg.tiling.target_mpp, cfg.tiling.patch_size_px)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    volumes = [r for r in manifest if r.is_volume]
    if volumes and (args.segment or args.detect):
        from wsi_pipeline.errors import InputsError

        flag = "--segment" if args.segment else "--detect"
        rows = ", ".join(f"{r.row} ({r.slide_id})" for r in volumes[:5]) + (" ..." if len(volumes) > 5 else "")
        raise InputsError([f"{flag} works on whole-slide images; manifest rows {rows} are volumes "
                           f"(CT/MR): run them without {flag}"])
    return _run_workflow(args)


@one_run_per_folder  # RUN/.wsi-pipeline.lock for the whole run (wsi_pipeline/run/lock.py)
def _run_workflow(args) -> int:
    from wsi_pipeline.run.config import load_config
    from wsi_pipeline.run.folder import RunFolder

    cmd = snakemake_command(args)
    run_dir = Path(args.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    print("running:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    # The jobs run this same Python (`sys.executable -m wsi_pipeline.cli`), so they import the
    # installed wsi_pipeline and stages packages: no path is added.
    run = RunFolder(run_dir)
    left_out_before = _left_out(args, run)
    code = subprocess.call(cmd)
    if args.dry_run:
        return code
    new = sorted(set(_left_out(args, run)) - set(left_out_before)) if not args.no_train else []
    if new:
        # Slides failed tile/extract in this run: only now can the workflow leave them out, so it
        # runs once more and their cohorts train without them (nothing finished is redone).
        print(f"\n--exclude-failed: {', '.join(new)} failed before training; running the workflow again "
              f"without {'them' if len(new) > 1 else 'it'}", flush=True)
        code = subprocess.call(cmd)

    run.write_failures_csv()
    failures = run.failures()
    cfg = load_config(args.config)
    model = args.model or cfg.train.model
    print(f"\nrun folder: {run_dir}")
    print(f"  tiles:    {run.tiles_dir}")
    print(f"  features: {run.features_dir(cfg.extract.encoder)}")
    for metrics_file in sorted((run_dir / "mil" / model).glob("*/metrics.json")):
        print(f"  {model} / {metrics_file.parent.name}: {summarise_metrics(metrics_file)}")
        print(f"            {metrics_file.parent}")
    if (run_dir / "heatmaps" / model).is_dir():
        print(f"  heatmaps: {run.heatmaps_dir(model)}")
    _summarise_volumes(args, run_dir, model)
    segment_metrics = run.segment_dir / "metrics.csv"
    if args.segment and segment_metrics.is_file():
        print(f"  segment:  {run.segment_dir} ({summarise_segmentation(segment_metrics)})")
    if failures:
        print(f"\n{len(failures)} failure(s), listed in {run_dir / 'failures.csv'}:")
        for row in failures:
            print(f"  [{row['stage']}] {row['error']}")
    left_out = _left_out(args, run)
    if left_out:
        print(f"\nleft out (--exclude-failed): {', '.join(left_out)}")
    if not args.no_train:   # every cohort without metrics.json, and why
        from wsi_pipeline.run.manifest import load_manifest
        from wsi_pipeline.run.summary import untrained_cohorts

        reasons = untrained_cohorts(run_dir, load_manifest(args.manifest), model, failures,
                                    exclude_failed=args.exclude_failed, snakemake_code=code)
        for cohort, reason in reasons.items():
            print(f"\ncohort {cohort!r} was not trained: {reason}")
    _report(args, run_dir, code)
    if code != 0:
        print(f"\nsnakemake exited with {code}; job logs are under {run_dir / 'logs' / 'snakemake'}",
              file=sys.stderr)
        return code
    manifest_ids = {r.slide_id for r in _manifest_rows(args)}
    if any(f.get("slide_id") in manifest_ids and f.get("slide_id") not in left_out for f in failures):
        # Jobs of several slides (--slides-per-job) succeed when a slide of theirs failed with its
        # record; the run did not finish every slide all the same (exit 1, as with one job a slide).
        return 1
    return 0


def _manifest_rows(args):
    from wsi_pipeline.manifest import load_manifest

    return load_manifest(args.manifest).records


def _report(args, run_dir: Path, code: int) -> None:
    """Print the report's path. The workflow's last rule writes it; a run with failed jobs never
    reaches that rule, so the report is built here then, to show the failures with the rest."""
    if getattr(args, "no_report", False):
        return
    index = run_dir / "report" / "index.html"
    if code != 0 or not index.is_file():
        import logging

        from wsi_pipeline.report import build_report
        from wsi_pipeline.run.manifest import load_manifest

        try:
            index = build_report(run_dir, load_manifest(args.manifest))
        except Exception as exc:  # noqa: BLE001 — the run's own result stands without a report
            logging.getLogger("wsi_pipeline").warning("report not written: %s: %s", type(exc).__name__, exc)
            return
    print(f"\nreport:   {index}  (open in a browser; slides: wsi-pipeline view {run_dir})")


def _left_out(args, run) -> list[str]:
    """The slides --exclude-failed leaves out now: tile/extract failures on record that still
    describe the manifest's files (wsi_pipeline.run.summary.excluded_failures, as common.smk decides)."""
    if not args.exclude_failed:
        return []
    from wsi_pipeline.run.manifest import load_manifest
    from wsi_pipeline.run.summary import excluded_failures

    return excluded_failures(load_manifest(args.manifest), run.failures())


def _summarise_volumes(args, run_dir: Path, model: str) -> None:
    """A manifest with volume rows: RUN/volumes_summary.json (CV AUC, heatmap peak in lesion, CAM
    Dice per volume cohort, from metrics.json and the heatmap stage's done files), one line each."""
    from wsi_pipeline.run.manifest import load_manifest

    manifest = load_manifest(args.manifest)
    if args.no_train or not any(r.is_volume for r in manifest):
        return
    from wsi_pipeline.volumes.cohort import format_summary, summarise_volume_run

    summary = summarise_volume_run(run_dir, manifest, model)
    for line in format_summary(summary).splitlines():
        print(f"  volumes:  {line}")
    print(f"            {run_dir / 'volumes_summary.json'}")

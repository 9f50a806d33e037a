"""One shape for every stage: a `Stage` description and the `StageReport` its `run` returns.

    Stage(name, help, sections, run, args, ...)
        sections   the config sections the stage's outputs depend on (the Snakefile hashes them)
        volume_sections  the further sections its outputs of a volume row depend on (`volumes`)
        run        the Python API: run(manifest, cfg, run_dir, **options) -> StageReport
        args       the CLI arguments of `wsi-pipeline {name}` (cli.py builds its subcommands from
                   `stages.STAGES`; the workflow's rules call those same words)
        overrides  CLI arguments that override a config key ({"epochs": "train.epochs"})
        options    CLI arguments -> run()'s keyword options

`invoke(stage, args)` is what `wsi-pipeline {name}` does: config (with overrides), manifest, the
checks `wsi-pipeline run` makes (`validation.stage_problems`: registry names, per_model keys,
labels, the detector), the resolved config recorded as RUN/configs/{name}.yaml, run, print the
report. A refusal (exit 2) before or inside `run` leaves those records as they were. So calling `run` from
Python with the same config and options does exactly what the command does.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from wsi_pipeline.run.config import Config


@dataclass
class StageReport:
    """Per-item status (done / skipped / failed with its one-line error), outputs and run problems.

    Items are slides for most stages, cohorts for train. `outputs[item]` is what the stage wrote
    for the item (a dict of results, or a path); `details` holds stage-wide results (also readable
    as attributes: `report.metrics_csv`). `report[item]` gives one item's record."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    # Run-level problems, one line each: failure records or failures.csv that could not be written.
    problems: list[str] = field(default_factory=list)
    outputs: dict[str, object] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)      # extra result lines (stdout)
    warnings: list[str] = field(default_factory=list)   # extra problem lines (stderr)
    failures_csv: bool = True                           # failures go to RUN/failures.csv

    @property
    def ok(self) -> bool:
        return not self.failed and not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def status(self, item: str) -> str | None:
        if item in self.failed:
            return "failed"
        return "done" if item in self.done else "skipped" if item in self.skipped else None

    def __getitem__(self, item: str) -> dict:
        if self.status(item) is None and item not in self.outputs:
            raise KeyError(item)
        record = {"status": self.status(item)}
        if item in self.failed:
            record["error"] = self.failed[item]
        output = self.outputs.get(item)
        record.update(output if isinstance(output, dict) else {} if output is None else {"output": output})
        return record

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self.outputs, *self.done, *self.skipped, *self.failed]))

    def items(self):
        return [(item, self[item]) for item in self]

    def __getattr__(self, name: str):
        details = self.__dict__.get("details") or {}
        if name in details:
            return details[name]
        raise AttributeError(name)

    def merge(self, other: "StageReport") -> None:
        self.done.extend(other.done)
        self.skipped.extend(other.skipped)
        self.failed.update(other.failed)
        self.problems.extend(other.problems)

    def summary(self) -> str:
        text = (f"{self.stage}: {len(self.done)} done, {len(self.skipped)} already complete, "
                f"{len(self.failed)} failed")
        return "\n".join([text, *(f"{self.stage}: {p}" for p in self.problems), *self.notes])


@dataclass(frozen=True)
class Arg:
    """One CLI argument: argparse's flags and keywords, kept as data so the CLI is built from it."""
    flags: tuple[str, ...]
    options: dict

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.flags, **self.options)


def arg(*flags: str, **options) -> Arg:
    return Arg(tuple(flags), options)


# Arguments most stages share.
MANIFEST = arg("--manifest", required=True, help="slide manifest CSV (see manifests/README.md)")
CONFIG = arg("--config", default=None, help="YAML config (default: built-in defaults)")
SLIDES = arg("--slides", default=None, help="comma-separated slide_ids to process (default: all)")
EXCLUDE = arg("--exclude-slides", default=None, metavar="A,B",
              help="comma-separated slide_ids to leave out (e.g. slides whose extraction failed)")
FORCE = arg("--force", action="store_true", help="redo slides whose outputs are complete")
NO_PROGRESS = arg("--no-progress", action="store_true", help="no progress bar")
# A workflow job that runs several slides (cluster.slides_per_job > 1; workflow/rules/batches.smk).
BATCH = (
    arg("--batch-record", default=None, metavar="RUN/batches/STAGE/NAME.json",
        help="(workflow) write the per-slide outcome of this call there and exit 0 when every slide "
             "either finished or failed with its failure record (the job itself succeeded)"),
    arg("--batch-token", default="", help="(workflow) the job's rerun token, kept in the record"),
    arg("--after-batch", default=None, metavar="RUN/batches/STAGE/NAME.json",
        help="(workflow) leave out the slides this upstream batch record lists as failed: they have "
             "their failure record already"),
)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    sections: tuple[str, ...]
    run: Callable[..., StageReport]
    args: tuple[Arg, ...] = ()
    run_arg: tuple[str, ...] = ("out",)      # the argument naming the run folder (first one given)
    overrides: dict[str, str] = field(default_factory=dict)
    options: Callable[[argparse.Namespace], dict] = lambda args: {}
    require_labels: bool = False
    check_args: Callable[[argparse.Namespace], None] | None = None     # names in the arguments, first
    check: Callable[[Config, argparse.Namespace], None] | None = None  # the config, before anything is written
    record_root_config: bool = False         # also RUN/config.yaml (the data stages, as before)
    # Volume rows' outputs also depend on these (a slide's do not: changing `volumes` reruns no slide).
    volume_sections: tuple[str, ...] = ()

    @property
    def run_flag(self) -> str:
        """The flag the workflow passes the run folder with (the required one of `run_arg`)."""
        return "--" + self.run_arg[-1].replace("_", "-")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for a in self.args:
            a.add_to(parser)

    def config(self, args: argparse.Namespace) -> Config:
        """The config file (or defaults) with this stage's CLI overrides applied."""
        import dataclasses

        from wsi_pipeline.run.config import load_config

        def replace(obj, path: list[str], value):   # "detect.train.epochs": nested parameter objects
            inner = value if len(path) == 1 else replace(getattr(obj, path[0]), path[1:], value)
            return dataclasses.replace(obj, **{path[0]: inner})

        cfg = load_config(getattr(args, "config", None))
        for dest, key in self.overrides.items():
            if getattr(args, dest, None) is not None:
                cfg = replace(cfg, key.split("."), getattr(args, dest))
        return cfg


def check_model_arg(args: argparse.Namespace) -> None:
    """--model names a folder under RUN: a safe name, checked before anything is written."""
    from wsi_pipeline.run.names import check_name

    if getattr(args, "model", None) is not None:
        check_name(args.model, "--model")


def split_list(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


@contextlib.contextmanager
def _records_kept_if_refused(run_dir: Path, stages: list[str | None]):
    """A stage that refuses its inputs (PipelineError out of `run`: exit 2) leaves the run's config
    records (RUN/config.yaml, RUN/configs/{stage}.yaml) as they were, and creates no folder: a
    refused command must not describe a run that never happened beside the real outputs."""
    from wsi_pipeline.errors import PipelineError
    from wsi_pipeline.io import atomic_path

    # Where save_resolved_config writes: RUN/config.yaml, RUN/configs/{stage}.yaml.
    paths = [run_dir / "config.yaml" if stage is None else run_dir / "configs" / f"{stage}.yaml"
             for stage in stages]
    before = {p: p.read_bytes() if p.is_file() else None for p in paths}
    new_dirs = [d for d in dict.fromkeys(p.parent for p in paths) if not d.exists()]
    if not run_dir.exists():
        new_dirs.append(run_dir)
    try:
        yield
    except PipelineError:
        with contextlib.suppress(OSError):
            for path, content in before.items():
                if content is None:
                    path.unlink(missing_ok=True)
                elif not path.is_file() or path.read_bytes() != content:
                    with atomic_path(path) as tmp:
                        tmp.write_bytes(content)
            for folder in sorted(set(new_dirs), key=lambda d: len(d.parts), reverse=True):
                # only if still empty: nothing else of the stage's is lost
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise


SPLITTING_STAGES = ("train", "train-detector")


def invoke(stage: Stage, args: argparse.Namespace) -> int:
    """`wsi-pipeline {stage.name} ...`: the stage's `run` on the inputs the arguments name."""
    from wsi_pipeline.run.config import save_resolved_config
    from wsi_pipeline.run.manifest import load_manifest

    from wsi_pipeline.errors import InputsError
    from wsi_pipeline.run.validation import stage_problems

    if stage.check_args is not None:
        stage.check_args(args)
    cfg = stage.config(args)
    # One image under two ids matters where slides are split into training and test (train, and
    # `run` / validate-manifest, which check the whole manifest); a workflow job names its slide
    # (--slides) and `run` checked the manifest's files already.
    manifest = load_manifest(args.manifest, require_labels=stage.require_labels,
                             check_same_files=stage.name in SPLITTING_STAGES and not getattr(args, "slides", None))
    if getattr(args, "exclude_slides", None):
        manifest = manifest.without(split_list(args.exclude_slides))
    if getattr(args, "slides", None):
        manifest = manifest.select(split_list(args.slides))
    run_dir = Path(next(v for v in (getattr(args, a) for a in stage.run_arg) if v))
    upstream_failed: list[str] = []
    if getattr(args, "batch_record", None):
        from .batch_record import record_path

        record_path(run_dir, args.batch_record)   # refused before anything is written
    if getattr(args, "after_batch", None):
        from .batch_record import failed_in

        upstream_failed = [s for s in failed_in(run_dir, args.after_batch) if s in manifest.by_id()]
        manifest = manifest.without(upstream_failed)
    if stage.check is not None:
        stage.check(cfg, args)
    # The checks `wsi-pipeline run` makes (wsi_pipeline/run/validation.py), before any record is written.
    problems = stage_problems(stage, cfg, manifest, args)
    if problems:
        raise InputsError(problems)
    options = stage.options(args)
    if hasattr(args, "force"):
        options["force"] = args.force
    with _records_kept_if_refused(run_dir, [None] * stage.record_root_config + [stage.name]):
        if stage.record_root_config:
            save_resolved_config(cfg, run_dir)
        save_resolved_config(cfg, run_dir, stage=stage.name)
        report = stage.run(manifest, cfg, run_dir, progress=not getattr(args, "no_progress", False), **options)
    print(report.summary())
    for line in report.warnings:
        print(line, file=sys.stderr)
    if report.failed and report.failures_csv and not any("failures.csv" in p for p in report.problems):
        print(f"failed slides are listed in {run_dir}/failures.csv", file=sys.stderr)
    if getattr(args, "batch_record", None):
        from .batch_record import write_batch_record

        write_batch_record(run_dir, args.batch_record, stage.name, args.batch_token, report, upstream_failed)
        # The slides' failures are recorded one by one; the job failed only if the bookkeeping did.
        return 1 if report.problems else 0
    return report.exit_code

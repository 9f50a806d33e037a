"""`wsi-pipeline` command line. Wiring only: parse, load config/manifest, call a stage.

Exit codes: 0 all slides fine; 1 some slides failed (see RUN/failures.csv); 2 bad usage, config or
manifest (nothing was run).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from .errors import ConfigError, PipelineError


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, help="slide manifest CSV (see manifests/README.md)")
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--slides", default=None, help="comma-separated slide_ids to process (default: all)")
    p.add_argument("--force", action="store_true", help="redo slides whose outputs are complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-cohort", help="write a synthetic H&E cohort with ground truth + manifest")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=8, help="number of slides (default 8)")
    p.add_argument("--width", type=int, default=6144, help="level-0 width px (default 6144)")
    p.add_argument("--height", type=int, default=4096, help="level-0 height px (default 4096)")
    p.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cohorts", default="demo", help="comma-separated cohort names (default demo)")

    p = sub.add_parser("tile", help="stage 1: tissue detection and µm-exact patch coordinates")
    _add_run_args(p)

    p = sub.add_parser("extract", help="stage 2: patch features with a pretrained encoder")
    _add_run_args(p)
    p.add_argument("--encoder", default=None, help="override extract.encoder")
    p.add_argument("--checkpoint", default=None, help="override extract.checkpoint (file, hf-hub:id, random)")

    # Later stages own their arguments: each stages/<name>.py has add_arguments(p) and cli(args) -> int.
    # Their modules import torch lazily, inside cli(), so `wsi-pipeline --help` stays fast.
    for name, help_text in _STAGE_COMMANDS.items():
        if importlib.util.find_spec(f"stages.{_STAGE_MODULES.get(name, name)}") is None:
            continue  # stage not part of this installation
        p = sub.add_parser(name, help=help_text)
        _stage_entry(name)[0](p)

    p = sub.add_parser("encoders", help="list registered encoders")

    p = sub.add_parser("validate-manifest", help="check a manifest and report every problem")
    p.add_argument("manifest")
    p.add_argument("--require-labels", action="store_true")
    p.add_argument("--no-check-files", action="store_true", help="do not check that slide files exist")
    return parser


_STAGE_COMMANDS = {
    "train": "stage 3: cross-validated MIL training per cohort (features -> fold models, predictions, metrics)",
    "predict": "apply a trained fold ensemble to slides with features",
    "heatmap": "stage 4: per-patch score heatmaps (PNG overlay, pyramidal TIFF, QuPath GeoJSON, top-k patches)",
    "segment": "stage 4b: weakly supervised lesion segmentation from CAMs (FMaMIL stage 2)",
    "run": "the whole workflow (Snakemake): tile -> extract -> train -> heatmap",
    "train-detector": "train a cell/mitosis detector (Mamba CenterNet) on annotated slides",
    "detect": "whole-slide cell/mitosis detection: QuPath GeoJSON, CSV, MIDOG JSON, summary with hotspot",
    "eval-detect": "MIDOG-style evaluation: thresholds on validation slides, F1 on held-out slides",
}
# Commands served by a stage module of another name; such a module has COMMANDS = {command: (add_arguments, cli)}.
_STAGE_MODULES = {"train-detector": "detect", "eval-detect": "detect"}


def _stage_module(name: str):
    return importlib.import_module(f"stages.{_STAGE_MODULES.get(name, name)}")


def _stage_entry(name: str):
    """(add_arguments, cli) of command `name`."""
    module = _stage_module(name)
    commands = getattr(module, "COMMANDS", None)
    return commands[name] if commands else (module.add_arguments, module.cli)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        return _dispatch(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The run folder (or a file the run needs) cannot be written or read: disk full, read-only,
        # no permission, name too long. One line naming the file, exit 1 as for failed slides.
        from .io import describe_os_error

        logging.getLogger("wsi_pipeline").debug("OSError", exc_info=True)
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command == "demo-cohort":
        from .demo import make_demo_cohort

        from .names import check_name

        cohorts = tuple(check_name(c.strip(), "--cohorts") for c in args.cohorts.split(",") if c.strip())
        manifest = make_demo_cohort(args.out, args.n, width_px=args.width, height_px=args.height,
                                    mpp=args.mpp, seed=args.seed, cohorts=cohorts, progress=True)
        print(f"demo cohort: {args.n} slides; manifest {manifest}")
        return 0

    if args.command == "validate-manifest":
        from .manifest import load_manifest

        m = load_manifest(args.manifest, require_labels=args.require_labels,
                          check_files=not args.no_check_files)
        print(f"{args.manifest}: {len(m)} slides, "
              f"{len({r.patient_id for r in m})} patients, cohorts: {sorted({r.cohort for r in m})} — OK")
        return 0

    if args.command == "tile":
        from stages.tile import run_tile

        cfg, manifest = _load_inputs(args)
        report = run_tile(manifest, cfg, args.out, force=args.force, progress=not args.no_progress)
        return _finish(report, args.out)
    if args.command == "extract":
        from stages.extract import run_extract

        from .names import check_name
        from .validation import encoder_problem

        def check_encoder(cfg):  # before any slide: else every slide fails with the same message
            problem = encoder_problem(cfg.extract.encoder, "--encoder" if args.encoder else "extract.encoder")
            if problem:
                raise ConfigError(problem)

        if args.encoder:
            check_name(args.encoder, "--encoder")
        overrides = {k: v for k, v in (("encoder", args.encoder), ("checkpoint", args.checkpoint)) if v}
        cfg, manifest = _load_inputs(args, check=check_encoder, extract=overrides)
        report = run_extract(manifest, cfg, args.out, force=args.force, progress=not args.no_progress)
        return _finish(report, args.out)

    if args.command in _STAGE_COMMANDS:
        return _stage_entry(args.command)[1](args)

    if args.command == "encoders":
        from .encoders import get_spec, list_encoders

        for name in list_encoders():
            spec = get_spec(name)
            print(f"{name:20s} dim {spec.out_dim:5d}  input {spec.input_size_px}px  "
                  f"native mpp {spec.native_mpp or '-'}  {spec.notes}")
        print("(any timm architecture name works too)")
        return 0
    raise AssertionError(args.command)


def _load_inputs(args, check=None, **section_overrides):
    """Config (with CLI overrides per section), manifest (optionally a subset); saves the config
    once `check(cfg)` (if given) has passed."""
    import dataclasses

    from .config import load_config, save_resolved_config
    from .manifest import load_manifest

    cfg = load_config(args.config)
    for section, values in section_overrides.items():
        if values:
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    manifest = load_manifest(args.manifest)
    if args.slides:
        manifest = manifest.select(s.strip() for s in args.slides.split(",") if s.strip())
    if check is not None:
        check(cfg)
    save_resolved_config(cfg, args.out)
    return cfg, manifest


def _finish(report, run_dir) -> int:
    print(report.summary())
    if report.failed and not any("failures.csv" in p for p in report.problems):
        print(f"failed slides are listed in {run_dir}/failures.csv", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

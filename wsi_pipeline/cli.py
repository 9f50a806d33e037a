"""`wsi-pipeline` command line. Wiring only: parse, load config/manifest, call a stage.

Exit codes: 0 all slides fine; 1 some slides failed (see RUN/failures.csv), or `run` found RUN in use
by another run (wsi_pipeline/run/lock.py); 2 bad usage, config or manifest (nothing was run).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import PipelineError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-cohort", help="write a synthetic H&E cohort with ground truth + manifest")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=8, help="number of slides (default 8)")
    p.add_argument("--width", type=int, default=None, help="level-0 width px (default 6144; --hard 4096)")
    p.add_argument("--height", type=int, default=None, help="level-0 height px (default 4096; --hard 3072)")
    p.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cohorts", default="demo", help="comma-separated cohort names (default demo)")
    p.add_argument("--hard", action="store_true",
                   help="hard cohort: lesions of 1-4 patches, benign dense-nuclei confounders on every "
                        "slide, stronger stain shift, tissue holes (smaller slides by default)")

    p = sub.add_parser("demo-volumes", help="synthetic CT cohort (NIfTI + truth masks + manifest), then "
                                            "`wsi-pipeline run` on it: instances, MambaMIL 5-fold CV, NIfTI "
                                            "heatmaps (settings: configs/volumes_demo.yaml)")
    p.add_argument("out", help="output folder (the run folder is OUT/run)")
    p.add_argument("--n", type=int, default=40, help="number of patients, one volume each (default 40)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--model", default="mambamil_3d", help="MIL aggregator (default mambamil_3d)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cores", type=int, default=None, help="cores for the workflow (default: all)")
    p.add_argument("--generate-only", action="store_true", help="only write the cohort and its manifest")
    p.add_argument("--hard", action="store_true",
                   help="hard cohort: lesions of 6-12 mm radius, 25-40 HU, in liver, spleen or kidney; fluid, "
                        "vessels and calcifications in every scan; calibration offsets; fine anisotropic grids")

    # One subcommand per stage, built from its description (stages/base.py: name, help, arguments).
    # Stage modules import torch lazily, inside run(), so `wsi-pipeline --help` stays fast.
    from stages import all_stages

    for stage in all_stages():
        stage.add_arguments(sub.add_parser(stage.name, help=stage.help))

    from stages import run as workflow

    workflow.add_arguments(sub.add_parser("run", help=workflow.HELP))

    p = sub.add_parser("encoders", help="registered encoders: dim, µm/px, input, licence, files, config "
                                        "lines; with NAME, one entry in full and its config snippet")
    p.add_argument("name", nargs="?", default=None, help="an encoder name (registered or timm)")

    # Results to look at (issue 27): wsi_pipeline/report, wsi_pipeline/viewer.
    from .viewer.cli import add_report_parser, add_view_parser

    add_report_parser(sub)
    add_view_parser(sub)

    p = sub.add_parser("validate-manifest", help="check a manifest and report every problem")
    p.add_argument("manifest")
    p.add_argument("--require-labels", action="store_true")
    p.add_argument("--no-check-files", action="store_true", help="do not check that slide files exist")
    return parser


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
        from .demo.slides import make_demo_cohort

        from .run.names import check_name

        cohorts = tuple(check_name(c.strip(), "--cohorts") for c in args.cohorts.split(",") if c.strip())
        manifest = make_demo_cohort(args.out, args.n, width_px=args.width, height_px=args.height,
                                    mpp=args.mpp, seed=args.seed, cohorts=cohorts, progress=True,
                                    hard=args.hard)
        print(f"demo cohort: {args.n} {'hard ' if args.hard else ''}slides; manifest {manifest}")
        return 0

    if args.command == "demo-volumes":
        from stages.volume_demo import run_volume_demo

        from .volumes.cohort import format_summary

        from .run.names import check_name

        result = run_volume_demo(args.out, n_patients=args.n, epochs=args.epochs, model=check_name(args.model, "--model"),
                                 seed=args.seed, generate_only=args.generate_only, cores=args.cores,
                                 hard=args.hard)
        if args.generate_only:
            print(f"demo volumes: {args.n} {'hard ' if args.hard else ''}CT volumes; manifest {result}")
            return 0
        summary, code = result
        if summary is None:
            return code or 1
        print(format_summary(summary))
        return code if code else (0 if all(c["status"] == "done" for c in summary["cohorts"].values()) else 1)

    if args.command == "validate-manifest":
        from .run.manifest import load_manifest

        m = load_manifest(args.manifest, require_labels=args.require_labels,
                          check_files=not args.no_check_files, check_same_files=not args.no_check_files)
        print(f"{args.manifest}: {len(m)} slides, "
              f"{len({r.patient_id for r in m})} patients, cohorts: {sorted({r.cohort for r in m})} — OK")
        return 0

    if args.command in ("report", "view"):
        from .viewer.cli import dispatch

        return dispatch(args)

    from stages import STAGE_NAMES, get_stage, invoke

    if args.command in STAGE_NAMES:
        return invoke(get_stage(args.command), args)
    if args.command == "run":
        from stages import run as workflow

        return workflow.cli(args)

    if args.command == "encoders":
        from .encoders import catalog

        if args.name is not None:
            print(catalog.describe(args.name))
            return 0
        print(catalog.text_table())
        print("(any timm architecture name works too; `wsi-pipeline encoders NAME` for one entry in full)")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())

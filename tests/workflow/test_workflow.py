"""The real Snakemake workflow on a tiny generated cohort: full run, no-op rerun, per-slide resume
(while bad slides are reported and the others finish), --exclude-failed. The SLURM profile's plan
is in test_slurm_plan.py, its real cluster run in test_slurm.py.

One module fixture, one run folder, tests in order: each rerun costs a whole Snakemake pass, so every
test checks as much as its pass shows (the suite has a 5-minute budget)."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import pytest

from wsi_pipeline.cli import main

# The workflow chains every stage; it is tested once they are all part of the checkout.
pytest.importorskip("stages.train")
pytest.importorskip("stages.heatmap")

TINY_CONFIG = """
tiling:
  target_mpp: 2.0
  patch_size_px: 32
extract:
  encoder: resnet18
  checkpoint: random
  batch_size: 64
train:
  model: abmil
  folds: 2
  epochs: 2
  patience: 2
  bootstrap: 50
heatmap:
  exports: [png, geojson]
  top_k: 2
segment:
  model_args: {dims: [8, 16], depths: [1, 1]}
  work_mpp: 8.0
  mask_mpp: 8.0
  epochs: 2
  steps_per_epoch: 2
  batch_size: 2
  crop_px: 32
  window_px: 32
  min_lesion_area_um2: 0
  device: cpu
"""


# Tiny slides: the rules that take every core (extract, train, segment) would run one at a time while
# their jobs mostly start up; one thread each lets two run side by side. Snakemake words, after `--`.
ONE_THREAD_EACH = ["--set-threads", "extract=1", "train=1", "segment=1"]


def _with(args: list[str], *flags: str) -> list[str]:
    """`args` with wsi-pipeline flags added before the Snakemake words."""
    cut = args.index("--")
    return args[:cut] + list(flags) + args[cut:]


def _outputs(run: Path) -> dict[str, float]:
    """mtime of every stage output in the run folder (what a rerun must not touch)."""
    patterns = ["tiles/*.coords.h5", "features/*/*.h5", "mil/*/*/metrics.json", "heatmaps/*/*.done.json",
                "segment/*.done.json", "segment/metrics.csv", "segment/model/*", "report/index.html"]
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for pat in patterns for p in run.glob(pat)}


@pytest.fixture(scope="module")
def workflow_run(tmp_path_factory):
    from wsi_pipeline.demo.slides import make_demo_cohort

    root = tmp_path_factory.mktemp("workflow")
    manifest = make_demo_cohort(root / "cohort", 6, width_px=1024, height_px=768, mpp=0.5, seed=3)
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    run = root / "run"
    args = ["run", "--manifest", str(manifest), "--config", str(config), "--out", str(run), "--cores", "2",
            "--segment", "--", *ONE_THREAD_EACH]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(args)
    print(printed.getvalue())
    return {"root": root, "manifest": manifest, "config": config, "run": run, "args": args, "code": code,
            "printed": printed.getvalue()}


def test_full_run_produces_every_stage_output(workflow_run):
    run = workflow_run["run"]
    assert workflow_run["code"] == 0, (run / "logs").glob("**/*.log")
    slides = [r["slide_id"] for r in csv.DictReader(open(workflow_run["manifest"]))]
    for slide in slides:
        assert (run / "tiles" / f"{slide}.coords.h5").is_file()
        assert (run / "features" / "resnet18" / f"{slide}.h5").is_file()
        assert (run / "heatmaps" / "abmil" / f"{slide}.done.json").is_file()
    assert (run / "mil" / "abmil" / "demo" / "metrics.json").is_file()
    # Weak segmentation from the abmil CAMs: a mask per slide, one Dice row per slide with truth.
    for slide in slides:
        assert (run / "segment" / f"{slide}.tif").is_file() and (run / "segment" / f"{slide}.geojson").is_file()
    segment_rows = list(csv.DictReader(open(run / "segment" / "metrics.csv")))
    assert sorted(r["slide_id"] for r in segment_rows) == sorted(slides)
    assert "segment:" in workflow_run["printed"] and "CV AUC" in workflow_run["printed"]
    predictions = list(csv.DictReader(open(run / "mil" / "abmil" / "demo" / "predictions.csv")))
    assert sorted(r["slide_id"] for r in predictions) == sorted(slides)
    # Per-rule benchmarks are recorded.
    assert len(list((run / "benchmarks" / "extract").glob("*.tsv"))) == len(slides)


def test_second_run_does_nothing(workflow_run):
    run = workflow_run["run"]
    before = _outputs(run)
    assert main(workflow_run["args"]) == 0
    assert _outputs(run) == before


def test_report_and_viewer_in_a_browser(workflow_run):
    """The report the workflow's last rule wrote, and the slide viewer, in headless Chromium."""
    from .report_browser import check_report_and_viewer

    check_report_and_viewer(workflow_run)


def test_bad_slides_are_reported_and_the_others_finish(workflow_run, capsys):
    root, run = workflow_run["root"], workflow_run["run"]
    cohort = root / "cohort"
    (cohort / "slides" / "BAD-001.svs").write_bytes(b"II*\x00" + bytes(5000))  # a truncated TIFF
    bad_manifest = cohort / "manifest_bad.csv"
    rows = Path(workflow_run["manifest"]).read_text().rstrip("\n").splitlines()
    rows += ["BAD-001,slides/BAD-001.svs,P900,tumor,other", "MISS-001,slides/missing.svs,P901,normal,other"]
    bad_manifest.write_text("\n".join(rows) + "\n")
    # One good slide has lost its features too: it must still be redone despite the bad ones, and
    # only its chain: no other slide is tiled or extracted again.
    target = run / "features" / "resnet18" / "DEMO-000.h5"
    target.unlink()
    before = _outputs(run)

    args = list(workflow_run["args"])
    args[args.index("--manifest") + 1] = str(bad_manifest)
    assert main(args) != 0
    assert target.is_file()
    after = _outputs(run)
    changed = {k for k in after if after[k] != before.get(k)}
    assert not any(k.startswith("tiles/") for k in changed)
    assert [k for k in changed if k.startswith("features/")] == ["features/resnet18/DEMO-000.h5"]
    assert "mil/abmil/demo/metrics.json" in changed  # its cohort is trained again with the new features
    failures = {r["slide_id"]: r for r in csv.DictReader(open(run / "failures.csv"))}
    assert set(failures) == {"BAD-001", "MISS-001"}
    assert "cannot open" in failures["BAD-001"]["error"]
    assert "not found" in failures["MISS-001"]["error"]
    out = capsys.readouterr().out
    assert "BAD-001" in out and "MISS-001" in out
    assert "cohort 'other' was not trained: BAD-001, MISS-001 failed before training" in out

    # The user's choice to go on without them: cohort "other" is then empty and dropped, and no
    # slide is tiled, extracted or trained again. (Segmentation, which the failing run could not
    # reach, now catches up with DEMO-000's new features.)
    def finished(outputs):
        return {k: v for k, v in outputs.items() if k.split("/")[0] in ("tiles", "features", "mil")}

    before = _outputs(run)
    assert main(_with(args, "--exclude-failed")) == 0
    out = capsys.readouterr().out
    assert "left out (--exclude-failed): BAD-001, MISS-001" in out
    assert "cohort 'other' was not trained: every slide of it failed before training" in out
    assert "cohort 'demo' was not trained" not in out
    assert finished(_outputs(run)) == finished(before)


def test_exclude_failed_trains_a_cohort_without_its_failed_slide(workflow_run, capsys):
    root, run = workflow_run["root"], workflow_run["run"]
    cohort = root / "cohort"
    (cohort / "slides" / "BAD-002.svs").write_bytes(b"not a slide at all")
    manifest = cohort / "manifest_bad_in_demo.csv"
    rows = Path(workflow_run["manifest"]).read_text().rstrip("\n").splitlines()
    manifest.write_text("\n".join(rows + ["BAD-002,slides/BAD-002.svs,P902,tumor,demo"]) + "\n")
    args = list(workflow_run["args"])
    args[args.index("--manifest") + 1] = str(manifest)
    metrics = run / "mil" / "abmil" / "demo" / "metrics.json"
    trained = metrics.stat().st_mtime_ns

    # BAD-002 fails; the demo cohort cannot train with it and the run says so.
    assert main(args) != 0
    assert "cohort 'demo' was not trained: BAD-002 failed before training" in capsys.readouterr().out
    assert metrics.stat().st_mtime_ns == trained
    # Left out, the cohort's slides are those it was trained on: nothing to redo.
    assert main(_with(args, "--exclude-failed")) == 0
    assert metrics.stat().st_mtime_ns == trained
    assert "BAD-002" not in {r["slide_id"] for r in csv.DictReader(open(metrics.parent / "predictions.csv"))}

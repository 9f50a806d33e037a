"""Several slides per workflow job (cluster.slides_per_job, `run --slides-per-job`): the batch
record's place, the stage CLI's batch options, and the settings refused up front. The workflow
itself runs in batches in tests/volumes/test_volume_workflow.py and on SLURM in test_slurm.py."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from stages.batch_record import failed_in, record_path
from wsi_pipeline.cli import main
from wsi_pipeline.run.config import config_from_dict
from wsi_pipeline.errors import ConfigError, PipelineError


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:   # argparse's own refusals
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_a_record_lives_under_run_batches_only(tmp_path):
    assert record_path(tmp_path, "batches/tile/c-0000.json") == (tmp_path / "batches/tile/c-0000.json").resolve()
    for bad in ("tiles/x.json", "batches/../x.json", "/etc/passwd.json", "batches/tile/x.txt",
                str(tmp_path.parent / "batches" / "x.json")):
        with pytest.raises(PipelineError, match="must be a .json file under"):
            record_path(tmp_path, bad)


def test_upstream_failures_are_read_and_a_missing_or_broken_record_is_named(tmp_path):
    path = tmp_path / "batches" / "tile" / "c-0000.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"failed": {"A": "slide 'A': bad"}, "upstream_failed": ["B"], "done": ["C"]}))
    assert failed_in(tmp_path, "batches/tile/c-0000.json") == ["A", "B"]
    with pytest.raises(PipelineError, match="not found"):
        failed_in(tmp_path, "batches/tile/c-0001.json")
    path.write_text("{not json")
    with pytest.raises(PipelineError, match="unreadable"):
        failed_in(tmp_path, "batches/tile/c-0000.json")


def test_slides_per_job_must_be_a_positive_integer(tmp_path):
    assert config_from_dict({"cluster": {"slides_per_job": 25}}).cluster.slides_per_job == 25
    assert config_from_dict({}).cluster.slides_per_job == 1
    for bad in (0, -3, True):
        with pytest.raises(ConfigError, match="cluster.slides_per_job"):
            config_from_dict({"cluster": {"slides_per_job": bad}})
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,patient_id,label,cohort\nS,s.svs,P,a,c\n")
    code, _, err = _run(["run", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--slides-per-job", "0"])
    assert code == 2 and "--slides-per-job: must be an integer >= 1" in err
    assert not (tmp_path / "run").exists()


def test_a_stage_refuses_a_record_outside_the_run_before_writing_anything(tmp_path):
    from wsi_pipeline.demo import DemoSlideSpec, write_demo_slide

    write_demo_slide(tmp_path / "s.svs", DemoSlideSpec(width_px=1024, height_px=768, mpp=0.5, seed=10))
    config = tmp_path / "tiny.yaml"
    config.write_text("tiling: {target_mpp: 2.0, patch_size_px: 32}\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path,patient_id,label,cohort\nS,s.svs,P,a,c\n")
    run = tmp_path / "run"
    code, _, err = _run(["tile", "--manifest", str(manifest), "--out", str(run), "--slides", "S",
                         "--batch-record", str(tmp_path / "elsewhere.json"), "--no-progress"])
    assert code == 2 and "must be a .json file under" in err
    assert not run.exists()
    # Inside the run: the slide is tiled and the record says so; exit 0 even when a slide fails.
    (tmp_path / "bad.svs").write_bytes(b"II*\x00" + bytes(500))
    manifest.write_text("slide_id,path,patient_id,label,cohort\nS,s.svs,P,a,c\nB,bad.svs,Q,b,c\n")
    code, out, _ = _run(["tile", "--manifest", str(manifest), "--config", str(config), "--out", str(run), "--slides", "S,B",
                         "--batch-record", "batches/tile/c-0000.json", "--batch-token", "t1", "--no-progress"])
    record = json.loads((run / "batches" / "tile" / "c-0000.json").read_text())
    assert code == 0, out
    assert (record["done"], list(record["failed"]), record["token"]) == (["S"], ["B"], "t1")
    assert (run / "failures" / "tile" / "B.json").is_file() and (run / "tiles" / "S.coords.h5").is_file()

"""Temp files belong to their writer: a stage's start-up clean-up never deletes a live job's temp.

Under Snakemake two jobs of one stage run in one folder at once (and two runs can share a folder);
the one that starts second used to delete the other's in-flight temp (FileNotFoundError on rename,
slides failed). Each test here has another process hold a temp in a stage's folder (its rename held
back) while the stage starts, then lets it finish: both must finish. A dead writer's temp (the pid
of a finished process) must still be removed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wsi_pipeline.run.config import config_from_dict
from wsi_pipeline.run.folder import RunFolder
from wsi_pipeline.run.manifest import load_manifest

from .writers import REPO_ROOT, HeldWriter, child_env, dead_pid, leave_dead_temp, temp_name_of

TILE = {"tiling": {"target_mpp": 2.0, "patch_size_px": 64}}
DAY_S = 24 * 3600


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# --------------------------------------------------------------------------------------------
# io: names and the clean-up rule
# --------------------------------------------------------------------------------------------


def test_temp_names_carry_the_writer_and_keep_the_real_suffix(tmp_path):
    from wsi_pipeline.io import HOST_TAG, temp_path

    a, b = temp_path(tmp_path / "S1.coords.h5"), temp_path(tmp_path / "S1.coords.h5")
    assert re.fullmatch(rf"S1\.coords\.tmp-{HOST_TAG}-{os.getpid()}-[0-9a-f]{{8}}\.h5", a.name), a.name
    assert a != b and a.parent == tmp_path
    assert temp_path(tmp_path / "S1_topk").name.startswith(f"S1_topk.tmp-{HOST_TAG}-{os.getpid()}-")


def test_clean_up_removes_only_temps_whose_writer_is_provably_gone(tmp_path):
    from wsi_pipeline.io import remove_stale_temps, temp_path

    with HeldWriter(tmp_path / "live.h5") as live:
        own = temp_path(tmp_path / "mine.h5")
        own.write_bytes(b"this process is writing it")
        dead = leave_dead_temp(tmp_path / "dead.h5")
        dead_dir = leave_dead_temp(tmp_path / "S1_topk", directory=True)
        # Another machine's writer (shared file system) cannot be checked: kept unless a day old.
        remote_young = temp_name_of(tmp_path / "remote.h5", 4242, host_tag="0badc0de")
        remote_old = temp_name_of(tmp_path / "remote_old.h5", 4242, host_tag="0badc0de")
        # An older version's name has no writer in it: same rule.
        legacy_young, legacy_old = tmp_path / "old.coords.tmp-deadbeef.h5", tmp_path / "x.tmp-12345678.png"
        # Not a temp at all: an output whose slide id merely contains ".tmp-".
        output = tmp_path / "a.tmp-abcdef12-5-abcdef12.coords.h5"
        for p in (remote_young, remote_old, legacy_young, legacy_old, output):
            p.write_bytes(b"x")
        for p in (remote_old, legacy_old, output):
            _age(p, DAY_S + 3600)

        assert remove_stale_temps(tmp_path) == 4
        assert not dead.exists() and not dead_dir.exists() and not remote_old.exists() and not legacy_old.exists()
        for kept in (live.tmp, own, remote_young, legacy_young, output):
            assert kept.exists(), kept.name
        live.assert_finished()


def test_writer_of_a_stale_temp_in_a_killed_process_is_gone(tmp_path):
    """A real kill -9 of a writer holding its temp: the next clean-up removes the temp."""
    from wsi_pipeline.io import remove_stale_temps

    with HeldWriter(tmp_path / "S1.coords.h5") as writer:
        writer.proc.kill()
        writer.proc.wait()
        assert writer.tmp.exists()
        assert remove_stale_temps(tmp_path) == 1
        assert not writer.tmp.exists() and not writer.final.exists()


# --------------------------------------------------------------------------------------------
# Per stage
# --------------------------------------------------------------------------------------------

# Tile job A: the real stage, its first rename held back (a slow disk) until the test says go.
_SLOW_TILE_JOB = """
import json, os, sys, time
from pathlib import Path
from stages.tile import run_tile
from wsi_pipeline.run.config import config_from_dict
from wsi_pipeline.run.manifest import load_manifest

manifest, run_dir, slide, holding, release = sys.argv[1:]
real_replace = os.replace

def slow_replace(src, dst):
    if ".tmp-" in os.fspath(src) and not os.path.exists(holding):
        Path(holding).write_text(os.fspath(src))
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_replace(src, dst)

os.replace = slow_replace
cfg = config_from_dict(json.loads(os.environ["TILE_CONFIG"]))
report = run_tile(load_manifest(manifest).select([slide]), cfg, run_dir, progress=False)
print(json.dumps(report.failed))
sys.exit(1 if report.failed else 0)
"""


def test_two_tile_jobs_in_one_folder_both_finish(demo_cohort, tmp_path):
    """make_demo's failure: job B starts (and cleans tiles/) while job A is renaming its QC PNG."""
    import json

    from stages.tile import run_tile

    manifest = load_manifest(demo_cohort)
    slide_a, slide_b = manifest.records[0].slide_id, manifest.records[1].slide_id
    run = tmp_path / "run"
    holding, release = tmp_path / "holding", tmp_path / "release"
    job_a = subprocess.Popen([sys.executable, "-c", _SLOW_TILE_JOB, str(demo_cohort), str(run), slide_a,
                              str(holding), str(release)], cwd=REPO_ROOT,
                             env={**child_env(), "TILE_CONFIG": json.dumps(TILE)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not holding.exists():
            assert job_a.poll() is None, job_a.communicate()
            time.sleep(0.01)
        held_temp = Path(holding.read_text())
        assert held_temp.exists() and held_temp.parent == run / "tiles"

        report_b = run_tile(manifest.select([slide_b]), config_from_dict(TILE), run, progress=False)
        assert report_b.done == [slide_b] and not report_b.failed
        assert held_temp.exists(), "job B's start-up deleted job A's in-flight temp"
    finally:
        release.touch()
        out, err = job_a.communicate(timeout=120)
    assert job_a.returncode == 0, f"job A failed: {out}\n{err}"
    tiles = RunFolder(run)
    for sid in (slide_a, slide_b):
        assert tiles.coords_h5(sid).is_file() and tiles.qc_png(sid).is_file()
    assert not list((run / "tiles").glob("*.tmp-*"))


def test_extract_start_up_spares_a_live_writer_and_removes_a_dead_ones(demo_cohort, tmp_path):
    from stages.extract import run_extract
    from stages.tile import run_tile

    manifest = load_manifest(demo_cohort).select([load_manifest(demo_cohort).records[2].slide_id])
    cfg = config_from_dict({**TILE, "extract": {"encoder": "stain_texture", "batch_size": 64, "num_workers": 0}})
    run = tmp_path / "run"
    assert not run_tile(manifest, cfg, run, progress=False).failed
    folder = RunFolder(run).features_dir("stain_texture")
    with HeldWriter(folder / "OTHER-JOB.h5") as other:
        dead = leave_dead_temp(folder / "KILLED.h5")
        report = run_extract(manifest, cfg, run, progress=False)
        assert not report.failed and len(report.done) == 1
        assert other.tmp.exists() and not dead.exists()
        other.assert_finished()


def test_train_start_up_spares_live_writers_in_the_cohort_and_fold_folders(tmp_path):
    from stages.train import run_train
    from tests.training.conftest import make_cohort, small_config

    run_dir, manifest_path = make_cohort(tmp_path, n_patients=6)
    model_dir = RunFolder(run_dir).mil_dir("abmil", "c1")
    with HeldWriter(model_dir / "other-run.json") as in_cohort, \
            HeldWriter(model_dir / "fold_0" / "model.safetensors") as in_fold:
        dead = [leave_dead_temp(model_dir / "predictions.csv"), leave_dead_temp(model_dir / "fold_1" / "model.safetensors")]
        result = run_train(load_manifest(manifest_path), small_config(folds=2, epochs=2), run_dir, progress=False)
        assert result["c1"]["status"] == "done" and result["c1"]["folds_trained"] == [0, 1]
        assert in_cohort.tmp.exists() and in_fold.tmp.exists()
        assert not any(p.exists() for p in dead)
        in_cohort.assert_finished()
        code, err = in_fold.finish()  # renames onto the fold's weights: a real clash, but no lost temp
        assert code == 0, err


def test_segment_start_up_spares_live_writers_in_cams_and_model(demo_cohort, tmp_path):
    from stages.segment import run_segment

    run = tmp_path / "run"
    paths = RunFolder(run)
    manifest = load_manifest(demo_cohort)
    with HeldWriter(paths.segment_cams_dir / "OTHER.npz") as cams, \
            HeldWriter(paths.segment_model_dir / "other.json") as model:
        dead = [leave_dead_temp(paths.segment_cams(manifest.records[0].slide_id)),
                leave_dead_temp(paths.segment_model_dir / "model.safetensors")]
        result = run_segment(manifest, config_from_dict({}), run, progress=False)
        # No CAMs and no ensemble here: every slide fails with its own line, after the start-up.
        assert set(result.failed) == {r.slide_id for r in manifest}
        assert cams.tmp.exists() and model.tmp.exists()
        assert not any(p.exists() for p in dead)
        cams.assert_finished()
        model.assert_finished()


def _per_slide_outputs(folder: Path, sid: str) -> list[Path]:
    return [folder / f"{sid}.png", folder / f"{sid}.tif", folder / f"{sid}.geojson", folder / f"{sid}.done.json"]


def test_heatmap_per_slide_clean_up_is_exact_and_spares_live_writers(tmp_path):
    """Slide X's clean-up removes X's dead temps only: not slide X.done's (whose `X.done.tmp-*`
    names the old glob matched), and not a live job's temp of X itself."""
    from stages.heatmap import HeatmapRunner

    run = RunFolder(tmp_path / "run")
    runner = HeatmapRunner(config_from_dict({}), run, "abmil", None)
    folder = runner.out_dir
    mine = [leave_dead_temp(p) for p in _per_slide_outputs(folder, "X")]
    mine.append(leave_dead_temp(folder / "X_topk", directory=True))
    neighbour = [leave_dead_temp(p) for p in _per_slide_outputs(folder, "X.done")]
    neighbour.append(leave_dead_temp(folder / "X.done_topk", directory=True))
    neighbour.append(leave_dead_temp(folder / "X2.png"))
    with HeldWriter(folder / "X.tif") as live:
        runner.remove_stale_temps("X")
        assert not any(p.exists() for p in mine)
        assert all(p.exists() for p in neighbour), [p.name for p in neighbour if not p.exists()]
        assert live.tmp.exists()
        live.assert_finished()


def test_segment_per_slide_clean_up_is_exact_and_spares_live_writers(tmp_path):
    from stages.segment import remove_slide_temps

    run = RunFolder(tmp_path / "run")
    mine = [leave_dead_temp(p) for p in (run.segment_tif("X"), run.segment_geojson("X"), run.segment_done("X"))]
    neighbour = [leave_dead_temp(p) for p in (run.segment_tif("X.done"), run.segment_geojson("X.done"),
                                              run.segment_done("X.done"))]
    with HeldWriter(run.segment_geojson("X")) as live:
        remove_slide_temps(run, "X")
        assert not any(p.exists() for p in mine)
        assert all(p.exists() for p in neighbour)
        assert live.tmp.exists()
        live.assert_finished()


def test_topk_folder_is_written_under_a_writer_owned_temp(tmp_path, monkeypatch):
    """The top-k export's temp folder carries its writer, so a concurrent clean-up spares it."""
    import numpy as np

    from wsi_pipeline.exports import topk
    from wsi_pipeline.io import remove_stale_temps

    class Slide:
        level_downsamples = (1.0,)

        def read_region(self, xy, level, size):
            return np.zeros((size[1], size[0], 3), np.uint8)

    seen = []
    real_replace = os.replace

    def replace_after_a_clean_up(src, dst):  # another job starts right before our rename
        seen.append(Path(src).name)
        remove_stale_temps(tmp_path)
        return real_replace(src, dst)

    monkeypatch.setattr(topk.os, "replace", replace_after_a_clean_up)
    rows = topk.write_topk(tmp_path / "S1_topk", Slide(), np.array([[0, 0], [64, 0]]), 64.0,
                           np.array([0.2, 0.9]), np.array([0.0, 1.0]), k=1, patch_size_px=8)
    assert len(rows) == 2 and (tmp_path / "S1_topk" / "index.csv").is_file()
    assert seen and all(name.startswith("S1_topk.tmp-") for name in seen)

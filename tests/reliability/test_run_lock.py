"""One `wsi-pipeline run` per run folder: RUN/.wsi-pipeline.lock names its holder, a second run exits
1 naming it, a killed run's lock (and Snakemake's lock it left) is taken over with a warning.

Snakemake itself is replaced by a stand-in (`subprocess.call`), which records what it finds."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import stages.run as run_stage
from wsi_pipeline.cli import main
from wsi_pipeline.run.lock import LOCK_NAME, RunLockHeld, acquire

from .writers import REPO_ROOT, child_env, dead_pid

# Another `wsi-pipeline run`: takes RUN's lock, says so, holds it until told (or killed).
_HOLDER = """
import sys
from wsi_pipeline.run.lock import acquire
lock = acquire(sys.argv[1], "wsi-pipeline run --out " + sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], cwd=REPO_ROOT, env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def snakemake(monkeypatch):
    """Stand-in for Snakemake: records the lock and Snakemake locks it sees, returns `code`."""
    seen = {"calls": 0, "code": 0}

    def call(cmd, env=None):
        run = Path(cmd[cmd.index("--directory") + 1])
        seen["calls"] += 1
        seen["lock"] = json.loads((run / LOCK_NAME).read_text())
        seen["snakemake_locks"] = sorted(p.name for p in (run / ".snakemake" / "locks").glob("*"))
        if "raise" in seen:
            raise seen["raise"]
        return seen["code"]

    monkeypatch.setattr(run_stage.subprocess, "call", call)
    return seen


def _run_args(manifest, run, *extra):
    return ["run", "--manifest", str(manifest), "--out", str(run), "--cores", "1", *extra]


def test_lock_is_held_for_the_run_and_removed_at_the_end(demo_cohort, tmp_path, snakemake):
    run = tmp_path / "run"
    assert main(_run_args(demo_cohort, run)) == 0
    lock = snakemake["lock"]
    assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    assert lock["started"] and lock["command"].startswith("wsi-pipeline")
    assert not (run / LOCK_NAME).exists()


def test_second_run_on_a_folder_in_use_exits_1_naming_the_holder(demo_cohort, tmp_path, snakemake, capsys):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        assert main(_run_args(demo_cohort, run)) == 1
        err = capsys.readouterr().err
        record = json.loads((run / LOCK_NAME).read_text())
        for part in (f"pid {holder.pid}", f"host {socket.gethostname()}", record["started"], record["command"]):
            assert part in err, (part, err)
        assert snakemake["calls"] == 0, "the second run started Snakemake"
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid  # not stolen
        # A dry run needs no lock.
        assert main(_run_args(demo_cohort, run, "--dry-run")) == 0 and snakemake["calls"] == 1
    finally:
        holder.communicate("done\n", timeout=60)
    assert not (run / LOCK_NAME).exists()


def test_a_killed_runs_locks_are_taken_over_with_a_warning(demo_cohort, tmp_path, snakemake, caplog):
    """kill -9 of a run: its lock and Snakemake's lock stay behind; the next run warns, takes both over."""
    run = tmp_path / "run"
    holder = _holder(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    locks = run / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text(f"{run}/tiles/A.coords.h5\n")
    (locks / "0.output.lock").write_text(f"{run}/features/x/A.h5\n")
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        assert main(_run_args(demo_cohort, run)) == 0
    assert snakemake["lock"]["pid"] == os.getpid() and snakemake["snakemake_locks"] == []
    warnings = caplog.text
    assert f"pid {holder.pid}" in warnings and "no longer running" in warnings
    assert "removed Snakemake's lock" in warnings
    assert not (run / LOCK_NAME).exists()


def test_a_lock_written_by_a_dead_pid_is_taken_over(tmp_path):
    from wsi_pipeline.io import HOST_TAG

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(),
                                                  "host_tag": HOST_TAG, "started": "x", "command": "y"}))
    lock = acquire(tmp_path, "me")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "me"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_snakemake_in_the_folder_keeps_its_lock(demo_cohort, tmp_path, snakemake, capsys):
    """The wrapper was killed but its Snakemake still runs: never clear the lock under it."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc")
    run = tmp_path / "run"
    locks = run / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text("x\n")
    orphan = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()", "snakemake",
                               "--directory", str(run)], stdin=subprocess.PIPE, text=True)
    try:
        assert main(_run_args(demo_cohort, run)) == 1
        assert f"pid {orphan.pid}" in capsys.readouterr().err
        assert (locks / "0.output.lock").exists() and snakemake["calls"] == 0
        assert not (run / LOCK_NAME).exists()  # ours is released again
    finally:
        orphan.communicate("\n", timeout=60)


def test_a_lock_from_another_machine_is_never_taken_over(demo_cohort, tmp_path, snakemake, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "node7", "host_tag": "0badc0de",
                                             "started": "2026-01-01T00:00:00", "command": "wsi-pipeline run"}))
    assert main(_run_args(demo_cohort, run)) == 1
    err = capsys.readouterr().err
    assert "host node7" in err and f"delete {run / LOCK_NAME}" in err
    assert (run / LOCK_NAME).exists() and snakemake["calls"] == 0


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl-c", "error"])
def test_lock_is_released_on_ctrl_c_and_errors(demo_cohort, tmp_path, snakemake, failure):
    run = tmp_path / "run"
    snakemake["raise"] = failure
    with pytest.raises(type(failure)):
        main(_run_args(demo_cohort, run))
    assert snakemake["calls"] == 1 and not (run / LOCK_NAME).exists()


def test_a_bad_manifest_is_exit_2_and_leaves_no_folder(tmp_path, snakemake):
    run = tmp_path / "run"
    assert main(_run_args(tmp_path / "missing.csv", run)) == 2
    assert not run.exists() and snakemake["calls"] == 0


# Several runs start at once on a folder whose lock a killed run left: exactly one may win.
_RACER = """
import sys, time
from pathlib import Path
from wsi_pipeline.run.lock import RunLockHeld, acquire
run, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
try:
    lock = acquire(run, "racer")
except RunLockHeld:
    print("held", flush=True)
    sys.exit(0)
print("won", flush=True)
sys.stdin.readline()
lock.release()
"""


def test_runs_racing_for_a_stale_lock_take_it_one_at_a_time(tmp_path):
    from wsi_pipeline.io import HOST_TAG

    run, go = tmp_path / "run", tmp_path / "go"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host_tag": HOST_TAG, "command": "killed"}))
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(run), str(go)], cwd=REPO_ROOT,
                               env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    go.touch()
    answers = [r.stdout.readline().strip() for r in racers]
    for r in racers:
        r.communicate("\n", timeout=60)
    assert sorted(answers) == ["held", "held", "held", "won"], answers
    assert not (run / LOCK_NAME).exists()
    with pytest.raises(RunLockHeld):  # and a live holder is never taken over
        with_holder = _holder(run)
        try:
            acquire(run, "me")
        finally:
            with_holder.communicate("\n", timeout=60)

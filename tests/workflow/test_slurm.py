"""`wsi-pipeline run --profile slurm` on a real one-node SLURM cluster (no accounting, no slurmdbd):
two tiny slides tiled and encoded by SLURM jobs (tile on the `cpu` partition, extract on `gpu`)
while a third, corrupt slide's job fails inside SLURM and is reported. One run, so that the failing
job's retries overlap the others' chain (each level costs >= ~12 s of the plugin's polling).
The cluster (tests/workflow/slurm_cluster.py) needs Debian's slurmctld, slurmd, slurm-client and
munge (`make slurm-deps`, which `make test` runs) and root; where they are missing the test is
skipped with the reason, or fails under WSI_PIPELINE_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tests.workflow import slurm_cluster
from tests.workflow.test_workflow import TINY_CONFIG

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 480  # about 40 s on an idle 2-core machine; bounded for a loaded one


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    def unavailable(reason):
        if os.environ.get("WSI_PIPELINE_REQUIRE_SLURM") == "1":
            pytest.fail(f"WSI_PIPELINE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)

    reason = slurm_cluster.why_not_here()
    if reason:
        unavailable(reason)
    one = slurm_cluster.OneNodeCluster(tmp_path_factory.mktemp("slurm"))
    try:
        one.start()  # stops what it started if it fails
    except slurm_cluster.ClusterUnavailable as exc:
        unavailable(str(exc))
    try:
        yield one
    finally:
        one.stop()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two 1024×768 px slides and a truncated TIFF (BAD), each its own patient; the config is the
    workflow test's tiny one."""
    from wsi_pipeline.demo.slides import DemoSlideSpec, write_demo_slide

    root = tmp_path_factory.mktemp("slurm_cohort")
    (root / "slides").mkdir()
    rows = ["slide_id,path,patient_id,label,cohort"]
    for i in range(2):
        write_demo_slide(root / "slides" / f"S{i}.svs",
                         DemoSlideSpec(width_px=1024, height_px=768, mpp=0.5, positive=i == 1, seed=10 + i))
        rows.append(f"S{i},slides/S{i}.svs,P{i},{'tumor' if i == 1 else 'normal'},demo")
    (root / "slides" / "BAD.svs").write_bytes(b"II*\x00" + bytes(5000))
    rows.append("BAD,slides/BAD.svs,P9,tumor,demo")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    return root


def run_pipeline(manifest: Path, config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`wsi-pipeline run --profile slurm --no-train` as a user types it (three slides are too few to
    cross-validate); the SLURM jobs run this checkout's code.

    The one override: the first status check after 6 s instead of the profile's 40 (the cluster's
    MinJobAge is 300, so squeue stays the status command). Not 1 s: a check that finds no job done
    adds 10 s to the next wait, so checking before a ~5 s job can finish cost ~12 s per job
    (the test ran 146 s with 1, 120 s with 6). Bounded: on timeout the run's process
    group gets SIGTERM, then SIGKILL (Snakemake's graceful exit can wait on a job for ever)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", "run", "--manifest", str(manifest), "--config", str(config),
           "--out", str(out), "--profile", "slurm", "--no-train", *extra,
           "--", "--slurm-init-seconds-before-status-checks", "6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"wsi-pipeline run --profile slurm did not finish in {RUN_TIMEOUT_S} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def submitted_rules(output: str) -> list[str]:
    """The rule of every job Snakemake handed to sbatch (the plugin drops a successful job's own log)."""
    return re.findall(r"submitted with SLURM jobid \d+ \(log: \S+/slurm_logs/rule_(\w+)/", output)


def test_slurm_profile_runs_slides_and_reports_a_failed_job(cluster, cohort, tmp_path):
    run = tmp_path / "run"
    result = run_pipeline(cohort / "manifest.csv", cohort / "tiny.yaml", run)
    out = result.stdout
    logs = "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(run.glob("logs/snakemake/*/*.log")))
    # Exit 1: some slides failed (README), not a crash of the run or a lost job.
    assert result.returncode == 1, f"{out[-5000:]}\n{logs}\n{cluster.log('slurmctld.log')}"
    # Every job went through sbatch, none ran on the submitting machine: the good slides' tile and
    # extract jobs, and BAD's tile job, submitted again for each of the profile's 2 retries.
    assert sorted(submitted_rules(out)) == ["extract"] * 2 + ["tile"] * 5, out[-5000:]
    # ...and SLURM ran them where the profile put them (finished jobs stay listed for MinJobAge).
    listed = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%P %k %T"], capture_output=True,
                            text=True, timeout=30).stdout.split("\n")
    assert sorted(line.split() for line in listed if line.strip()) == sorted(
        [["gpu", f"rule_extract_wildcards_S{i}", "COMPLETED"] for i in range(2)]
        + [["cpu", f"rule_tile_wildcards_S{i}", "COMPLETED"] for i in range(2)]
        + [["cpu", "rule_tile_wildcards_BAD", "FAILED"]] * 3), listed
    for slide in ("S0", "S1"):
        assert (run / "tiles" / f"{slide}.coords.h5").is_file()
        with h5py.File(run / "features" / "resnet18" / f"{slide}.h5", "r") as f:
            assert f["features"].shape[0] == f["coords"].shape[0] > 0
    assert not (run / "tiles" / "BAD.coords.h5").exists()
    # The failed job's report: Snakemake's, the run's summary, and failures.csv.
    assert "Error in rule tile" in out and "BAD" in out
    failures = list(csv.DictReader(open(run / "failures.csv")))
    assert [(r["slide_id"], r["stage"]) for r in failures] == [("BAD", "tile")], failures
    assert "cannot open" in failures[0]["error"]
    assert f"[tile] {failures[0]['error']}" in out


def test_slides_per_job_puts_a_cohorts_slides_in_one_cluster_job_each_stage(cluster, cohort, tmp_path):
    """`--slides-per-job 3` (cluster.slides_per_job): the three slides' tiling is one SLURM job and
    their extraction another, BAD's failure is recorded inside the tile job (which succeeds, so the
    good slides go on in the same run), and the run still exits 1 and names it."""
    run = tmp_path / "run"
    result = run_pipeline(cohort / "manifest.csv", cohort / "tiny.yaml", run, "--slides-per-job", "3",
                          "--no-report")
    out = result.stdout
    assert result.returncode == 1, f"{out[-5000:]}\n{cluster.log('slurmctld.log')}"
    assert sorted(submitted_rules(out)) == ["extract", "tile"], out[-5000:]
    listed = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%P %k %T"], capture_output=True,
                            text=True, timeout=30).stdout.split("\n")
    grouped = sorted(line.split() for line in listed if "demo-0000" in line)
    assert grouped == [["cpu", "rule_tile_wildcards_demo-0000", "COMPLETED"],
                       ["gpu", "rule_extract_wildcards_demo-0000", "COMPLETED"]], listed
    assert len(grouped) < 3   # fewer cluster jobs than slides
    for slide in ("S0", "S1"):
        with h5py.File(run / "features" / "resnet18" / f"{slide}.h5", "r") as f:
            assert f["features"].shape[0] == f["coords"].shape[0] > 0
    failures = list(csv.DictReader(open(run / "failures.csv")))
    assert [(r["slide_id"], r["stage"]) for r in failures] == [("BAD", "tile")], failures
    assert f"[tile] {failures[0]['error']}" in out


def test_a_missing_program_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setattr(slurm_cluster, "PROGRAMS", (*slurm_cluster.PROGRAMS, "no-such-slurm-tool"))
    reason = slurm_cluster.why_not_here()
    assert "no-such-slurm-tool" in reason and "make slurm-deps" in reason


@pytest.mark.skipif(os.geteuid() != 0 or slurm_cluster.missing_programs() != [],
                    reason="needs root and the SLURM programs (make slurm-deps)")
def test_another_clusters_config_is_left_alone_and_a_stale_test_link_is_cleared(monkeypatch, tmp_path):
    system_conf = tmp_path / "etc" / "slurm.conf"
    system_conf.parent.mkdir()
    monkeypatch.setattr(slurm_cluster, "SYSTEM_CONF", system_conf)
    monkeypatch.setattr(slurm_cluster, "port_in_use", lambda port: False)
    system_conf.write_text("ClusterName=theirs\n")
    assert "another SLURM cluster" in slurm_cluster.why_not_here()
    assert system_conf.read_text() == "ClusterName=theirs\n"
    # A link into a temporary folder that no longer exists: a test killed before its teardown.
    system_conf.unlink()
    system_conf.symlink_to(tmp_path / "gone" / "slurm.conf")
    assert slurm_cluster.why_not_here() is None and not system_conf.is_symlink()
    # A dangling link elsewhere is not ours to remove.
    system_conf.symlink_to("/opt/site/slurm.conf")
    assert "another SLURM cluster" in slurm_cluster.why_not_here() and system_conf.is_symlink()

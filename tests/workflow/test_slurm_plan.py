"""The SLURM profile's plan (a dry run, no cluster): GPU jobs on the `gpu` partition. Its own small
cohort, so that it runs beside the workflow test instead of after it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.workflow.test_workflow import TINY_CONFIG


def test_slurm_profile_dry_run_plans_gpu_jobs(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from wsi_pipeline.demo.slides import make_demo_cohort

    manifest = make_demo_cohort(tmp_path / "cohort", 4, width_px=512, height_px=384, mpp=0.5, seed=3)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", "run", "--manifest", str(manifest),
           "--config", str(config), "--out", str(tmp_path / "run"), "--profile", "slurm", "--dry-run"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout + result.stderr
    assert "slurm_partition=gpu" in text and "rule extract" in text
    assert "Job stats" in text

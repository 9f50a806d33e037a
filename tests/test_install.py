"""A regular (non-editable) wheel install runs the workflow: the Snakefile, rules, profiles and
schemas travel as package data and `wsi-pipeline run` finds them without the checkout.

The wheel is built offline from this checkout and installed with --no-deps into a folder of its own;
the test runs from a temporary working directory with only that folder on PYTHONPATH (the existing
environment supplies the dependencies), and checks that the code that ran is the installed copy."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(build / "dist"), str(REPO)], check=True, env=env, cwd=build,
                   capture_output=True, timeout=300)
    wheel = next((build / "dist").glob("wsi_pipeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("wsi_pipeline/workflow/Snakefile", "wsi_pipeline/workflow/rules/tile.smk",
                    "wsi_pipeline/workflow/profiles/local/config.yaml",
                    "wsi_pipeline/workflow/schemas/workflow.schema.yaml", "wsi_pipeline/manifests/schema.json",
                    "stages/base.py", "stages/run.py", "wsi_pipeline/workflow/rules/report.smk",
                    "wsi_pipeline/viewer/static/viewer.html", "wsi_pipeline/viewer/static/viewer.js",
                    "wsi_pipeline/viewer/static/openseadragon/openseadragon.min.js",
                    "wsi_pipeline/viewer/static/openseadragon/LICENSE.txt"):
        assert shipped in names, shipped
    target = build / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, env=env, cwd=build, capture_output=True, timeout=300)
    return target


def test_wheel_install_runs_the_workflow_dry_run(installed, make_slide, tmp_path):
    slide, other = make_slide("install_slide"), make_slide("install_slide_2", seed=1)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_id,path,patient_id,label,cohort\n"
                        f"S1,{slide},P1,tumor,c1\nS2,{other},P2,normal,c1\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(installed))
    where = subprocess.run([sys.executable, "-c", "import stages.run, wsi_pipeline; "
                            "print(stages.run.SNAKEFILE); print(wsi_pipeline.__file__)"],
                           cwd=cwd, env=env, capture_output=True, text=True, check=True)
    snakefile, package = where.stdout.split()
    # The installed copy, not the checkout: the workflow is the package data.
    assert Path(snakefile) == installed / "wsi_pipeline" / "workflow" / "Snakefile"
    assert Path(package).is_relative_to(installed)

    proc = subprocess.run([str(installed / "bin" / "wsi-pipeline"), "run", "--manifest", str(manifest),
                           "--out", str(tmp_path / "run"), "--no-train", "--dry-run"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert str(installed / "wsi_pipeline" / "workflow" / "Snakefile") in out
    for rule in ("tile", "extract"):
        assert rule in out

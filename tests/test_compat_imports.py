"""Import paths users' scripts use keep working after the layout of issue 28.

The imports run in a fresh interpreter, so a path that works only because another test imported the
new module first still fails here. The old top-level modules (config, manifest, tissue) are the
new modules under a second name, so monkeypatching either patches both.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (statement, what it must leave defined)
OLD_PATHS = [
    ("from wsi_pipeline import create_encoder, create_aggregator, open_slide", "create_encoder, create_aggregator, open_slide"),
    ("from wsi_pipeline.encoders import create_encoder, list_encoders", "create_encoder, list_encoders"),
    ("from wsi_pipeline.models.mil import create_aggregator", "create_aggregator"),
    ("from wsi_pipeline.slides import open_slide", "open_slide"),
    ("from wsi_pipeline.ssm import selective_scan", "selective_scan"),
    ("from wsi_pipeline import tissue", "tissue.detect_tissue"),
    ("from wsi_pipeline.tiling import plan_geometry, tile_tissue", "plan_geometry, tile_tissue"),
    ("from wsi_pipeline.config import load_config, config_from_dict", "load_config, config_from_dict"),
    ("from wsi_pipeline.manifest import load_manifest", "load_manifest"),
    ("from wsi_pipeline.demo import make_demo_cohort, DemoSlideSpec, write_demo_slide",
     "make_demo_cohort, DemoSlideSpec, write_demo_slide"),
    ("from wsi_pipeline.volumes import open_volume, volume_instances, encode_instances, VolumeInstanceParams",
     "open_volume, volume_instances, encode_instances, VolumeInstanceParams"),
    ("from stages import get_stage", "get_stage('tile')"),
]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_old_public_import_paths_still_work():
    # One fresh interpreter for all of them (each in its own namespace): one torch import, not ten.
    code = ("import traceback\nfailed = []\n"
            f"for statement, names in {OLD_PATHS!r}:\n"
            "    try:\n        exec(statement + '\\n' + names, {})\n"
            "    except Exception:\n        failed.append(statement + '\\n' + traceback.format_exc())\n"
            "print('\\n'.join(failed))\nraise SystemExit(1 if failed else 0)\n")
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_moved_modules_are_one_module_under_both_names():
    result = _run("import wsi_pipeline.config as a, wsi_pipeline.run.config as b\n"
                  "import wsi_pipeline.manifest as c, wsi_pipeline.run.manifest as d\n"
                  "from wsi_pipeline import tissue\nimport wsi_pipeline.tiling.tissue as t\n"
                  "assert a is b and c is d and tissue is t\n")
    assert result.returncode == 0, result.stderr


def test_root_package_import_stays_light():
    """`import wsi_pipeline` (and the lazy names it offers) loads no torch until a name is used."""
    result = _run("import sys, wsi_pipeline\nassert 'torch' not in sys.modules\n"
                  "wsi_pipeline.open_slide\nassert 'torch' not in sys.modules\n")
    assert result.returncode == 0, result.stderr


def test_unknown_root_attribute_is_an_attribute_error():
    import wsi_pipeline

    with pytest.raises(AttributeError):
        wsi_pipeline.no_such_name  # noqa: B018

"""`wsi-pipeline demo-volumes OUT`: a synthetic CT cohort generated, then run through the workflow.

Here, not in wsi_pipeline/volumes/, because it drives `wsi-pipeline run` (stages/run.py): the
library never imports the stages (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from wsi_pipeline.demo.volumes import write_demo_volumes
from wsi_pipeline.io import write_text_atomic
from wsi_pipeline.run.config import Config
from wsi_pipeline.volumes.cohort import DEMO_MODEL, demo_config

from . import run as workflow


def run_volume_demo(out: str | Path, n_patients: int = 40, epochs: int = 20, model: str = DEMO_MODEL,
                    seed: int = 0, generate_only: bool = False, cores: int | None = None,
                    hard: bool = False) -> tuple[dict | None, int] | Path:
    """Generate the cohort (`hard`: the hard one, wsi_pipeline/demo/volumes.py) under `out`, write its config
    (out/volumes_demo.yaml) and run it through the workflow (`wsi-pipeline run`) into out/run;
    returns (volumes summary, run exit code)."""
    out = Path(out)
    manifest_path = write_demo_volumes(out, n_patients=n_patients, seed=seed, hard=hard)
    if generate_only:
        return manifest_path
    config_path = out / "volumes_demo.yaml"
    cfg = demo_config(epochs=epochs, model=model, seed=seed)
    write_text_atomic(config_path, "# wsi-pipeline demo-volumes: the settings of this run\n"
                      + yaml.safe_dump(_changed_sections(cfg), sort_keys=False))
    args = argparse.Namespace(manifest=str(manifest_path), config=str(config_path), out=str(out / "run"),
                              profile="local", model=None, cores=str(cores) if cores else None, gpu=False,
                              no_train=False, no_heatmaps=False, segment=False, detect=False,
                              exclude_failed=False, dry_run=False, snakemake_args=[])
    code = workflow.cli(args)
    summary_path = out / "run" / "volumes_summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    return summary, code


def _changed_sections(cfg: Config) -> dict:
    """The config sections the demo sets (extract, train, volumes) as plain YAML data."""
    full = cfg.to_dict()
    return {name: full[name] for name in ("extract", "train", "volumes")}

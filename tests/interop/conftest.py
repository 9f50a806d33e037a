"""A tiny real run for the export tests: two demo slides of the same tissue size, one scanned at
0.25 µm/px and one at 0.5 µm/px, tiled (224 px at 0.5 µm/px: a 112 µm patch) and extracted with the
parameter-free `stain_texture` encoder; and a second run at 1.0 µm/px (112 px, 112 µm again) whose
0.25 µm/px slide is read from pyramid level 1, so CLAM's patch_level is not always 0."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest

ENCODER = "stain_texture"
FOOTPRINT_UM = 112.0
SLIDES = {  # slide_id: (µm/px, width px, height px); the same 512 × 384 µm of tissue
    "S025": (0.25, 2048, 1536),
    "S050": (0.5, 1024, 768),
}


@dataclass(frozen=True)
class TinyRun:
    manifest: Path
    config: Path
    run: Path
    slide_paths: dict


def _config(folder: Path, target_mpp: float, patch_size_px: int) -> Path:
    path = folder / f"config_{target_mpp}.yaml"
    path.write_text(f"tiling:\n  target_mpp: {target_mpp}\n  patch_size_px: {patch_size_px}\n"
                    f"extract:\n  encoder: {ENCODER}\n  checkpoint: none\n  num_workers: 0\n")
    return path


def write_manifest(path: Path, rows: list[list], header=("slide_id", "path", "patient_id", "label", "cohort")) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _tiny_run(folder: Path, slide_paths: dict, target_mpp: float, patch_size_px: int, slide_ids) -> TinyRun:
    from stages.extract import EXTRACT
    from stages.tile import TILE
    from wsi_pipeline.run.config import load_config
    from wsi_pipeline.run.manifest import load_manifest

    # `wsi` beside `path` and a clinical column: both kept as extra columns and carried to exports.
    rows = [[sid, slide_paths[sid], f"P{i}", "tumor" if i == 0 else "normal", "demo",
             slide_paths[sid].name, "mut" if i == 0 else "wt"] for i, sid in enumerate(slide_ids)]
    manifest = write_manifest(folder / "manifest.csv", rows,
                              ("slide_id", "path", "patient_id", "label", "cohort", "wsi", "KRAS"))
    config = _config(folder, target_mpp, patch_size_px)
    cfg, m = load_config(config), load_manifest(manifest)
    run = folder / "run"
    assert TILE.run(m, cfg, run, progress=False).ok
    assert EXTRACT.run(m, cfg, run, progress=False).ok
    return TinyRun(manifest, config, run, slide_paths)


@pytest.fixture(scope="session")
def interop_slides(tmp_path_factory):
    from wsi_pipeline.demo.slides import DemoSlideSpec, write_demo_slide

    folder = tmp_path_factory.mktemp("interop_slides")
    paths = {}
    for i, (sid, (mpp, width, height)) in enumerate(SLIDES.items()):
        paths[sid] = folder / f"{sid}.svs"
        write_demo_slide(paths[sid], DemoSlideSpec(width_px=width, height_px=height, mpp=mpp, seed=i,
                                                   positive=i == 0))
    return paths


@pytest.fixture(scope="session")
def interop_run(tmp_path_factory, interop_slides) -> TinyRun:
    """Both slides at 0.5 µm/px, 224 px (read at level 0 of both)."""
    return _tiny_run(tmp_path_factory.mktemp("interop_run"), interop_slides, 0.5, 224, list(SLIDES))


@pytest.fixture(scope="session")
def coarse_run(tmp_path_factory, interop_slides) -> TinyRun:
    """The 0.25 µm/px slide at 1.0 µm/px, 112 px: read from its level 1 (downsample 4)."""
    return _tiny_run(tmp_path_factory.mktemp("coarse_run"), interop_slides, 1.0, 112, ["S025"])


@pytest.fixture(scope="session")
def exported(tmp_path_factory, interop_run):
    """Factory: exported(target, run=interop_run) -> OUT, written once per (target, run)."""
    from wsi_pipeline.cli import main

    cache = {}

    def _export(target: str, run: TinyRun = interop_run) -> Path:
        key = (target, run.run)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"export_{target}") / "out"
            assert main(["export", "--to", target, "--manifest", str(run.manifest), "--run", str(run.run),
                         "--out", str(out), "--config", str(run.config), "--no-progress"]) == 0
            cache[key] = out
        return cache[key]

    return _export

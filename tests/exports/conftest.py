"""Fixtures for the heatmap exports: a small demo slide with a planted lesion, patches over its
tissue, and scores that are each patch's lesion fraction (the ground truth the map must show)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_pipeline.demo.slides import GT_DOWNSAMPLE
from wsi_pipeline.slides import open_slide

PATCH_LEVEL0 = 128  # multiple of GT_DOWNSAMPLE: lesion fractions are exact on the truth grid


def lesion_mask(slide_path: Path) -> np.ndarray:
    """(h, w) bool ground-truth lesion mask, one cell per GT_DOWNSAMPLE level-0 px."""
    return np.asarray(Image.open(f"{slide_path.with_suffix('')}.lesion.png")) > 0


def lesion_fraction(mask: np.ndarray, coords: np.ndarray, size_level0: int) -> np.ndarray:
    cells = size_level0 // GT_DOWNSAMPLE
    return np.array([mask[y // GT_DOWNSAMPLE:y // GT_DOWNSAMPLE + cells,
                          x // GT_DOWNSAMPLE:x // GT_DOWNSAMPLE + cells].mean() for x, y in coords])


def tissue_grid(slide_path: Path, size_level0: int = PATCH_LEVEL0) -> np.ndarray:
    """(N, 2) level-0 top-lefts of a non-overlapping grid, keeping patches that are not glass."""
    with open_slide(slide_path) as slide:
        level = slide.level_count - 1
        down = int(round(slide.level_downsamples[level]))
        image = slide.read_level(level).astype(np.float32).mean(axis=2)
        w0, h0 = slide.dimensions
    coords = []
    cell = size_level0 // down
    for y in range(0, h0 - size_level0 + 1, size_level0):
        for x in range(0, w0 - size_level0 + 1, size_level0):
            if image[y // down:y // down + cell, x // down:x // down + cell].mean() < 225:
                coords.append((x, y))
    return np.asarray(coords, dtype=np.int64)


def planted_scores(slide_path: Path, coords: np.ndarray, seed: int = 0) -> np.ndarray:
    """Lesion fraction per patch, plus a little noise so no two patches tie."""
    frac = lesion_fraction(lesion_mask(slide_path), coords, PATCH_LEVEL0)
    return frac + 1e-3 * np.random.default_rng(seed).random(len(frac))


@pytest.fixture(scope="session")
def lesion_slide(make_slide):
    path = make_slide("heatmap_lesion", positive=True, seed=3)
    assert lesion_mask(path).any()
    return path


@pytest.fixture(scope="session")
def planted(lesion_slide):
    coords = tissue_grid(lesion_slide)
    scores = planted_scores(lesion_slide, coords)
    return {"slide": lesion_slide, "coords": coords, "scores": scores,
            "fraction": lesion_fraction(lesion_mask(lesion_slide), coords, PATCH_LEVEL0)}

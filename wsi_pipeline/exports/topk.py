"""The k highest- and k lowest-scoring patches as images, for a pathologist to look at.

Folder `{slide_id}_topk/`: `top_01_score….png` … (highest first), `bottom_01_score….png` …
(lowest first) and `index.csv` (kind, rank, file, x, y, size_level0, score, score_normalized).
Each image is the patch's level-0 footprint read at the coarsest level that does not upsample,
resized to `patch_size_px`. The folder is written beside its final name and renamed into place,
so it is complete or absent.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import temp_path

INDEX_HEADER = ["kind", "rank", "file", "x", "y", "size_level0", "score", "score_normalized"]


def select_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k highest (descending) and k lowest (ascending) scores; stable on ties."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    k = max(0, min(int(k), len(s)))
    top = np.argsort(-s, kind="stable")[:k]
    bottom = np.argsort(s, kind="stable")[:k]
    return top, bottom


def read_patch(slide, xy_level0: tuple[int, int], size_level0: float, patch_size_px: int) -> np.ndarray:
    """(patch_size_px, patch_size_px, 3) uint8: the level-0 square at `xy_level0` of side
    `size_level0`, read at the coarsest level that keeps >= patch_size_px pixels across."""
    wanted_down = size_level0 / patch_size_px
    level = max((lv for lv, down in enumerate(slide.level_downsamples) if down <= wanted_down * 1.02),
                default=0)
    read_px = max(1, int(round(size_level0 / slide.level_downsamples[level])))
    rgb = slide.read_region((int(xy_level0[0]), int(xy_level0[1])), level, (read_px, read_px))
    if read_px != patch_size_px:
        resample = Image.Resampling.BOX if read_px > patch_size_px else Image.Resampling.BILINEAR
        rgb = np.asarray(Image.fromarray(rgb).resize((patch_size_px, patch_size_px), resample))
    return rgb


def _score_text(value: float) -> str:
    return f"{value:.4g}".replace("+", "")


def write_topk(out_dir: str | os.PathLike, slide, coords: np.ndarray, patch_size_level0: float,
               scores: np.ndarray, normalized: np.ndarray, k: int, patch_size_px: int) -> list[dict]:
    """Write the top-k / bottom-k folder at `out_dir` (replacing an old one); returns index rows."""
    out_dir = Path(out_dir)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    normalized = np.asarray(normalized, dtype=np.float64).reshape(-1)
    top, bottom = select_topk(scores, k)
    width = max(2, len(str(len(top))))
    # Temp folders carry their writer like temp files, so a start-up clean-up spares a live job's.
    tmp = temp_path(out_dir)
    tmp.mkdir(parents=True)
    rows = []
    try:
        for kind, picks in (("top", top), ("bottom", bottom)):
            for rank, i in enumerate(picks, start=1):
                name = f"{kind}_{rank:0{width}d}_score{_score_text(scores[i])}.png"
                x, y = int(coords[i, 0]), int(coords[i, 1])
                Image.fromarray(read_patch(slide, (x, y), patch_size_level0, patch_size_px)).save(tmp / name)
                rows.append({"kind": kind, "rank": rank, "file": name, "x": x, "y": y,
                             "size_level0": patch_size_level0, "score": float(scores[i]),
                             "score_normalized": float(normalized[i])})
        with open(tmp / "index.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=INDEX_HEADER)
            writer.writeheader()
            writer.writerows(rows)
        # A directory cannot be os.replace'd onto a non-empty one: move the old aside first.
        old = None
        if out_dir.exists():
            old = temp_path(out_dir)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


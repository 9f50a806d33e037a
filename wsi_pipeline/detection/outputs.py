"""Per-slide detection outputs, streamed from the candidates CSV (memory flat in the slide's size).

- candidates CSV (x, y level-0 px, class, score): every peak >= min_score, the raw evidence that
  thresholds are chosen on and applied to;
- {slide}.csv: kept detections (score >= the class's threshold);
- {slide}.geojson: QuPath FeatureCollection, one Feature per object: Point geometry (level-0 px),
  properties {objectType: "detection", classification {name, color [r, g, b]}, measurements {score}};
- {slide}.midog.json: MIDOG grand-challenge style {"type": "Multiple points", "points":
  [{"name", "point": [x_mm, y_mm, 0], "probability"}], "version"};
- {slide}.summary.json: counts per class, tissue area, mitotic density per mm² of tissue, hotspot.
Every file is written to a temp beside it and renamed (atomic).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..io import atomic_path, write_json_atomic
from .hotspot import HOTSPOT_AREA_MM2, hotspot

CANDIDATE_HEADER = ["x", "y", "class", "score"]
PALETTE = [(0, 160, 0), (220, 30, 30), (255, 0, 255), (0, 120, 255), (255, 160, 0), (0, 200, 200)]


class CandidateWriter:
    """Streams detections to a CSV temp file; `commit()` renames it into place."""

    def __init__(self, path: Path, classes: Sequence[str]):
        self.path, self.classes = Path(path), list(classes)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        self._writer.writerow(CANDIDATE_HEADER)

    def __call__(self, xy: np.ndarray, score: np.ndarray, cls: np.ndarray) -> None:
        for (x, y), s, c in zip(xy, score, cls):
            self._writer.writerow([f"{x:.2f}", f"{y:.2f}", self.classes[int(c)], f"{float(s):.4f}"])

    def commit(self) -> None:
        self._fh.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._fh.close()
        try:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass


def iter_candidates(path: Path) -> Iterator[tuple[float, float, str, float]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for row in reader:
            yield float(row[0]), float(row[1]), row[2], float(row[3])


def read_candidates(path: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xy (N, 2) level-0 px, score (N,), cls (N,) index) of a candidates CSV."""
    rows = list(iter_candidates(path))
    if not rows:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    xy = np.array([(r[0], r[1]) for r in rows], dtype=np.float64)
    return xy, np.array([r[3] for r in rows]), np.array([index[r[2]] for r in rows], dtype=np.int64)


def class_color(classes: Sequence[str], name: str) -> list[int]:
    return list(PALETTE[list(classes).index(name) % len(PALETTE)])


def write_outputs(candidates: Path, paths: dict[str, Path], *, slide_id: str, classes: Sequence[str],
                  thresholds: dict[str, float], slide_mpp: float, tissue_area_mm2: float,
                  mitosis_class: str | None) -> dict:
    """Write csv / geojson / midog / summary (keys of `paths`) from the candidates; returns the summary."""
    counts = {c: 0 for c in classes}
    mitoses: list[tuple[float, float]] = []   # rare: kept for the hotspot (one pair per mitosis)
    with atomic_path(paths["csv"]) as t_csv, atomic_path(paths["geojson"]) as t_geo, \
            atomic_path(paths["midog"]) as t_mid:
        with open(t_csv, "w", newline="", encoding="utf-8") as f_csv, \
                open(t_geo, "w", encoding="utf-8") as f_geo, open(t_mid, "w", encoding="utf-8") as f_mid:
            out_csv = csv.writer(f_csv)
            out_csv.writerow(["x", "y", "class", "score"])
            f_geo.write('{"type": "FeatureCollection", "features": [\n')
            f_mid.write('{"type": "Multiple points", "points": [\n')
            first = True
            for x, y, name, score in iter_candidates(candidates):
                if score < thresholds[name]:
                    continue
                counts[name] += 1
                if name == mitosis_class:
                    mitoses.append((x, y))
                out_csv.writerow([f"{x:.2f}", f"{y:.2f}", name, f"{score:.4f}"])
                sep = "" if first else ",\n"
                first = False
                feature = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]},
                           "properties": {"objectType": "detection",
                                          "classification": {"name": name, "color": class_color(classes, name)},
                                          "measurements": {"score": score}}}
                f_geo.write(sep + json.dumps(feature))
                f_mid.write(sep + json.dumps({"name": name, "point": [round(x * slide_mpp / 1000, 6),
                                                                      round(y * slide_mpp / 1000, 6), 0],
                                              "probability": score}))
            f_geo.write("\n]}\n")
            f_mid.write('\n], "version": {"major": 1, "minor": 0}}\n')
    summary = summarise(slide_id, counts, np.array(mitoses).reshape(-1, 2), slide_mpp, tissue_area_mm2,
                        thresholds, mitosis_class)
    write_json_atomic(paths["summary"], summary)
    return summary


def summarise(slide_id: str, counts: dict, mitoses_xy: np.ndarray, slide_mpp: float, tissue_area_mm2: float,
              thresholds: dict, mitosis_class: str | None) -> dict:
    """Counts, mitotic density per mm² of tissue and the 2.37 mm² hotspot (square window)."""
    side_um = float(np.sqrt(HOTSPOT_AREA_MM2) * 1000)
    side_px = side_um / slide_mpp
    n, x, y = hotspot(mitoses_xy, side_px)
    n_mit = counts.get(mitosis_class, 0) if mitosis_class else 0
    return {
        "slide_id": slide_id, "counts": counts, "thresholds": thresholds,
        "tissue_area_mm2": round(tissue_area_mm2, 6), "mpp": slide_mpp,
        "mitotic_density_per_mm2": round(n_mit / tissue_area_mm2, 4) if tissue_area_mm2 > 0 else None,
        "hotspot": {"area_mm2": HOTSPOT_AREA_MM2, "side_um": round(side_um, 2), "count": n,
                    "x_px": round(x, 2), "y_px": round(y, 2), "x_um": round(x * slide_mpp, 2),
                    "y_um": round(y * slide_mpp, 2), "per_hpf": round(n / 10, 2),
                    "shape": "square", "class": mitosis_class},
    }

"""Point annotations in: every reader returns `Points` (level-0 pixel centres + class indices).

Formats (picked from the file's name and content):
- point CSV with header ``x,y,class`` (level-0 pixels, class by name);
- the demo cohort's truth: ``{stem}.nuclei.csv`` (``x,y,in_lesion``: 1 -> tumour nucleus, 0 ->
  normal nucleus) and ``{stem}.mitoses.csv`` (``x,y``: mitoses), see :func:`read_demo_truth`;
- QuPath GeoJSON (FeatureCollection, Feature list or one Feature): Point / MultiPoint geometries,
  polygon detections by the mean of their outer ring; class from ``properties.classification``;
- MIDOG / COCO JSON (``images``, ``annotations``, ``categories``): box ``[x, y, w, h]`` -> centre.

Class names go through ``class_map`` (e.g. ``{"mitotic figure": "mitosis"}``); names in ``ignore``
are dropped (MIDOG's "hard negative"). An unknown class, a point outside the slide, a COCO box under
an image id the file does not list or a malformed row is an :class:`AnnotationError` naming the
file and the row / feature. CSVs are read as the manifest is (a UTF-8 BOM and CRLF are fine).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import PipelineError
from ..run.manifest import open_csv


class AnnotationError(PipelineError):
    """A bad annotation file or row; the message names the file and the row / feature."""


@dataclass(frozen=True)
class Points:
    """Object centres: xy (N, 2) float64 level-0 pixels (x, y); cls (N,) int64 class indices."""

    xy: np.ndarray
    cls: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)

    @staticmethod
    def empty() -> "Points":
        return Points(np.zeros((0, 2)), np.zeros(0, dtype=np.int64))

    @staticmethod
    def concat(parts: Sequence["Points"]) -> "Points":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Points.empty()
        return Points(np.concatenate([p.xy for p in parts]), np.concatenate([p.cls for p in parts]))


class _Collector:
    """Checks each row's class and position; raises naming file + row."""

    def __init__(self, path: Path, classes: Sequence[str], class_map: Mapping[str, str] | None,
                 ignore: Sequence[str], slide_wh: tuple[int, int] | None):
        self.path, self.classes = path, list(classes)
        self.class_map, self.ignore = dict(class_map or {}), set(ignore)
        self.slide_wh = slide_wh
        self.xy: list[tuple[float, float]] = []
        self.cls: list[int] = []

    def fail(self, where: str, message: str):
        raise AnnotationError(f"{self.path}: {where}: {message}")

    def number(self, where: str, field: str, value) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(where, f"{field} {value!r} is not a number")
        if not np.isfinite(v):
            self.fail(where, f"{field} {value!r} is not finite")
        return v

    def add(self, where: str, x, y, name) -> None:
        x, y = self.number(where, "x", x), self.number(where, "y", y)
        if not isinstance(name, str) or not name.strip():
            self.fail(where, f"missing class name (got {name!r}); known: {', '.join(self.classes)}")
        name = self.class_map.get(name.strip(), name.strip())
        if name in self.ignore:
            return
        if name not in self.classes:
            self.fail(where, f"unknown class {name!r}; known: {', '.join(self.classes)}"
                             + (f" (class_map: {self.class_map})" if self.class_map else ""))
        if x < 0 or y < 0 or (self.slide_wh is not None and (x >= self.slide_wh[0] or y >= self.slide_wh[1])):
            size = f" {self.slide_wh[0]}x{self.slide_wh[1]} px" if self.slide_wh else ""
            self.fail(where, f"point ({x:g}, {y:g}) is outside the slide{size}")
        self.xy.append((x, y))
        self.cls.append(self.classes.index(name))

    def points(self) -> Points:
        if not self.xy:
            return Points.empty()
        return Points(np.asarray(self.xy, dtype=np.float64), np.asarray(self.cls, dtype=np.int64))


def read_annotations(path: str | Path, classes: Sequence[str], *, slide_wh: tuple[int, int] | None = None,
                     class_map: Mapping[str, str] | None = None, ignore: Sequence[str] = (),
                     default_class: str | None = None, image: str | int | None = None) -> Points:
    """Read `path` (CSV, GeoJSON or COCO/MIDOG JSON) into Points over `classes` (index order).

    slide_wh: level-0 (width, height); points outside are errors. default_class: class of rows in
    a CSV without a class column (``x,y`` files such as ``*.mitoses.csv``). image: COCO image
    ``file_name`` (or its stem) or ``id`` to take boxes from when the file holds several images.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    col = _Collector(path, classes, class_map, ignore, slide_wh)
    if path.suffix.lower() == ".csv":
        _read_csv(path, col, default_class)
        return col.points()
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON: {exc}") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        _read_coco(data, col, image)
    else:
        _read_geojson(data, col)
    return col.points()


def _read_csv(path: Path, col: _Collector, default_class: str | None) -> None:
    with open_csv(path) as fh:   # BOM / CRLF (Excel) read as the manifest is
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if "x" not in header or "y" not in header:
            col.fail("header", f"need columns x, y (and class or in_lesion), got {header}")
        ix, iy = header.index("x"), header.index("y")
        if "class" in header:
            ic, mode = header.index("class"), "class"
        elif "in_lesion" in header:
            ic, mode = header.index("in_lesion"), "in_lesion"
        elif default_class is not None:
            ic, mode = -1, "default"
        else:
            col.fail("header", f"no class column (class or in_lesion) and no default class; got {header}")
        for row_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"row {row_no}"
            if len(row) != len(header):
                col.fail(where, f"{len(row)} fields, header has {len(header)}")
            if mode == "class":
                name = row[ic]
            elif mode == "in_lesion":
                flag = row[ic].strip()
                if flag not in ("0", "1"):
                    col.fail(where, f"in_lesion must be 0 or 1, got {flag!r}")
                name = DEMO_TUMOUR if flag == "1" else DEMO_NORMAL
            else:
                name = default_class
            col.add(where, row[ix], row[iy], name)


def _class_name(props, col: _Collector, where: str):
    cls = props.get("classification") if isinstance(props, dict) else None
    if isinstance(cls, dict):
        return cls.get("name")
    if isinstance(cls, str):
        return cls
    col.fail(where, "no properties.classification (a class name is required)")


def _read_geojson(data, col: _Collector) -> None:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        col.fail("top level", "neither a GeoJSON FeatureCollection / Feature list nor COCO JSON")
    if not isinstance(features, list):
        col.fail("features", "must be a list")
    for i, feat in enumerate(features):
        where = f"feature {i}"
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            col.fail(where, "not a Feature with a geometry")
        geom = feat["geometry"]
        name = _class_name(feat.get("properties") or {}, col, where)
        coords = geom.get("coordinates")
        try:
            if geom.get("type") == "Point":
                centres = [coords[:2]]
            elif geom.get("type") == "MultiPoint":
                centres = [c[:2] for c in coords]
            elif geom.get("type") == "Polygon":
                ring = np.asarray(coords[0], dtype=np.float64)[:, :2]
                ring = ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring
                centres = [ring.mean(axis=0).tolist()]
            else:
                col.fail(where, f"geometry type {geom.get('type')!r} (need Point, MultiPoint or Polygon)")
        except (TypeError, IndexError, ValueError):
            col.fail(where, f"malformed {geom.get('type')} coordinates {str(coords)[:60]}")
        for c in centres:
            if not isinstance(c, (list, tuple)) or len(c) < 2:
                col.fail(where, f"malformed coordinates {str(coords)[:60]}")
            col.add(where, c[0], c[1], name)


def _read_coco(data: dict, col: _Collector, image) -> None:
    cats = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and "id" in c and "name" in c:
            cats[c["id"]] = c["name"]
    images = [im for im in data.get("images") or [] if isinstance(im, dict)]
    if image is None:
        if len(images) != 1:
            col.fail("images", f"{len(images)} images in the file: say which one (image=file name or id)")
        image_id = images[0].get("id")
    else:
        match = [im for im in images if image in (im.get("id"), im.get("file_name"),
                                                  Path(str(im.get("file_name", ""))).stem)]
        if not match:
            col.fail("images", f"no image {image!r}")
        image_id = match[0].get("id")
    known = [im.get("id") for im in images]
    if not isinstance(data["annotations"], list):
        col.fail("annotations", "must be a list")
    for i, ann in enumerate(data["annotations"]):
        where = f"annotation {i}"
        if not isinstance(ann, dict):
            col.fail(where, "not an object")
        # A box under an image id the file does not list belongs to no slide: dropping it would
        # make its slide train (and score) as object-free, so it is an error.
        if ann.get("image_id") not in known:
            col.fail(where, f"image_id {ann.get('image_id')!r} is none of the file's images "
                            f"(ids {', '.join(map(repr, known))})")
        if ann.get("image_id") != image_id:
            continue
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4:
            col.fail(where, f"bbox must be [x, y, w, h], got {box!r}")
        if ann.get("category_id") not in cats:
            col.fail(where, f"category_id {ann.get('category_id')!r} not in categories")
        x, y, w, h = (col.number(where, f"bbox[{k}]", v) for k, v in enumerate(box))
        col.add(where, x + w / 2, y + h / 2, cats[ann["category_id"]])


# The demo cohort's classes (wsi_pipeline.demo.slides writes nuclei.csv with in_lesion and mitoses.csv).
DEMO_NORMAL, DEMO_TUMOUR, DEMO_MITOSIS = "nucleus-normal", "nucleus-tumour", "mitosis"
DEMO_CLASSES = (DEMO_NORMAL, DEMO_TUMOUR, DEMO_MITOSIS)


def demo_truth_paths(slide_path: str | Path) -> tuple[Path, Path]:
    stem = Path(slide_path).with_suffix("")
    return Path(f"{stem}.nuclei.csv"), Path(f"{stem}.mitoses.csv")


def read_demo_truth(slide_path: str | Path, classes: Sequence[str] = DEMO_CLASSES, *,
                    slide_wh: tuple[int, int] | None = None) -> Points:
    """The demo cohort's truth beside `slide_path`: nuclei (normal / tumour) + mitoses."""
    nuclei, mitoses = demo_truth_paths(slide_path)
    return Points.concat([read_annotations(nuclei, classes, slide_wh=slide_wh),
                          read_annotations(mitoses, classes, slide_wh=slide_wh, default_class=DEMO_MITOSIS)])


def read_truth(slide_path: str | Path, classes: Sequence[str], *, annotations: str | Path | None = None,
               slide_wh: tuple[int, int] | None = None, class_map: Mapping[str, str] | None = None,
               ignore: Sequence[str] = ()) -> Points:
    """Truth for a slide: `annotations` if given, else the demo truth files beside the slide."""
    if annotations is not None:
        return read_annotations(annotations, classes, slide_wh=slide_wh, class_map=class_map, ignore=ignore,
                                image=Path(slide_path).name)
    nuclei, _ = demo_truth_paths(slide_path)
    if not nuclei.is_file():
        raise AnnotationError(f"{slide_path}: no annotations given and no demo truth {nuclei.name} beside it")
    return read_demo_truth(slide_path, classes, slide_wh=slide_wh)

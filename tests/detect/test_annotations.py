"""Annotation readers: every format, and one clear error per bad input naming file and row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_pipeline.detection import DEMO_CLASSES, AnnotationError, read_annotations, read_demo_truth

CLASSES = list(DEMO_CLASSES)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_point_csv_geojson_coco_and_demo_truth(tmp_path):
    pts = read_annotations(_write(tmp_path / "a.csv", "x,y,class\n10,20,mitosis\n30.5,40,nucleus-normal\n"), CLASSES)
    assert pts.xy.tolist() == [[10, 20], [30.5, 40]] and pts.cls.tolist() == [2, 0]
    geo = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]},
         "properties": {"objectType": "detection", "classification": {"name": "mitosis", "color": [1, 2, 3]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 2], [0, 2], [0, 0]]]},
         "properties": {"classification": {"name": "nucleus-tumour"}}}]}
    pts = read_annotations(_write(tmp_path / "a.geojson", json.dumps(geo)), CLASSES)
    assert pts.xy.tolist() == [[5, 6], [2, 1]] and pts.cls.tolist() == [2, 1]
    coco = {"images": [{"id": 7, "file_name": "s1.tiff"}, {"id": 8, "file_name": "s2.tiff"}],
            "categories": [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "hard negative"}],
            "annotations": [{"image_id": 7, "category_id": 1, "bbox": [100, 200, 50, 50]},
                            {"image_id": 7, "category_id": 2, "bbox": [0, 0, 50, 50]},
                            {"image_id": 8, "category_id": 1, "bbox": [1, 1, 2, 2]}]}
    pts = read_annotations(_write(tmp_path / "midog.json", json.dumps(coco)), CLASSES, image="s1.tiff",
                           class_map={"mitotic figure": "mitosis"}, ignore=["hard negative"])
    assert pts.xy.tolist() == [[125, 225]] and pts.cls.tolist() == [2]
    slide = tmp_path / "S.svs"
    _write(tmp_path / "S.nuclei.csv", "x,y,in_lesion\n1,2,0\n3,4,1\n")
    _write(tmp_path / "S.mitoses.csv", "x,y\n5,6\n")
    pts = read_demo_truth(slide, slide_wh=(100, 100))
    assert pts.xy.tolist() == [[1, 2], [3, 4], [5, 6]] and pts.cls.tolist() == [0, 1, 2]


BAD = [
    ("bad.csv", "x,y,class\n1,2,mitosis\n3,4,eosinophil\n", "row 3: unknown class 'eosinophil'"),
    ("bad.csv", "x,y,class\n1,2,mitosis\n5000,4,mitosis\n", "row 3: point (5000, 4) is outside the slide"),
    ("bad.csv", "x,y,class\n-1,2,mitosis\n", "row 2: point (-1, 2) is outside the slide"),
    ("bad.csv", "x,y,class\nabc,2,mitosis\n", "row 2: x 'abc' is not a number"),
    ("bad.csv", "x,y,class\n1,2\n", "row 2: 2 fields, header has 3"),
    ("bad.csv", "x,y,class\n1,nan,mitosis\n", "row 2: y 'nan' is not finite"),
    ("bad.csv", "a,b\n1,2\n", "header: need columns x, y"),
    ("bad.csv", "x,y\n1,2\n", "header: no class column"),
    ("bad.nuclei.csv", "x,y,in_lesion\n1,2,yes\n", "row 2: in_lesion must be 0 or 1"),
    ("bad.geojson", "{not json", "not valid JSON"),
    ("bad.geojson", json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}]}),
     "feature 0: no properties.classification"),
    ("bad.geojson", json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[1, 2], [3, 4]]},
         "properties": {"classification": {"name": "mitosis"}}}]}), "feature 0: geometry type 'LineString'"),
    ("bad.geojson", json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1]},
         "properties": {"classification": {"name": "mitosis"}}}]}), "feature 0: malformed coordinates"),
    ("bad.json", json.dumps({"images": [{"id": 1, "file_name": "a.tiff"}], "categories": [{"id": 1, "name": "mitosis"}],
                             "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2]}]}),
     "annotation 0: bbox must be [x, y, w, h]"),
    ("bad.json", json.dumps({"images": [{"id": 1, "file_name": "a.tiff"}], "categories": [{"id": 1, "name": "mitosis"}],
                             "annotations": [{"image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4]}]}),
     "annotation 0: category_id 9 not in categories"),
    ("bad.json", json.dumps({"images": [{"id": 1}, {"id": 2}], "categories": [], "annotations": []}),
     "images: 2 images in the file"),
]


@pytest.mark.parametrize("name,text,expected", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_annotation_input_gives_one_clear_error_naming_file_and_row(tmp_path, name, text, expected):
    path = _write(tmp_path / name, text)
    with pytest.raises(AnnotationError) as err:
        read_annotations(path, CLASSES, slide_wh=(1000, 1000))
    message = str(err.value)
    assert str(path) in message and expected in message
    assert "\n" not in message and "Traceback" not in message


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        read_annotations(tmp_path / "none.csv", CLASSES)


def test_demo_cohort_truth_reads(demo_cohort):
    slide = demo_cohort.parent / "slides" / "DEMO-001.svs"
    pts = read_demo_truth(slide, slide_wh=(2048, 1536))
    assert len(pts) > 100 and set(np.unique(pts.cls)) <= {0, 1, 2}

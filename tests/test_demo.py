import csv
import json

import numpy as np
import openslide
from PIL import Image

from wsi_pipeline.demo.slides import GT_DOWNSAMPLE
from wsi_pipeline.run.manifest import load_manifest
from wsi_pipeline.slides import open_slide


def test_demo_cohort_manifest_and_truth(demo_cohort):
    m = load_manifest(demo_cohort, require_labels=True, check_files=True)
    assert len(m) == 4
    assert {r.label for r in m} == {"tumor", "normal"}
    # Some patient owns two slides, so patient-level splitting is exercised.
    patients = [r.patient_id for r in m]
    assert len(set(patients)) < len(patients)
    for r in m:
        assert openslide.OpenSlide.detect_format(str(r.path)) == "aperio"
        truth = json.loads(r.path.with_suffix(".truth.json").read_text())
        assert truth["positive"] == (r.label == "tumor")
        lesion = np.asarray(Image.open(r.path.parent / truth["lesion_mask"])) > 0
        assert truth["lesion_mask_downsample"] == GT_DOWNSAMPLE
        assert lesion.any() == truth["positive"]
        with open(r.path.with_suffix(".mitoses.csv")) as fh:
            mitoses = list(csv.DictReader(fh))
        assert (len(mitoses) > 0) == truth["positive"]
        with open(r.path.with_suffix(".nuclei.csv")) as fh:
            nuclei = np.array([[int(row["x"]), int(row["y"]), int(row["in_lesion"])] for row in csv.DictReader(fh)])
        assert len(nuclei) > 100
        # Lesion nuclei lie on the lesion mask.
        in_lesion = nuclei[nuclei[:, 2] == 1]
        hits = lesion[in_lesion[:, 1] // GT_DOWNSAMPLE, in_lesion[:, 0] // GT_DOWNSAMPLE]
        assert len(in_lesion) == 0 or hits.mean() > 0.99


def test_lesions_look_different_and_stains_vary(demo_cohort):
    m = load_manifest(demo_cohort)
    means = []
    for r in m:
        with open_slide(r.path) as s:
            thumb = s.read_level(s.level_count - 1).astype(np.float32)
            tissue = thumb.min(axis=2) < 200
            means.append(thumb[tissue].mean(axis=0))
            truth = json.loads(r.path.with_suffix(".truth.json").read_text())
            if truth["positive"]:
                lesion = np.asarray(Image.open(r.path.parent / truth["lesion_mask"])) > 0
                level0 = s.read_region((0, 0), 0, s.dimensions).astype(np.float32)
                up = np.repeat(np.repeat(lesion, GT_DOWNSAMPLE, 0), GT_DOWNSAMPLE, 1)
                up = up[: level0.shape[0], : level0.shape[1]]
                normal_tissue = (level0.min(axis=2) < 215) & ~up
                # Lesions: crowded dark nuclei → clearly darker than the rest of the tissue.
                assert level0[up].mean() < level0[normal_tissue].mean() - 15
    means = np.array(means)
    # Stain variation between slides: mean tissue colours differ by several grey levels.
    assert np.ptp(means, axis=0).max() > 4


def test_hard_demo_small_lesions_confounders_and_holes(tmp_path):
    """--hard: lesions of a few 112 µm patches, benign dense-nuclei clusters on normal slides too,
    several glass holes; the truth files have the same layout as the normal demo's."""
    from wsi_pipeline.cli import main

    assert main(["demo-cohort", str(tmp_path), "--n", "2", "--hard", "--width", "2048", "--height", "1536"]) == 0
    m = load_manifest(tmp_path / "manifest.csv", require_labels=True, check_files=True)
    patch_area_um2 = 112.0 ** 2
    for r in m:
        truth = json.loads(r.path.with_suffix(".truth.json").read_text())
        assert truth["hard"] is True
        lesion = np.asarray(Image.open(r.path.parent / truth["lesion_mask"])) > 0
        assert lesion.any() == truth["positive"]
        if truth["positive"]:
            assert 0.3 * patch_area_um2 <= truth["lesion_area_um2"] <= 2 * 4 * patch_area_um2
        # Confounders: every slide has benign patches with many times the normal nuclear density
        # (normal tissue: ~36 nuclei per 112 µm patch; clusters: ~1 per 45 µm²).
        with open(r.path.with_suffix(".nuclei.csv")) as fh:
            benign = np.array([[int(row["x"]), int(row["y"])] for row in csv.DictReader(fh)
                               if row["in_lesion"] == "0"])
        counts, _, _ = np.histogram2d(benign[:, 0], benign[:, 1], bins=(2048 // 224, 1536 // 224),
                                      range=((0, 2048 // 224 * 224), (0, 1536 // 224 * 224)))
        assert counts.max() > 120, counts.max()

"""Our files through the reading code of CLAM, TRIDENT and STAMP (tests/interop/readers.py, each
function citing the upstream file it follows), with the µm footprint a patch covers on slides
scanned at 0.25 and 0.5 µm/px: 224 px at 0.5 µm/px is 112 µm of tissue, whoever reads it."""

from __future__ import annotations

import csv
import logging

import h5py
import numpy as np
import openslide
import pytest

from wsi_pipeline.cli import main
from wsi_pipeline.errors import ManifestError
from wsi_pipeline.features.features_h5 import read_features_h5, write_features_h5
from wsi_pipeline.run.manifest import load_manifest

from . import readers
from .conftest import ENCODER, FOOTPRINT_UM, SLIDES, write_manifest


def _features(run, sid):
    return read_features_h5(run.run / "features" / ENCODER / f"{sid}.h5")


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- our own files --------------------------------------------------------------------------------
@pytest.mark.parametrize("sid", list(SLIDES))
def test_native_coords_h5_passes_tridents_coords_attrs_lookup(interop_run, sid):
    """RUN/tiles/{id}.coords.h5 as TRIDENT's extract_patch_features reads it: the three attrs are on
    f['coords'] and its patcher's level-0 side is our patch_size_level0 (112 µm at either mpp)."""
    mpp = SLIDES[sid][0]
    attrs, coords = readers.trident_read_coords(interop_run.run / "tiles" / f"{sid}.coords.h5")
    side_level0 = readers.trident_patcher_level0_side(attrs)
    assert side_level0 == attrs["patch_size_level0"] == round(224 * 0.5 / mpp)
    assert side_level0 * mpp == pytest.approx(FOOTPRINT_UM)
    assert (attrs["level0_magnification"], attrs["target_magnification"]) == (10 / mpp, 20.0)
    with h5py.File(interop_run.run / "tiles" / f"{sid}.coords.h5", "r") as f:
        assert dict(f.attrs).keys() == dict(f["coords"].attrs).keys()   # and on the root
        assert f.attrs["patch_size_level0"] == side_level0


@pytest.mark.parametrize("sid", list(SLIDES))
def test_native_features_h5_feeds_tridents_slide_encoders(interop_run, sid):
    """RUN/features/{encoder}/{id}.h5 as TRIDENT's extract_slide_features builds a slide encoder's
    batch: f['coords'].attrs['patch_size_level0'] (a KeyError before: it was on the root only)."""
    features, coords, root = _features(interop_run, sid)
    batch = readers.trident_slide_encoder_batch(interop_run.run / "features" / ENCODER / f"{sid}.h5")
    assert batch["attributes"]["patch_size_level0"] == root["patch_size_level0"]
    assert batch["attributes"]["patch_size_level0"] * SLIDES[sid][0] == pytest.approx(FOOTPRINT_UM)
    assert batch["attributes"]["target_magnification"] == 20.0
    np.testing.assert_array_equal(batch["coords"], coords)
    np.testing.assert_array_equal(batch["features"], features)


def test_our_native_coords_mislead_clams_reader_which_is_why_export_exists(interop_run):
    """CLAM's Whole_Slide_Bag_FP on our native coords.h5 of the 0.25 µm/px slide reads 224 px at
    level 0: 56 µm, half our patch. The CLAM export below reads 112 µm."""
    with openslide.OpenSlide(str(interop_run.slide_paths["S025"])) as wsi:
        level, size, _, _ = readers.clam_bag_fp_reads(interop_run.run / "tiles" / "S025.coords.h5", wsi)
        assert readers.footprint_um_at(wsi.level_downsamples[level], size, 0.25) == 56.0


def test_features_files_from_before_keep_working_and_export(tmp_path, interop_run):
    """A features.h5 written the old way (tiling attrs on the root only, some "coords_"-prefixed):
    our reader reads it and the export takes the geometry from the root."""
    features, coords, root = _features(interop_run, "S025")
    old_run = tmp_path / "old_run"
    old = old_run / "features" / ENCODER / "S025.h5"
    write_features_h5(old, features, coords, {**root, "coords_slide_id": "S025"})   # no coords_attrs
    with h5py.File(old, "r") as f:
        assert "patch_size_level0" not in f["coords"].attrs
    assert read_features_h5(old)[2]["patch_size_level0"] == 448
    manifest = write_manifest(tmp_path / "m.csv", [["S025", interop_run.slide_paths["S025"], "P0", "tumor", "demo"]])
    out = tmp_path / "out"
    assert main(["export", "--to", "trident", "--manifest", str(manifest), "--run", str(old_run), "--out", str(out),
                 "--config", str(interop_run.config), "--no-progress"]) == 0
    attrs, _ = readers.trident_read_coords(out / "20x_224px_0px_overlap" / "patches" / "S025_patches.h5")
    assert readers.trident_patcher_level0_side(attrs) == 448


# -- CLAM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sid", list(SLIDES))
def test_clam_mil_dataset_reads_h5_and_pt_files(interop_run, exported, sid):
    out = exported("clam")
    features, coords, _ = _features(interop_run, sid)
    from_h5, coords_h5 = readers.clam_mil_dataset_item(out, sid, use_h5=True)
    from_pt, _ = readers.clam_mil_dataset_item(out, sid, use_h5=False)
    np.testing.assert_array_equal(from_h5.numpy(), features)
    np.testing.assert_array_equal(coords_h5, coords)
    assert from_pt.dtype.is_floating_point and from_pt.shape == features.shape
    np.testing.assert_array_equal(from_pt.numpy(), features)


def test_clam_dataset_csv_groups_by_case_id(exported):
    slide_ids, patients = readers.clam_patient_data(exported("clam") / "dataset.csv", {"normal": 0, "tumor": 1})
    assert slide_ids == ["S025", "S050"] and patients == {"P0": 1, "P1": 0}
    assert _rows(exported("clam") / "dataset.csv")[0]["KRAS"] == "mut"     # extra columns carried


@pytest.mark.parametrize("sid", list(SLIDES))
def test_clam_reextraction_reads_our_footprint(interop_run, exported, sid):
    """extract_features_fp.py over the export: process_list.csv -> patches/{id}.h5 ->
    Whole_Slide_Bag_FP reads patch_size px at patch_level: 112 µm on both slides, and the pixels are
    those our extractor read (resized to CLAM's --target_patch_size, 224)."""
    out = exported("clam")
    h5_path = readers.clam_extract_list(out / "process_list.csv", out, ".svs")[sid]
    mpp = SLIDES[sid][0]
    with openslide.OpenSlide(str(interop_run.slide_paths[sid])) as wsi:
        level, size, coords, patches = readers.clam_bag_fp_reads(h5_path, wsi)
        assert readers.footprint_um_at(wsi.level_downsamples[level], size, mpp) == pytest.approx(FOOTPRINT_UM)
        ours = wsi.read_region(tuple(int(v) for v in coords[0]), 0, (round(112 / mpp),) * 2).convert("RGB")
    np.testing.assert_array_equal(np.asarray(patches[0]), np.asarray(ours))
    row = {r["slide_id"]: r for r in _rows(out / "process_list.csv")}[sid]
    assert int(row["target_patch_size"]) == 224 and float(row["footprint_um"]) == pytest.approx(FOOTPRINT_UM)


def test_clam_reads_from_a_coarser_pyramid_level(coarse_run, exported):
    """At 1.0 µm/px the 0.25 µm/px slide is read from level 1 (downsample 4): CLAM gets
    patch_level 1, patch_size 112: 112 px · 4 · 0.25 µm = 112 µm."""
    out = exported("clam", coarse_run)
    h5_path = readers.clam_extract_list(out / "process_list.csv", out, ".svs")["S025"]
    with openslide.OpenSlide(str(coarse_run.slide_paths["S025"])) as wsi:
        level, size, _, patches = readers.clam_bag_fp_reads(h5_path, wsi)
        assert (level, size, wsi.level_downsamples[level]) == (1, 112, 4.0)
        assert readers.footprint_um_at(wsi.level_downsamples[level], size, 0.25) == FOOTPRINT_UM
    assert patches[0].size == (112, 112)


# -- TRIDENT ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sid", list(SLIDES))
def test_trident_reads_exported_coords_and_features(interop_run, exported, sid):
    job = exported("trident") / "20x_224px_0px_overlap"   # Processor.run_patching_job's folder name
    features, coords, _ = _features(interop_run, sid)
    attrs, tcoords = readers.trident_read_coords(job / "patches" / f"{sid}_patches.h5")
    assert readers.trident_patcher_level0_side(attrs) * SLIDES[sid][0] == pytest.approx(FOOTPRINT_UM)
    np.testing.assert_array_equal(tcoords, coords)
    batch = readers.trident_slide_encoder_batch(job / f"features_{ENCODER}" / f"{sid}.h5")
    np.testing.assert_array_equal(batch["features"], features)
    assert batch["attributes"]["patch_size_level0"] * SLIDES[sid][0] == pytest.approx(FOOTPRINT_UM)
    with h5py.File(job / f"features_{ENCODER}" / f"{sid}.h5", "r") as f:
        assert f["features"].attrs["encoder"] == ENCODER and f["features"].attrs["name"] == sid


def test_trident_wsi_list_is_also_our_manifest(tmp_path, exported, interop_run):
    """One CSV for both: TRIDENT's collect_valid_slides finds every `wsi`, and wsi-pipeline loads it
    as a manifest (`wsi` read as `path`, mpp = the µm/px the features were made at)."""
    wsi_list = exported("trident") / "wsi_list.csv"
    found = readers.trident_collect_valid_slides(str(tmp_path), wsi_list)
    assert sorted(found) == sorted(str(p) for p in interop_run.slide_paths.values())
    m = load_manifest(wsi_list, check_files=True)
    assert {r.slide_id: (r.path, r.mpp) for r in m} == {
        sid: (interop_run.slide_paths[sid], SLIDES[sid][0]) for sid in SLIDES}
    assert m.extra_columns == ("KRAS",)


# -- STAMP --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sid", list(SLIDES))
def test_stamp_reads_feats_and_um_coords(interop_run, exported, sid):
    feature_dir = exported("stamp") / "features"
    features, coords, _ = _features(interop_run, sid)
    assert readers.stamp_detect_feature_type(feature_dir) == "tile"
    with h5py.File(feature_dir / f"{sid}.h5", "r") as h5:
        np.testing.assert_array_equal(readers.stamp_bag_feats(h5), features)
        coords_um, tile_size_um, tile_size_px = readers.stamp_get_coords(h5)
    mpp = SLIDES[sid][0]
    assert tile_size_um == pytest.approx(FOOTPRINT_UM) and tile_size_px == 224
    assert tile_size_um / tile_size_px == pytest.approx(0.5)          # CoordsInfo.mpp: ours
    np.testing.assert_allclose(coords_um, coords * mpp)               # µm on the slide
    np.testing.assert_allclose(coords_um / mpp, coords)


def test_stamp_tables_link_patients_labels_and_files(exported):
    out = exported("stamp")
    data = readers.stamp_patient_data(out / "clini.csv", out / "slide.csv", out / "features")
    assert data == {"P0": ("tumor", {out / "features" / "S025.h5"}),
                    "P1": ("normal", {out / "features" / "S050.h5"})}
    assert [r["KRAS"] for r in _rows(out / "clini.csv")] == ["mut", "wt"]   # constant per patient


def test_upstream_pandas_calls_read_the_tables(exported):
    """The exact pandas calls of CLAM (read_csv, then case_id / slide_id / label) and STAMP
    (read_csv usecols dtype=str; set_index(..., verify_integrity=True) is a unique index)."""
    pd = pytest.importorskip("pandas")
    clam = pd.read_csv(exported("clam") / "dataset.csv")
    assert list(clam["case_id"]) == ["P0", "P1"] and list(clam["slide_id"]) == ["S025", "S050"]
    stamp = exported("stamp")
    clini = pd.read_csv(stamp / "clini.csv", usecols=["PATIENT", "label"], dtype=str)
    clini = clini.set_index("PATIENT")
    assert clini.index.is_unique and clini["label"].to_dict() == {"P0": "tumor", "P1": "normal"}
    slides = pd.read_csv(stamp / "slide.csv", usecols=["PATIENT", "FILENAME"], dtype=str)
    slides = slides.set_index("FILENAME")
    assert slides.index.is_unique and slides["PATIENT"].to_dict() == {"S025.h5": "P0", "S050.h5": "P1"}


def test_stamp_refuses_a_patient_with_two_labels_before_writing(tmp_path, interop_run, capsys):
    manifest = write_manifest(tmp_path / "m.csv", [["S025", interop_run.slide_paths["S025"], "P0", "tumor", "demo"],
                                                   ["S050", interop_run.slide_paths["S050"], "P0", "normal", "demo"]])
    out = tmp_path / "out"
    assert main(["export", "--to", "stamp", "--manifest", str(manifest), "--run", str(interop_run.run),
                 "--out", str(out), "--config", str(interop_run.config), "--no-progress"]) == 2
    assert "patient 'P0': slides labelled 'tumor' (row 1), 'normal' (row 2)" in capsys.readouterr().err
    assert not out.exists()


# -- the export command's errors ------------------------------------------------------------------
def test_export_of_a_run_without_features_is_one_error_and_writes_nothing(tmp_path, interop_run, capsys):
    out = tmp_path / "out"
    args = ["export", "--to", "clam", "--manifest", str(interop_run.manifest), "--out", str(out), "--no-progress"]
    assert main([*args, "--run", str(interop_run.run), "--encoder", "resnet50_trunc"]) == 2
    err = capsys.readouterr().err
    assert "no features to export for encoder 'resnet50_trunc'" in err and f"with features: {ENCODER}" in err
    (tmp_path / "empty_run").mkdir()
    assert main([*args, "--run", str(tmp_path / "empty_run"), "--config", str(interop_run.config)]) == 2
    assert "run `wsi-pipeline extract` first" in capsys.readouterr().err
    assert main(["export", "--to", "clam", "--manifest", str(interop_run.manifest), "--out", str(interop_run.run),
                 "--run", str(interop_run.run), "--config", str(interop_run.config), "--no-progress"]) == 2
    assert "is the run folder" in capsys.readouterr().err
    assert not out.exists()


def test_a_slide_without_features_fails_alone(tmp_path, interop_run, capsys):
    rows = [["S025", interop_run.slide_paths["S025"], "P0", "tumor", "demo"],
            ["NOFEAT", interop_run.slide_paths["S050"], "P9", "normal", "demo"]]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    assert main(["export", "--to", "stamp", "--manifest", str(manifest), "--run", str(interop_run.run),
                 "--out", str(out), "--config", str(interop_run.config), "--no-progress"]) == 1
    failures = _rows(out / "failures.csv")
    assert [(f["slide_id"], f["stage"]) for f in failures] == [("NOFEAT", "export-stamp")]
    assert "run `wsi-pipeline extract` for it first" in failures[0]["error"]
    assert [r["slide_id"] for r in _rows(out / "slide.csv")] == ["S025"]
    assert sorted(p.name for p in (out / "features").iterdir()) == ["S025.h5"]


# -- manifests ----------------------------------------------------------------------------------
def test_manifest_keeps_extra_columns_and_warns_once(tmp_path, caplog):
    path = write_manifest(tmp_path / "m.csv", [["A", "a.svs", "P1", "x", "c", "1", "u"],
                                               ["B", "b.svs", "P2", "y", "c", "2", "v"]],
                          ("slide_id", "path", "patient_id", "label", "cohort", "case_id", "site"))
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        m = load_manifest(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "case_id, site" in warnings[0]
    assert m.extra_columns == ("case_id", "site")
    assert m.records[1].extra_columns == {"case_id": "2", "site": "v"}
    assert m.select(["B"]).extra_columns == ("case_id", "site")


def test_manifest_reads_wsi_as_path_only_without_a_path_column(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    alias = write_manifest(tmp_path / "w.csv", [["A", "a.svs", "P1", "x", "c"]],
                           ("slide_id", "wsi", "patient_id", "label", "cohort"))
    record = load_manifest(alias, check_files=True).records[0]
    assert record.path == (tmp_path / "a.svs").resolve() and record.extra == ()
    both = write_manifest(tmp_path / "b.csv", [["A", "a.svs", "P1", "x", "c", "elsewhere/a.svs"]],
                          ("slide_id", "path", "patient_id", "label", "cohort", "wsi"))
    record = load_manifest(both).records[0]
    assert record.path == (tmp_path / "a.svs").resolve() and record.extra_columns == {"wsi": "elsewhere/a.svs"}
    neither = write_manifest(tmp_path / "n.csv", [["A", "P1", "x", "c"]], ("slide_id", "patient_id", "label", "cohort"))
    with pytest.raises(ManifestError, match="missing column.*path.*a `wsi` column is read as `path`"):
        load_manifest(neither)


def test_a_volume_row_fails_alone_with_a_clear_message(tmp_path, interop_run):
    """CLAM/TRIDENT/STAMP read 2-D slide features: a CT volume's (3-D coords) fails, named, and the
    slide beside it is exported."""
    import shutil

    run = tmp_path / "run"
    (run / "features" / ENCODER).mkdir(parents=True)
    shutil.copy(interop_run.run / "features" / ENCODER / "S025.h5", run / "features" / ENCODER / "S025.h5")
    write_features_h5(run / "features" / ENCODER / "VOL.h5", np.zeros((3, 4), np.float32),
                      np.zeros((3, 3), np.int64), {"encoder": ENCODER, "out_dim": 4})
    (tmp_path / "vol.nii.gz").write_bytes(b"x")
    manifest = write_manifest(tmp_path / "m.csv", [["S025", interop_run.slide_paths["S025"], "P0", "tumor", "demo", ""],
                                                   ["VOL", tmp_path / "vol.nii.gz", "P1", "normal", "ct", "CT"]],
                              ("slide_id", "path", "patient_id", "label", "cohort", "modality"))
    out = tmp_path / "out"
    assert main(["export", "--to", "clam", "--manifest", str(manifest), "--run", str(run), "--out", str(out),
                 "--config", str(interop_run.config), "--no-progress"]) == 1
    failures = _rows(out / "failures.csv")
    assert [f["slide_id"] for f in failures] == ["VOL"] and "CT volume" in failures[0]["error"]
    assert [r["slide_id"] for r in _rows(out / "dataset.csv")] == ["S025"]

"""The reading code of CLAM, TRIDENT and STAMP, reduced to what touches our files (written here
from the upstream source, not copied; each function names the file and function it follows).

CLAM     github.com/mahmoodlab/CLAM      @ 53e2409 (2025-04-14)
TRIDENT  github.com/mahmoodlab/TRIDENT   @ a91fa84 (2026-06-24)
STAMP    github.com/KatherLab/STAMP      @ c54ce06 (2026-04-24)
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import h5py
import numpy as np


def read_csv_columns(path, columns) -> list[dict]:
    """pd.read_csv(path, usecols=columns, dtype=str) as a list of rows (KeyError for a missing column,
    as pandas raises ValueError: the reader fails either way)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for c in columns:
        if rows and c not in rows[0]:
            raise KeyError(f"{path}: no column {c!r}")
    return [{c: row[c] for c in columns} for row in rows]


# -- CLAM ---------------------------------------------------------------------------------------
def clam_mil_dataset_item(data_dir, slide_id, use_h5: bool):
    """dataset_modules/dataset_generic.py Generic_MIL_Dataset.__getitem__: with load_from_h5(True)
    DIR/h5_files/{slide_id}.h5 ['features'], ['coords']; else torch.load(DIR/pt_files/{slide_id}.pt)
    (here weights_only=True: a tensor needs nothing else, and we never unpickle)."""
    import torch

    if use_h5:
        with h5py.File(os.path.join(data_dir, "h5_files", f"{slide_id}.h5"), "r") as f:
            return torch.from_numpy(f["features"][:]), f["coords"][:]
    return torch.load(os.path.join(data_dir, "pt_files", f"{slide_id}.pt"), weights_only=True), None


def clam_patient_data(csv_path, label_dict):
    """Generic_WSI_Classification_Dataset: df_prep maps `label` through label_dict, then
    patient_data_prep groups slides by `case_id` (label = max over a patient's slides)."""
    rows = read_csv_columns(csv_path, ["case_id", "slide_id", "label"])
    patients = {}
    for row in rows:
        patients.setdefault(row["case_id"], []).append(label_dict[row["label"]])
    return [r["slide_id"] for r in rows], {p: max(labels) for p, labels in patients.items()}


def clam_bag_fp_reads(h5_path, wsi):
    """dataset_modules/dataset_h5.py Whole_Slide_Bag_FP: patch_level and patch_size from
    f['coords'].attrs; each item is wsi.read_region(coord, patch_level, (patch_size, patch_size))."""
    with h5py.File(h5_path, "r") as f:
        patch_level = int(f["coords"].attrs["patch_level"])
        patch_size = int(f["coords"].attrs["patch_size"])
        coords = f["coords"][:]
    return patch_level, patch_size, coords, [wsi.read_region(tuple(int(v) for v in c), patch_level,
                                                             (patch_size, patch_size)).convert("RGB")
                                             for c in coords[:2]]


def clam_extract_list(csv_path, data_h5_dir, slide_ext):
    """extract_features_fp.py: Dataset_All_Bags(csv_path)['slide_id'], .split(slide_ext)[0], then
    DATA_H5_DIR/patches/{slide_id}.h5."""
    ids = [row["slide_id"].split(slide_ext)[0] for row in read_csv_columns(csv_path, ["slide_id"])]
    return {sid: os.path.join(data_h5_dir, "patches", sid + ".h5") for sid in ids}


# -- TRIDENT ------------------------------------------------------------------------------------
def trident_read_coords(path):
    """trident/IO.py read_coords: (dict(f['coords'].attrs), f['coords'][:])."""
    with h5py.File(path, "r") as f:
        return dict(f["coords"].attrs), f["coords"][:]


def trident_patcher_level0_side(coords_attrs) -> int:
    """trident/wsi_objects/WSI.py extract_patch_features: patch_size, level0_magnification and
    target_magnification must all be there (else it falls back to the CLAM reader); WSIPatcher then
    sets src_pixel_size = 10 / src_mag, dst_pixel_size = 10 / dst_mag and reads
    round(patch_size · dst / src) level-0 pixels (WSIPatcher.__init__)."""
    patch_size = coords_attrs.get("patch_size")
    src_mag = coords_attrs.get("level0_magnification")
    dst_mag = coords_attrs.get("target_magnification")
    if None in (patch_size, src_mag, dst_mag):
        raise KeyError("Missing attributes in coords_attrs.")
    return round(patch_size * (10 / dst_mag) / (10 / src_mag))


def trident_slide_encoder_batch(features_path):
    """trident/wsi_objects/WSI.py extract_slide_features: features, coords and dict(coords.attrs);
    the slide encoders read batch['attributes']['patch_size_level0'] (slide_encoder_models/load.py)."""
    with h5py.File(features_path, "r") as f:
        coords, features = f["coords"][:], f["features"][:]
        attrs = dict(f["coords"].attrs)
    attrs["patch_size_level0"] = int(attrs["patch_size_level0"])   # KeyError on a file without it
    return {"features": features, "coords": coords, "attributes": attrs}


def trident_collect_valid_slides(wsi_dir, custom_list_path):
    """trident/IO.py collect_valid_slides with a custom list: the `wsi` column, each joined to
    wsi_dir and checked to exist."""
    rel = [row["wsi"] for row in read_csv_columns(custom_list_path, ["wsi"]) if row["wsi"]]
    missing = [r for r in rel if not os.path.exists(os.path.join(wsi_dir, r))]
    if missing:
        raise ValueError(f"Slide {missing[0]!r} not found in {wsi_dir!r}")
    return [os.path.join(wsi_dir, r) for r in rel]


# -- STAMP --------------------------------------------------------------------------------------
def stamp_detect_feature_type(feature_dir) -> str:
    """src/stamp/modeling/data.py detect_feature_type: one feat_type over every *.h5 (missing:
    "tile")."""
    types = set()
    for file in Path(feature_dir).rglob("*.h5"):
        with h5py.File(file, "r") as h5:
            ft, enc = h5.attrs.get("feat_type"), h5.attrs.get("encoder")
            types.add(str(ft) if ft is not None or enc is not None else "tile")
    if len(types) != 1:
        raise RuntimeError(f"feature types {types}")
    return types.pop()


def stamp_get_coords(h5):
    """src/stamp/modeling/data.py get_coords, the "newer STAMP format" branch: coords are µm when
    attrs['tile_size_um'] is set; tile_size_px from attrs; CoordsInfo.mpp = tile_size_um / tile_size_px."""
    coords = h5["coords"][:]
    tile_size_um = h5.attrs.get("tile_size_um", None)
    if not tile_size_um:
        raise RuntimeError("unable to infer coordinates from feature file")
    if h5.attrs.get("stamp_version") is not None:
        raise RuntimeError("a stamp_version is compared with the installed STAMP's")
    tile_size_px = int(h5.attrs["tile_size_px"]) if "tile_size_px" in h5.attrs else None
    return coords, float(tile_size_um), tile_size_px


def stamp_bag_feats(h5):
    """src/stamp/modeling/data.py BagDataset.__getitem__: h5['feats'] (else h5['patch_embeddings'])."""
    return h5["feats"][()] if "feats" in h5 else h5["patch_embeddings"][()]


def stamp_patient_data(clini_table, slide_table, feature_dir, ground_truth_label="label"):
    """patient_to_ground_truth_from_clini_table_ (PATIENT unique: set_index verify_integrity),
    slide_to_patient_from_slide_table_ (FILENAME ends in .h5 and is unique, feature_dir / FILENAME, a
    dict in the table's row order), then filter_complete_patient_data_ (patients with a label and an
    existing feature file). Its grouping is itertools.groupby over that dict, collected into a dict:
    groupby yields one group per RUN of adjacent rows of a patient, and a later run of the same
    patient replaces the earlier one, so only the last run of a patient's rows is kept
    (src/stamp/modeling/data.py @ c54ce06, filter_complete_patient_data_)."""
    from itertools import groupby

    clini = read_csv_columns(clini_table, ["PATIENT", ground_truth_label])
    patients = [r["PATIENT"] for r in clini]
    if len(set(patients)) != len(patients):
        raise ValueError("Index has duplicate keys (clini table)")
    truth = {r["PATIENT"]: r[ground_truth_label] for r in clini if r[ground_truth_label]}
    slides = read_csv_columns(slide_table, ["PATIENT", "FILENAME"])
    for row in slides:
        if not row["FILENAME"].endswith(".h5"):
            raise ValueError(f"missing the .h5 extension: {row['FILENAME']}")
    names = [row["FILENAME"] for row in slides]
    if len(set(names)) != len(names):
        raise ValueError("Index has duplicate keys (slide table)")
    slide_to_patient = {Path(feature_dir) / row["FILENAME"]: row["PATIENT"] for row in slides}
    patient_to_slides = {}
    for patient, run in groupby(slide_to_patient, key=slide_to_patient.__getitem__):
        patient_to_slides[patient] = set(run)        # a later run of rows replaces an earlier one
    out = {}
    for patient, label in truth.items():
        existing = {f for f in patient_to_slides.get(patient, ()) if f.exists()}
        if existing:
            out[patient] = (label, existing)
    return out


def footprint_um_at(level_downsample: float, side_px: int, slide_mpp: float) -> float:
    return side_px * level_downsample * slide_mpp



"""TRIDENT's layout (github.com/mahmoodlab/TRIDENT, read at commit a91fa84):

    OUT/{mag}x_{patch_size}px_{overlap}px_overlap/
        patches/{slide_id}_patches.h5        coords (N, 2) level-0 x, y; attrs on `coords`:
                                             patch_size, patch_size_level0, level0_magnification,
                                             target_magnification, overlap, name, savetodir,
                                             level0_width, level0_height (trident/IO.py coords_to_h5;
                                             read by read_coords and WSI.extract_patch_features)
        features_{encoder}/{slide_id}.h5     features (N, D), coords with the same attrs (what
                                             WSI.extract_patch_features writes; its slide encoders read
                                             f['coords'].attrs['patch_size_level0'],
                                             WSI.extract_slide_features)
    OUT/wsi_list.csv                         wsi, mpp (its --custom_list_of_wsis) and slide_id,
                                             patient_id, label, cohort: also a wsi-pipeline manifest

Magnifications are nominal, 10 / mpp, the conversion TRIDENT's WSIPatcher makes back, so its
level-0 patch side patch_size · (10 / target_mag) / (10 / level0_mag) is our patch_size_level0.
TRIDENT's Processor names files by the slide file's stem; these are named by slide_id (the same
when slide files are named {slide_id}.ext).
"""

from __future__ import annotations

import h5py
import numpy as np

from ..io import atomic_path, write_csv_atomic
from ..run.manifest import Manifest
from ..tiling.coords_h5 import magnification_attrs
from .common import ExportOut, ExportSlide, extra_columns
from .targets import register

LIST_COLUMNS = ["wsi", "mpp", "slide_id", "patient_id", "label", "cohort"]


def fmt_magnification(mag: float) -> str:
    """As TRIDENT's Processor writes it in folder names: 20, 2.5, 33.3333."""
    return str(int(round(mag))) if abs(mag - round(mag)) < 1e-9 else f"{mag:g}"


def trident_coords_attrs(slide: ExportSlide, savetodir: str) -> dict:
    attrs = {"patch_size": slide.patch_size_px, "patch_size_level0": slide.patch_size_level0,
             **magnification_attrs(slide.slide_mpp, slide.target_mpp), "overlap": slide.overlap_px,
             "name": slide.slide_id, "savetodir": savetodir, "slide_mpp": slide.slide_mpp,
             "target_mpp": slide.target_mpp}
    if slide.level0_wh is not None:
        attrs.update(level0_width=slide.level0_wh[0], level0_height=slide.level0_wh[1])
    return attrs


def job_folder(slide: ExportSlide) -> str:
    mag = magnification_attrs(slide.slide_mpp, slide.target_mpp)["target_magnification"]
    return f"{fmt_magnification(mag)}x_{slide.patch_size_px}px_{slide.overlap_px}px_overlap"


class TridentTarget:
    name = "trident"
    help = "TRIDENT: {mag}x_{px}px_{overlap}px_overlap/patches/ + features_{encoder}/, wsi_list.csv"
    tables = ("wsi_list.csv",)

    def manifest_problems(self, manifest: Manifest) -> list[str]:
        return []

    def write_slide(self, out: ExportOut, slide: ExportSlide) -> dict:
        sid = out.name(slide.slide_id, "slide_id")
        folder = out.name(job_folder(slide), "TRIDENT job folder")
        encoder = out.name(slide.encoder, f"slide {sid!r}: encoder")
        coords = slide.level0_xy.astype(np.int64)
        patches = out.path(folder, "patches", f"{sid}_patches.h5")
        with atomic_path(patches) as tmp:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("coords", data=coords)
                for key, value in trident_coords_attrs(slide, str(patches.parent.parent)).items():
                    ds.attrs[key] = value
        feats_dir = out.path(folder, f"features_{encoder}")
        with atomic_path(feats_dir / f"{sid}.h5") as tmp:
            with h5py.File(tmp, "w") as f:
                fs = f.create_dataset("features", data=np.asarray(slide.features, dtype=np.float32))
                for key, value in {"name": sid, "savetodir": str(feats_dir), "encoder": encoder}.items():
                    fs.attrs[key] = value
                ds = f.create_dataset("coords", data=coords)
                for key, value in trident_coords_attrs(slide, str(patches.parent.parent)).items():
                    ds.attrs[key] = value
        r = slide.record
        return {"wsi": str(r.path), "mpp": slide.slide_mpp, "slide_id": sid, "patient_id": r.patient_id,
                "label": r.label, "cohort": r.cohort, "extra": r.extra_columns,
                "files": [f"{folder}/patches/{sid}_patches.h5", f"{folder}/features_{encoder}/{sid}.h5"]}

    def write_tables(self, out: ExportOut, rows: list[dict]) -> list:
        extras = extra_columns(rows, set(LIST_COLUMNS) | {"path"})
        path = out.path("wsi_list.csv")
        write_csv_atomic(path, LIST_COLUMNS + extras,
                         [[row[c] for c in LIST_COLUMNS] + [row["extra"].get(c, "") for c in extras]
                          for row in rows])
        return [path]


TRIDENT = register(TridentTarget())

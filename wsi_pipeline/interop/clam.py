"""CLAM's layout (github.com/mahmoodlab/CLAM, read at commit 53e2409):

    OUT/h5_files/{slide_id}.h5     features (N, D) float32, coords (N, 2) level-0 x, y
                                   (Generic_MIL_Dataset.__getitem__ with load_from_h5(True),
                                    dataset_modules/dataset_generic.py)
    OUT/pt_files/{slide_id}.pt     torch.save of the (N, D) float32 tensor (its default reader, same place)
    OUT/patches/{slide_id}.h5      coords with attrs patch_size, patch_level: create_patches_fp.py's
                                   output, what extract_features_fp.py re-extracts from
                                   (Whole_Slide_Bag_FP, dataset_modules/dataset_h5.py)
    OUT/dataset.csv                case_id, slide_id, label (+ cohort, the manifest's extra columns)
    OUT/process_list.csv           slide_id, process, status, patch_size, patch_level, ... (the
                                   --csv_path of extract_features_fp.py)

CLAM's patch_size is pixels read at patch_level, not resized; ours is pixels at target_mpp. So
patches/ states our read: read_size_px at our patch_level, the same tissue (footprint_um). CLAM's
--target_patch_size then resizes to our patch_size_px (process_list.csv's target_patch_size), which
gives our µm/px.
"""

from __future__ import annotations

import h5py
import numpy as np

from ..io import atomic_path, write_csv_atomic
from ..run.manifest import Manifest
from .common import ExportOut, ExportSlide, extra_columns
from .targets import register

DATASET_COLUMNS = ["case_id", "slide_id", "label", "cohort"]
PROCESS_COLUMNS = ["slide_id", "process", "status", "patch_size", "patch_level", "downsample",
                   "target_patch_size", "patch_size_level0", "slide_mpp", "target_mpp", "footprint_um"]


def clam_patch_attrs(slide: ExportSlide) -> dict:
    """coords attrs in CLAM's meaning (patch_size px at patch_level), plus ours for the record."""
    return {
        "patch_size": slide.read_size_px, "patch_level": slide.patch_level,
        "downsample": np.array([slide.level_downsample, slide.level_downsample]),
        "name": slide.slide_id, "patch_size_level0": slide.patch_size_level0,
        "target_patch_size": slide.patch_size_px, "slide_mpp": slide.slide_mpp,
        "target_mpp": slide.target_mpp, "footprint_um": slide.footprint_um,
    }


class ClamTarget:
    name = "clam"
    help = "CLAM: h5_files/ + pt_files/ features, patches/ coords, dataset.csv, process_list.csv"
    tables = ("dataset.csv", "process_list.csv")

    def manifest_problems(self, manifest: Manifest) -> list[str]:
        return []  # CLAM takes a patient's label from its slides (patient_voting), any mix

    def write_slide(self, out: ExportOut, slide: ExportSlide) -> dict:
        import torch

        sid = out.name(slide.slide_id, "slide_id")
        features = np.ascontiguousarray(slide.features, dtype=np.float32)
        attrs = clam_patch_attrs(slide)
        with atomic_path(out.path("h5_files", f"{sid}.h5")) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=features)
                f.create_dataset("coords", data=slide.level0_xy.astype(np.int64))
        with atomic_path(out.path("pt_files", f"{sid}.pt")) as tmp:
            torch.save(torch.from_numpy(features), tmp)
        with atomic_path(out.path("patches", f"{sid}.h5")) as tmp:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset("coords", data=slide.level0_xy.astype(np.int64))
                for key, value in attrs.items():
                    ds.attrs[key] = value
        r = slide.record
        return {"case_id": r.patient_id, "slide_id": sid, "label": r.label, "cohort": r.cohort,
                "extra": r.extra_columns, "process": 1, "status": "processed",
                "files": [f"h5_files/{sid}.h5", f"pt_files/{sid}.pt", f"patches/{sid}.h5"],
                **{k: attrs[k] for k in ("patch_size", "patch_level", "target_patch_size",
                                         "patch_size_level0", "slide_mpp", "target_mpp", "footprint_um")},
                "downsample": slide.level_downsample}

    def write_tables(self, out: ExportOut, rows: list[dict]) -> list:
        extras = extra_columns(rows, set(DATASET_COLUMNS))
        dataset = out.path("dataset.csv")
        write_csv_atomic(dataset, DATASET_COLUMNS + extras,
                         [[row[c] for c in DATASET_COLUMNS] + [row["extra"].get(c, "") for c in extras]
                          for row in rows])
        process = out.path("process_list.csv")
        write_csv_atomic(process, PROCESS_COLUMNS, [[row[c] for c in PROCESS_COLUMNS] for row in rows])
        return [dataset, process]


CLAM = register(ClamTarget())

"""STAMP's layout (github.com/KatherLab/STAMP, read at commit c54ce06):

    OUT/features/{slide_id}.h5   feats (N, D) float32; coords (N, 2) µm, top-left (level-0 px ×
                                 slide µm/px); attrs feat_type "tile", extractor, unit "um",
                                 tile_size_um, tile_size_px (src/stamp/preprocessing/__init__.py
                                 writes these; src/stamp/modeling/data.py get_coords and
                                 BagDataset read them, detect_feature_type reads feat_type)
    OUT/clini.csv                PATIENT, label, cohort (+ extra columns equal over a patient's
                                 slides): one row per patient (patient_to_ground_truth_from_clini_table_)
    OUT/slide.csv                PATIENT, FILENAME ({slide_id}.h5 under features/), slide_id (+ the
                                 manifest's extra columns) (slide_to_patient_from_slide_table_);
                                 a patient's slides on adjacent rows, whatever the manifest order
                                 (filter_complete_patient_data_ groups with itertools.groupby)

STAMP config: feature_dir OUT/features, clini_table OUT/clini.csv, slide_table OUT/slide.csv,
patient_label PATIENT, filename_label FILENAME, ground_truth_label label.
tile_size_um is patch_size_px × target_mpp, so STAMP's mpp (tile_size_um / tile_size_px) is ours.
"""

from __future__ import annotations

from collections import defaultdict

import h5py
import numpy as np

from ..io import atomic_path, write_csv_atomic
from ..run.manifest import Manifest
from .common import ExportOut, ExportSlide, extra_columns
from .targets import register

CLINI_COLUMNS = ["PATIENT", "label", "cohort"]
SLIDE_COLUMNS = ["PATIENT", "FILENAME", "slide_id"]


class StampTarget:
    name = "stamp"
    help = "STAMP: features/{slide_id}.h5 (feats, µm coords), clini.csv, slide.csv"
    tables = ("clini.csv", "slide.csv")

    def manifest_problems(self, manifest: Manifest) -> list[str]:
        """STAMP's clinical table holds one label per patient: a patient whose slides differ cannot
        be written (naming the patient and the rows)."""
        labels = defaultdict(dict)
        for r in manifest:
            labels[r.patient_id].setdefault(r.label, r.row)
        return [f"patient {patient!r}: slides labelled {', '.join(f'{k!r} (row {v})' for k, v in seen.items())}; "
                f"STAMP's clinical table has one label per patient"
                for patient, seen in labels.items() if len(seen) > 1]

    def write_slide(self, out: ExportOut, slide: ExportSlide) -> dict:
        sid = out.name(slide.slide_id, "slide_id")
        attrs = {"feat_type": "tile", "extractor": slide.encoder, "unit": "um",
                 "tile_size_um": slide.patch_size_px * slide.target_mpp, "tile_size_px": slide.patch_size_px,
                 "slide_mpp": slide.slide_mpp, "footprint_um": slide.footprint_um, "slide_id": sid}
        with atomic_path(out.path("features", f"{sid}.h5")) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("feats", data=np.asarray(slide.features, dtype=np.float32))
                f.create_dataset("coords", data=slide.level0_xy.astype(np.float64) * slide.slide_mpp)
                for key, value in attrs.items():
                    f.attrs[key] = value
        r = slide.record
        return {"PATIENT": r.patient_id, "FILENAME": f"{sid}.h5", "slide_id": sid, "label": r.label,
                "cohort": r.cohort, "extra": r.extra_columns, "files": [f"features/{sid}.h5"]}

    def write_tables(self, out: ExportOut, rows: list[dict]) -> list:
        by_patient: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_patient[row["PATIENT"]].append(row)
        extras = extra_columns(rows, set(CLINI_COLUMNS) | set(SLIDE_COLUMNS))
        per_patient = [c for c in extras
                       if all(len({r["extra"].get(c, "") for r in group}) == 1 for group in by_patient.values())]
        clini = out.path("clini.csv")
        write_csv_atomic(clini, CLINI_COLUMNS + per_patient,
                         [[group[0]["PATIENT"], group[0]["label"], group[0]["cohort"]]
                          + [group[0]["extra"].get(c, "") for c in per_patient]
                          for group in by_patient.values()])
        slide = out.path("slide.csv")
        # A patient's slides on adjacent rows: STAMP groups the slide table with itertools.groupby
        # (filter_complete_patient_data_, src/stamp/modeling/data.py), which keeps only the last run
        # of rows of a patient, so a patient listed apart would lose slides without a word.
        write_csv_atomic(slide, SLIDE_COLUMNS + extras,
                         [[row[c] for c in SLIDE_COLUMNS] + [row["extra"].get(c, "") for c in extras]
                          for group in by_patient.values() for row in group])
        return [clini, slide]


STAMP = register(StampTarget())

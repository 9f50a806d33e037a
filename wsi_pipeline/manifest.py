"""Manifests: CSV rows `slide_id, path, patient_id, label, cohort` (+ optional `mpp`, `modality`).

`wsi` (TRIDENT's batch-CSV column) is accepted for `path` when there is no `path` column. Any other
column is kept (`SlideRecord.extra`, `Manifest.extra_columns`) and reported once, as one warning:
so one CSV can also carry another tool's columns (TRIDENT's `wsi`, CLAM's `case_id`, clinical data).

A row with `modality` CT or MR is a radiology volume (NIfTI file or DICOM series folder; its
`slide_id` is the volume's id); empty or absent `modality` is a whole-slide image.

Validation collects every problem (row and field named) and raises them together, so a user fixes a
manifest in one pass. Missing slide files are reported here by `validate`, but batch stages treat
them as per-slide failures so one absent file does not stop a cohort.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ManifestError
from .names import name_problem, short_repr

REQUIRED_COLUMNS = ("slide_id", "path", "patient_id", "label", "cohort")
OPTIONAL_COLUMNS = ("mpp", "modality")
# Column names read as another (only when that one is absent): TRIDENT calls the slide file `wsi`.
COLUMN_ALIASES = {"wsi": "path"}
VOLUME_MODALITIES = ("CT", "MR")
# slide_id and cohort become file and folder names under the run folder, Snakemake wildcards and
# shell words: both follow the one name rule (wsi_pipeline.names). patient_id and label never become
# paths (they are compared and written into CSV/JSON cells), so any text is fine there.
PATH_NAME_COLUMNS = ("slide_id", "cohort")

log = logging.getLogger("wsi_pipeline")


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    path: Path          # absolute; relative manifest paths resolve against the manifest's folder
    patient_id: str
    label: str          # "" where unlabelled (allowed unless labels are required)
    cohort: str
    mpp: float | None   # manifest override of the file's resolution, µm/px
    row: int            # 1-based data row number (header is row 0), for messages
    modality: str = ""  # "" for a slide; "CT" or "MR" for a volume
    # The row's cells in columns the pipeline does not use, as (column, text) pairs (a tuple: the
    # record stays hashable); never a path or a name, only carried to exports.
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def extra_columns(self) -> dict[str, str]:
        return dict(self.extra)

    @property
    def is_volume(self) -> bool:
        return self.modality in VOLUME_MODALITIES


@dataclass(frozen=True)
class Manifest:
    path: Path
    records: tuple[SlideRecord, ...]
    extra_columns: tuple[str, ...] = ()   # columns kept but not used (manifest order)

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def by_id(self) -> dict[str, SlideRecord]:
        return {r.slide_id: r for r in self.records}

    def select(self, slide_ids) -> "Manifest":
        wanted = set(slide_ids)
        unknown = wanted - {r.slide_id for r in self.records}
        if unknown:
            raise ManifestError(self.path, [f"slide_id {s!r} not in manifest" for s in sorted(unknown)])
        return Manifest(self.path, tuple(r for r in self.records if r.slide_id in wanted), self.extra_columns)

    def without(self, slide_ids) -> "Manifest":
        """The manifest less `slide_ids`; an id it lacks is an error (a typo would otherwise keep
        a slide the user meant to leave out)."""
        unwanted = {s for s in slide_ids if s}
        unknown = unwanted - {r.slide_id for r in self.records}
        if unknown:
            raise ManifestError(self.path, [f"slide_id {s!r} (to leave out) not in manifest" for s in sorted(unknown)])
        return Manifest(self.path, tuple(r for r in self.records if r.slide_id not in unwanted),
                        self.extra_columns)


def load_manifest(path: str | Path, *, require_labels: bool = False, check_files: bool = False) -> Manifest:
    """Parse and validate a manifest. Raises `ManifestError` listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [f"file not found: {path}"])
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            raw_rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else v
                         for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(path, [f"not a readable CSV: {exc}"]) from None

    problems = []
    aliases = {alias: column for alias, column in COLUMN_ALIASES.items()
               if alias in header and column not in header}
    for alias, column in aliases.items():
        for row in raw_rows:
            row[column] = row.pop(alias, "")
    header = [aliases.get(c, c) for c in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        alias_note = "; a `wsi` column is read as `path`" if "path" in missing else ""
        raise ManifestError(path, [f"missing column(s): {', '.join(missing)} "
                                   f"(required: {', '.join(REQUIRED_COLUMNS)}{alias_note})"])
    if "" in header:
        problems.append(f"column {header.index('') + 1} has no name in the header")
    extra = [c for c in header if c and c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        # Kept, not refused: one CSV may serve TRIDENT or a clinical table too. Said once, so a
        # misspelt optional column (`mpp_um`) does not pass unnoticed.
        log.warning(f"{path}: column(s) not used by wsi-pipeline, kept as they are: {', '.join(extra)} "
                    f"(used: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})")
    if not raw_rows:
        problems.append("no slide rows")

    records, seen_ids, patient_cohort = [], {}, {}
    for i, row in enumerate(raw_rows, start=1):
        where = f"row {i}"
        if None in row:  # DictReader puts surplus cells under the key None
            problems.append(f"{where}: more cells than columns")
        slide_id = row.get("slide_id", "")
        if slide_id:
            where = f"row {i} (slide_id {short_repr(slide_id)})"
        for col in ("slide_id", "path", "patient_id", "cohort"):
            if not row.get(col):
                problems.append(f"{where}: empty {col}")
        for col in PATH_NAME_COLUMNS:
            value = row.get(col)
            problem = name_problem(value) if value else None
            if problem:
                problems.append(f"{where}: {col} {problem}")
        if slide_id in seen_ids:
            problems.append(f"{where}: duplicate slide_id (first at row {seen_ids[slide_id]})")
        elif slide_id:
            seen_ids[slide_id] = i
        label = row.get("label", "")
        if require_labels and not label:
            problems.append(f"{where}: empty label (training needs one for every slide)")
        mpp = None
        mpp_text = row.get("mpp", "") or ""
        if mpp_text:
            try:
                mpp = float(mpp_text)
                if not (math.isfinite(mpp) and mpp > 0):
                    raise ValueError
            except ValueError:
                problems.append(f"{where}: mpp must be a positive number of µm per pixel, got {mpp_text!r}")
                mpp = None
        modality = row.get("modality", "") or ""
        if modality and modality not in VOLUME_MODALITIES:
            problems.append(f"{where}: modality must be empty (a slide) or one of "
                            f"{', '.join(VOLUME_MODALITIES)} (a volume), got {modality!r}")
        if modality and mpp is not None:
            problems.append(f"{where}: mpp is for slides; a volume's spacing comes from its file")
        patient, cohort = row.get("patient_id", ""), row.get("cohort", "")
        if patient and cohort:
            first = patient_cohort.setdefault(patient, (cohort, i))
            if first[0] != cohort:
                problems.append(f"{where}: patient {patient!r} is in cohort {cohort!r} here and in "
                                f"{first[0]!r} at row {first[1]} (a patient belongs to one cohort)")
        slide_path = Path(row.get("path", "") or ".")
        if not slide_path.is_absolute():
            slide_path = (path.parent / slide_path).resolve()
        exists = slide_path.exists() if modality else slide_path.is_file()   # a DICOM series is a folder
        if check_files and row.get("path") and not exists:
            problems.append(f"{where}: {'volume' if modality else 'slide'} file not found: {slide_path}")
        records.append(SlideRecord(slide_id, slide_path, patient, label, cohort, mpp, i, modality,
                                   tuple((c, row.get(c) or "") for c in extra)))

    if problems:
        raise ManifestError(path, problems)
    return Manifest(path, tuple(records), tuple(extra))

"""Manifests: CSV rows `slide_id, path, patient_id, label, cohort` (+ optional `mpp`, `modality`,
`volume_id`, `truth_mask`, `frame`: the frame of a 4-D volume file).

`wsi` (TRIDENT's batch-CSV column) is accepted for `path` when there is no `path` column. Any other
column is kept (`SlideRecord.extra`, `Manifest.extra_columns`) and reported once, as one warning:
so one CSV can also carry another tool's columns (TRIDENT's `wsi`, CLAM's `case_id`, clinical data).

A row with `modality` CT or MR is a radiology volume (NIfTI file or DICOM series folder; its
`slide_id`, or its `volume_id` (an alias column for volume rows), is the volume's id; `truth_mask`
optionally names a lesion mask NIfTI on the scan's grid, for the heatmap stage's Dice); empty or
absent `modality` is a whole-slide image. A cohort is all slides or all volumes: their features are
not comparable, so one cohort mixing both is refused.

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

from ..errors import ManifestError
from .names import name_problem, short_repr

REQUIRED_COLUMNS = ("slide_id", "path", "patient_id", "label", "cohort")
OPTIONAL_COLUMNS = ("mpp", "modality", "volume_id", "truth_mask", "frame")
# A manifest of volumes may name its id column volume_id instead of slide_id.
ID_COLUMNS = ("slide_id", "volume_id")
# Column names read as another (only when that one is absent): TRIDENT calls the slide file `wsi`.
COLUMN_ALIASES = {"wsi": "path"}
_EXTRA_REPORTED: set[tuple[str, tuple[str, ...]]] = set()   # (manifest, extra columns) already warned of
VOLUME_MODALITIES = ("CT", "MR")
# slide_id and cohort become file and folder names under the run folder, Snakemake wildcards and
# shell words: both follow the one name rule (wsi_pipeline.run.names). patient_id and label never become
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
    truth_mask: Path | None = None  # volumes: lesion truth mask (NIfTI on the scan's grid), absolute
    # The row's cells in columns the pipeline does not use, as (column, text) pairs (a tuple: the
    # record stays hashable); never a path or a name, only carried to exports.
    extra: tuple[tuple[str, str], ...] = ()
    frame: int | None = None  # volumes: which frame (0-based) of a 4-D file (a time series) to read

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


def open_csv(path: str | Path):
    """A CSV file opened as the manifest reader reads it: UTF-8 with or without a BOM (Excel's "CSV
    UTF-8" writes one), any line ending (csv handles CRLF / CR with newline="")."""
    return open(path, newline="", encoding="utf-8-sig")


def load_manifest(path: str | Path, *, require_labels: bool = False, check_files: bool = False,
                  check_same_files: bool = False) -> Manifest:
    """Parse and validate a manifest. Raises `ManifestError` listing every problem found.

    `check_same_files`: two rows naming one image (a link, a copy) are a problem naming both rows
    (wsi_pipeline.run.same_file; one stat per row). `validate-manifest`, `run` and every stage command
    check it."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [f"file not found: {path}"])
    try:
        with open_csv(path) as fh:
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
    missing = [c for c in REQUIRED_COLUMNS if c not in header
               and not (c == "slide_id" and "volume_id" in header)]
    if missing:
        alias_note = "; a `wsi` column is read as `path`" if "path" in missing else ""
        raise ManifestError(path, [f"missing column(s): {', '.join(missing)} "
                                   f"(required: {', '.join(REQUIRED_COLUMNS)}{alias_note})"])
    if "" in header:
        problems.append(f"column {header.index('') + 1} has no name in the header")
    extra = [c for c in header if c and c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra and (str(path), tuple(extra)) not in _EXTRA_REPORTED:
        # Kept, not refused: one CSV may serve TRIDENT or a clinical table too. Said once per
        # process (a command loads its manifest more than once), so a misspelt optional column
        # (`mpp_um`) does not pass unnoticed.
        _EXTRA_REPORTED.add((str(path), tuple(extra)))
        log.warning(f"{path}: column(s) not used by wsi-pipeline, kept as they are: {', '.join(extra)} "
                    f"(used: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)})")
    if not raw_rows:
        problems.append("no slide rows")

    records, seen_ids, patient_cohort, file_rows = [], {}, {}, []
    for i, row in enumerate(raw_rows, start=1):
        where = f"row {i}"
        if None in row:  # DictReader puts surplus cells under the key None
            problems.append(f"{where}: more cells than columns")
        modality = row.get("modality", "") or ""
        id_column = "volume_id" if row.get("volume_id") and not row.get("slide_id") else "slide_id"
        slide_id = row.get(id_column, "")
        if slide_id:
            where = f"row {i} ({id_column} {short_repr(slide_id)})"
        if row.get("slide_id") and row.get("volume_id"):
            problems.append(f"{where}: both slide_id and volume_id are filled; give the id once")
        if row.get("volume_id") and not modality:
            problems.append(f"{where}: volume_id is for volume rows; set modality (CT or MR) or use slide_id")
        if not slide_id:
            problems.append(f"{where}: empty {' or '.join(c for c in ID_COLUMNS if c in header)}")
        for col in ("path", "patient_id", "cohort"):
            if not row.get(col):
                problems.append(f"{where}: empty {col}")
        for col, value in ((id_column, slide_id), ("cohort", row.get("cohort"))):
            problem = name_problem(value) if value else None
            if problem:
                problems.append(f"{where}: {col} {problem}")
        if slide_id in seen_ids:
            problems.append(f"{where}: duplicate {id_column} (first at row {seen_ids[slide_id]})")
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
        if row.get("path"):
            file_rows.append((where, slide_path, (row.get("patient_id") or "").strip()))
        truth_mask = None
        if row.get("truth_mask"):
            if not modality:
                problems.append(f"{where}: truth_mask is for volume rows (modality CT or MR)")
            truth_mask = Path(row["truth_mask"])
            if not truth_mask.is_absolute():
                truth_mask = (path.parent / truth_mask).resolve()
        frame = None
        if row.get("frame"):
            if not modality:
                problems.append(f"{where}: frame is for volume rows (a 4-D NIfTI file's time frame)")
            elif not row["frame"].isdigit():
                problems.append(f"{where}: frame must be a frame index 0, 1, 2 ... of the 4-D file, "
                                f"got {row['frame']!r}")
            else:
                frame = int(row["frame"])
        records.append(SlideRecord(slide_id, slide_path, patient, label, cohort, mpp, i, modality, truth_mask,
                                   tuple((c, row.get(c) or "") for c in extra), frame))

    problems += mixed_cohort_problems(records)
    if check_same_files:
        from .same_file import same_file_problems

        problems += same_file_problems(file_rows)
    if problems:
        raise ManifestError(path, problems)
    return Manifest(path, tuple(records), tuple(extra))


def mixed_cohort_problems(records) -> list[str]:
    """One problem per cohort that holds both slides and volumes: a cohort trains one model on one
    kind of feature (slide patches at µm/px vs. CT/MR instances), so the rows must be split."""
    problems = []
    for cohort in sorted({r.cohort for r in records if r.cohort}):
        rows = [r for r in records if r.cohort == cohort]
        slides = [r for r in rows if not r.is_volume]
        volumes = [r for r in rows if r.is_volume]
        if slides and volumes:
            def listed(rs):
                shown = ", ".join(f"{r.row} ({r.slide_id})" for r in rs[:5])
                return shown + (f" and {len(rs) - 5} more" if len(rs) > 5 else "")
            problems.append(f"cohort {cohort!r} mixes slides (rows {listed(slides)}) and volumes (rows "
                            f"{listed(volumes)}): their features are not comparable; give them separate cohorts")
    return problems

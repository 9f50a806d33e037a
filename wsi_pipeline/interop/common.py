"""What every export reads from a run (`ExportSlide`) and where it may write (`ExportOut`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SlideError, UnsafePathError
from ..features.features_h5 import coords_attrs, read_features_h5
from ..run.manifest import SlideRecord
from ..run.names import name_problem

# Tiling attrs an export needs (features.h5, on `coords` or, in older files, on the root).
REQUIRED_ATTRS = ("patch_size", "patch_size_level0", "patch_level", "read_size_px", "target_mpp", "slide_mpp")


@dataclass(frozen=True)
class ExportSlide:
    """One slide's features and the geometry of its patches, as our tiling defined them."""

    record: SlideRecord
    encoder: str
    features: np.ndarray          # (N, D) float32
    level0_xy: np.ndarray         # (N, 2) int64, top-left of each patch in level-0 pixels
    patch_size_px: int            # side at target_mpp (the encoder's input)
    patch_size_level0: int        # side in level-0 pixels
    patch_level: int              # pyramid level our extractor read from
    read_size_px: int             # side read at patch_level (then resized to patch_size_px)
    level_downsample: float       # downsample of patch_level
    target_mpp: float
    slide_mpp: float
    overlap_px: int               # at target_mpp
    level0_wh: tuple[int, int] | None

    @property
    def slide_id(self) -> str:
        return self.record.slide_id

    @property
    def footprint_um(self) -> float:
        """Side of a patch on the tissue, µm (what every exported layout must keep)."""
        return self.patch_size_level0 * self.slide_mpp


def load_export_slide(path: str | os.PathLike, record: SlideRecord) -> ExportSlide:
    """The features.h5 at `path` for `record`; a SlideError naming the slide when it is missing,
    not a slide's (a volume's coords are 3-D), or lacks a tiling attr (which one, and the fix)."""
    path = Path(path)
    sid = record.slide_id
    if not path.is_file():
        raise SlideError(sid, f"no features at {path}: run `wsi-pipeline extract` for it first")
    try:
        features, coords, root = read_features_h5(path)
        tiling = coords_attrs(path)
    except (OSError, KeyError, ValueError) as exc:
        raise SlideError(sid, f"unreadable features file {path}: {exc}") from None
    if record.is_volume or coords.shape[1] != 2:
        raise SlideError(sid, f"a {record.modality or '3-D'} volume: CLAM, TRIDENT and STAMP read "
                              f"slide features only (2-D level-0 coords)")
    missing = [k for k in REQUIRED_ATTRS if k not in tiling]
    if missing:
        raise SlideError(sid, f"{path} lacks {', '.join(missing)} (written by an older tile stage?): "
                              f"re-run tile and extract for it")
    level0_wh = ((int(tiling["level0_width"]), int(tiling["level0_height"]))
                 if "level0_width" in tiling and "level0_height" in tiling else None)
    return ExportSlide(
        record=record, encoder=str(root.get("encoder", "")), features=features, level0_xy=coords,
        patch_size_px=int(tiling["patch_size"]), patch_size_level0=int(tiling["patch_size_level0"]),
        patch_level=int(tiling["patch_level"]), read_size_px=int(tiling["read_size_px"]),
        level_downsample=float(tiling.get("downsample", 1.0)), target_mpp=float(tiling["target_mpp"]),
        slide_mpp=float(tiling["slide_mpp"]), overlap_px=int(tiling.get("overlap_px", 0)),
        level0_wh=level0_wh)


class ExportOut:
    """The export folder: every file an export writes is built here, from safe names only, and
    stays inside it (the run folder's rule, wsi_pipeline.run.folder, for OUT)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, *parts: str) -> Path:
        """OUT/parts...; each part that holds a name (slide_id, encoder) must be a safe name plus a
        fixed suffix, which the caller checks with `name`."""
        target = self.root.joinpath(*parts)
        root = os.path.normpath(os.path.abspath(self.root))
        resolved = os.path.normpath(os.path.abspath(target))
        if os.path.commonpath([root, resolved]) != root:
            raise UnsafePathError(f"{target} is outside the export folder {root}: refused")
        return target

    @staticmethod
    def name(value: str, what: str) -> str:
        problem = name_problem(value)
        if problem is not None:
            raise UnsafePathError(f"{what} {problem} (refusing to build a file name from it)")
        return value


# Every export writes this record into OUT: which tool, whose features, and each slide's table row
# with the files it wrote. It tells an earlier export of the same kind (which a new one may extend,
# merging its tables) from a folder of the user's (which is refused, unless --force).
EXPORT_RECORD = "wsi-pipeline-export.json"


def read_export_record(out: str | os.PathLike) -> dict | None:
    """OUT's export record, or None when there is none (or it is not one of ours)."""
    import json

    path = Path(out) / EXPORT_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = (isinstance(record, dict) and isinstance(record.get("to"), str)
          and isinstance(record.get("slides"), dict))
    return record if ok else None


def write_export_record(out: "ExportOut", to: str, encoder: str, run: str, rows: dict[str, dict]) -> None:
    from ..io import write_json_atomic

    write_json_atomic(out.path(EXPORT_RECORD), {"to": to, "encoder": encoder, "run": str(run),
                                                "slides": {sid: _plain(row) for sid, row in rows.items()}})


def _plain(value):
    """A table row as JSON holds it (numpy scalars as Python numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def files_present(out: "ExportOut", row: dict) -> bool:
    """Whether every file the export wrote for the row's slide is still in OUT."""
    files = row.get("files")
    return bool(files) and all(out.path(*Path(f).parts).is_file() for f in files)


def extra_columns(rows: list[dict], taken: set[str]) -> list[str]:
    """The manifest's extra columns (carried in rows["extra"]), less those a table already has."""
    seen: dict[str, None] = {}
    for row in rows:
        for column in row["extra"]:
            if column not in taken:
                seen.setdefault(column)
    return list(seen)

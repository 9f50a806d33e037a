"""The export targets, one registry: name -> writer (clam.py, trident.py, stamp.py).

A target writes each slide's files (`write_slide`, which returns the slide's table row, with the
files it wrote under "files", relative to OUT) and then
its tables for the slides written (`write_tables`); `manifest_problems` names what in a manifest
the tool cannot represent, checked before anything is written."""

from __future__ import annotations

from typing import Protocol

from ..errors import ConfigError
from ..manifest import Manifest
from .common import ExportOut, ExportSlide


class ExportTarget(Protocol):
    name: str
    help: str
    tables: tuple[str, ...]      # the tables write_tables writes in OUT (file names)

    def manifest_problems(self, manifest: Manifest) -> list[str]: ...

    def write_slide(self, out: ExportOut, slide: ExportSlide) -> dict: ...

    def write_tables(self, out: ExportOut, rows: list[dict]) -> list: ...


def _targets() -> dict[str, ExportTarget]:
    from .clam import CLAM
    from .stamp import STAMP
    from .trident import TRIDENT

    return {t.name: t for t in (CLAM, TRIDENT, STAMP)}


TARGETS = ("clam", "trident", "stamp")


def get_target(name: str) -> ExportTarget:
    targets = _targets()
    if name not in targets:
        raise ConfigError(f"--to: unknown export target {name!r}; one of {', '.join(TARGETS)}")
    return targets[name]


def extra_columns(rows: list[dict], taken: set[str]) -> list[str]:
    """The manifest's extra columns (carried in rows["extra"]), less those a table already has."""
    seen: dict[str, None] = {}
    for row in rows:
        for column in row["extra"]:
            if column not in taken:
                seen.setdefault(column)
    return list(seen)

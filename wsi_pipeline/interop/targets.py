"""The export targets, one registry: name -> writer.

Each writer module (clam.py, trident.py, stamp.py) registers its target here when it is imported
(`register`), and the package's __init__ imports them: imports run one way, members -> registry,
so this module never imports its members back (tests/test_layering.py checks there is no loop).

A target writes each slide's files (`write_slide`, which returns the slide's table row, with the
files it wrote under "files", relative to OUT) and then
its tables for the slides written (`write_tables`); `manifest_problems` names what in a manifest
the tool cannot represent, checked before anything is written."""

from __future__ import annotations

from typing import Protocol

from ..errors import ConfigError
from ..run.manifest import Manifest
from .common import ExportOut, ExportSlide


class ExportTarget(Protocol):
    name: str
    help: str
    tables: tuple[str, ...]      # the tables write_tables writes in OUT (file names)

    def manifest_problems(self, manifest: Manifest) -> list[str]: ...

    def write_slide(self, out: ExportOut, slide: ExportSlide) -> dict: ...

    def write_tables(self, out: ExportOut, rows: list[dict]) -> list: ...


_REGISTRY: dict[str, ExportTarget] = {}


def register(target: ExportTarget) -> ExportTarget:
    """Add a writer under its name (called once by each writer module, at its import)."""
    if target.name in _REGISTRY:
        raise ValueError(f"export target {target.name!r} registered twice")
    _REGISTRY[target.name] = target
    return target


def target_names() -> tuple[str, ...]:
    """The registered targets in registration order (the package imports clam, trident, stamp)."""
    return tuple(_REGISTRY)


def get_target(name: str) -> ExportTarget:
    if name not in _REGISTRY:
        raise ConfigError(f"--to: unknown export target {name!r}; one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]

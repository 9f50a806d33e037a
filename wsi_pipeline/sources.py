"""`Source`: what every stage needs from an image it tiles, whatever the modality.

A whole-slide image (`slides.Slide`) and a CT/MRI volume (`volumes.Volume`) are both sources:

    source_id     the manifest id (slide_id / volume id), used in file names and messages
    ndim          number of spatial axes: 2 for slides, 3 for volumes
    shape         size per axis in pixels/voxels, in coordinate order ((x, y) for slides,
                  (i, j, k) of the canonical RAS voxel grid for volumes)
    spacing       physical size of one pixel/voxel per axis, same order, in `spacing_unit`
    spacing_unit  "um" for slides (µm/px), "mm" for volumes
    read_box(start, size) -> array
                  the full-resolution pixels/voxels of the box [start, start + size) (both in
                  coordinate order): slides (H, W, 3) uint8 RGB, volumes the (i, j, k) voxel block

Instances carry coordinates (N, k) with k = `ndim`, recorded as `coord_dims` in coords.h5 and
features.h5; stages and models read only this protocol, not a slide's or a volume's own API.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

SPACING_UNITS = ("um", "mm")
COORD_DIMS = (2, 3)   # k of instance coordinates (N, k): 2 for slides, 3 for volumes


@runtime_checkable
class Source(Protocol):
    source_id: str
    spacing_unit: str

    @property
    def ndim(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def spacing(self) -> tuple[float, ...]: ...

    def read_box(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray: ...


def check_box(source: Source, start: Sequence[int], size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) as int tuples of length `source.ndim`, sizes positive; ValueError naming the source."""
    start, size = tuple(int(v) for v in start), tuple(int(v) for v in size)
    if len(start) != source.ndim or len(size) != source.ndim:
        raise ValueError(f"{source.source_id}: a box needs {source.ndim} start and size values, "
                         f"got start {start} size {size}")
    if min(size) <= 0:
        raise ValueError(f"{source.source_id}: box size must be positive, got {size}")
    return start, size


def physical_extent(source: Source) -> tuple[float, ...]:
    """Size of the source per axis in `spacing_unit` (shape × spacing)."""
    return tuple(n * s for n, s in zip(source.shape, source.spacing))

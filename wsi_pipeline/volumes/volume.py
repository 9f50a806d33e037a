"""`Volume`: a CT or MRI scan in canonical RAS voxel order, one kind of `Source`.

Arrays are indexed (i, j, k) with i → Right, j → Anterior, k → Superior (nibabel's closest
canonical orientation); `affine` maps (i, j, k, 1) to RAS+ millimetres. The file's own grid
(`source_shape`, `source_affine`) is kept so outputs (heatmaps, masks) go back onto the scan as
the user's viewer shows it. Axial slices are `data[:, :, k]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import SlideError
from ..sources import check_box

MODALITIES = ("CT", "MR")


class VolumeError(SlideError):
    """A volume cannot be read or lacks what a stage needs; the message names the volume and file."""

    def __init__(self, volume_id, message):
        super().__init__(volume_id, message)
        self.args = (f"volume {volume_id!r}: {message}",)

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class Volume:
    source_id: str
    data: np.ndarray                 # (I, J, K) float32: HU for CT, scanner units for MR
    affine: np.ndarray               # (4, 4) voxel (i, j, k) -> RAS+ mm of `data`
    modality: str                    # "CT" or "MR"
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray        # (4, 4) the file's own voxel grid -> RAS+ mm
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    ndim = 3
    spacing_unit = "mm"

    def __post_init__(self):
        if self.data.ndim != 3:
            raise VolumeError(self.source_id, f"expected a 3-D array, got shape {self.data.shape}")
        if self.modality not in MODALITIES:
            raise VolumeError(self.source_id, f"modality must be one of {MODALITIES}, got {self.modality!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm per voxel along i, j, k (the affine's column norms)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def read_box(self, start, size) -> np.ndarray:
        """The voxels [start, start + size) along (i, j, k); outside the volume reads as the
        volume's minimum (air for CT), so boxes at the border keep their size."""
        start, size = check_box(self, start, size)
        out = np.full(size, float(self.data.min()), dtype=self.data.dtype)
        src = tuple(slice(max(0, s), min(n, s + z)) for s, z, n in zip(start, size, self.shape))
        dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
        if all(sl.stop > sl.start for sl in src):
            out[dst] = self.data[src]
        return out

    def with_data(self, data: np.ndarray, affine: np.ndarray | None = None) -> "Volume":
        return replace(self, data=data, affine=self.affine if affine is None else affine)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Volume({self.source_id!r}, {self.modality}, shape={self.shape}, spacing=({sp}) mm)"

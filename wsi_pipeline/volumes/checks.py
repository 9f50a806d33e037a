"""Checks a volume's companions must pass before they are used: the truth mask lies on the scan's
grid, and the intensities fit the modality the manifest gives.

A truth mask is compared voxel for voxel with the CAM mask written on the scan's own grid
(`source_shape`, `source_affine`), so it must have that shape and that affine: a mask shifted by a
few millimetres would get a Dice as if it were aligned. The tolerance is 1% of the smallest voxel
spacing (float32 headers round affines at ~1e-6 mm; a real misregistration is a voxel or more).

CT is in Hounsfield units: air is -1000 HU and every body CT has air around (or in) the body, so
its lowest percentile is far below zero; MR intensities are scanner units, non-negative. A NIfTI
file says neither (DICOM's Modality tag is checked by the reader), so a CT listed as MR would get
MR's Otsu body mask and normalisation, and an MR listed as CT HU windows: a warning says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .volume import Volume, VolumeError

log = logging.getLogger("wsi_pipeline")
_GRID_TOLERANCE = 0.01          # of the smallest voxel spacing, mm
_CT_AIR_HU = -500.0             # below this: air or lung, which only CT's HU scale has
_CT_AIR_FRACTION = 0.001        # of the voxels, for a scan to read as CT


def load_truth_mask(volume: Volume, path: str | Path) -> np.ndarray:
    """(I, J, K) bool truth mask on `volume`'s own file grid; a mask on another grid (shape, or an
    affine more than the tolerance away) is a `VolumeError` naming both grids."""
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises several types for damaged headers
        raise VolumeError(volume.source_id, f"cannot read truth_mask {path}: {type(exc).__name__}: {exc}") from None
    want_shape = tuple(int(n) for n in volume.source_shape)
    if shape != want_shape:
        raise VolumeError(volume.source_id, f"truth_mask {path} is {shape}, the scan {volume.path} is "
                                            f"{want_shape}: the mask must be on the scan's grid")
    spacing = np.linalg.norm(volume.source_affine[:3, :3], axis=0)
    off_mm = float(np.max(np.abs(affine - volume.source_affine)))
    if off_mm > _GRID_TOLERANCE * float(spacing.min()):
        raise VolumeError(volume.source_id,
                          f"truth_mask {path} is not on the scan's grid: its affine differs from the scan's "
                          f"by up to {off_mm:.3g} mm (origin {np.round(affine[:3, 3], 3).tolist()} vs "
                          f"{np.round(volume.source_affine[:3, 3], 3).tolist()} mm); resample the mask onto "
                          f"the scan")
    return np.asarray(image.dataobj).reshape(want_shape) > 0


def modality_warning(volume_id: str, data: np.ndarray, modality: str, path: Path) -> str | None:
    """The warning (also logged) when the intensities do not fit `modality`, else None."""
    air = float(np.mean(data < _CT_AIR_HU))
    low = float(data.min())
    message = None
    if modality == "MR" and air >= _CT_AIR_FRACTION:
        message = (f"volume {volume_id!r}: the manifest says MR but {path} looks like CT in HU "
                   f"({100 * air:.1f}% of voxels below {_CT_AIR_HU:g}, minimum {low:g}); check its modality")
    elif modality == "CT" and low >= 0:
        message = (f"volume {volume_id!r}: the manifest says CT but {path} has no negative value (CT air "
                   f"is -1000 HU; minimum {low:g}): it looks like MR or CT not in HU; check its modality")
    if message:
        log.warning(message)
    return message

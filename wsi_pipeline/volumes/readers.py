"""Read NIfTI files and DICOM series into canonical-RAS `Volume`s (nibabel, pydicom).

Orientation is nibabel's: `as_closest_canonical` turns any axis-aligned (or nearly so) grid into
RAS order by flips and permutations only, never resampling. A DICOM series' affine is the DICOM
standard's (PS3.3 C.7.6.2.1.1: ImageOrientationPatient, ImagePositionPatient, PixelSpacing) in
LPS, turned into RAS with nibabel's LPS→RAS convention, then canonicalised by nibabel as a NIfTI.

Every problem is a one-line `VolumeError` naming the volume and file: unreadable file, a 2-D image
(or one slice) where a volume is expected, missing or non-positive spacing, header spacing that
disagrees with the affine, a 4-D file without a chosen frame, several series in one folder,
unequal slice spacing, slices of different size or orientation, a series whose DICOM Modality is
not the manifest's. A NIfTI file whose intensities do not fit the manifest's modality (HU for CT)
gets a warning (checks.py). A 4-D file's frame is the manifest's `frame` column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checks import modality_warning
from .volume import MODALITIES, Volume, VolumeError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Header pixdim and affine column norms may differ by float32 rounding; more is an inconsistency.
_SPACING_RTOL = 1e-3
_SLICE_GAP_RTOL = 0.01


def _nibabel():
    try:
        import nibabel
    except ImportError:  # optional dependency (MONAI-style): fail only where volumes are used
        raise ImportError("reading volumes needs nibabel: pip install 'wsi-pipeline[volumes]'") from None
    return nibabel


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImportError("reading DICOM needs pydicom: pip install 'wsi-pipeline[volumes]'") from None
    return pydicom


def open_volume(path: str | Path, *, volume_id: str | None = None, modality: str = "CT",
                frame: int | None = None) -> Volume:
    """A NIfTI file (.nii / .nii.gz) or a DICOM series (a folder of slice files) as a Volume."""
    path = Path(path)
    volume_id = volume_id or path.name.split(".")[0]
    if modality not in MODALITIES:
        raise VolumeError(volume_id, f"modality must be one of {MODALITIES}, got {modality!r}")
    if not path.exists():
        raise VolumeError(volume_id, f"file not found: {path}")
    if path.is_dir():
        return read_dicom_series(path, volume_id=volume_id, modality=modality)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti(path, volume_id=volume_id, modality=modality, frame=frame)
    return read_dicom_series([path], volume_id=volume_id, modality=modality)


def read_nifti(path: str | Path, *, volume_id: str | None = None, modality: str = "CT",
               frame: int | None = None) -> Volume:
    """`frame` picks one volume of a 4-D file (time series); a 4-D file without it is an error."""
    nib = _nibabel()
    path = Path(path)
    volume_id = volume_id or path.name.split(".")[0]
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for damaged headers
        raise VolumeError(volume_id, f"cannot read {path} as NIfTI: {type(exc).__name__}: {exc}") from None
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        frame = 0
    if len(shape) < 3 or (len(shape) == 3 and min(shape) == 1):
        raise VolumeError(volume_id, f"{path} is a 2-D image {shape}, a volume is expected")
    if len(shape) > 4:
        raise VolumeError(volume_id, f"{path} has {len(shape)} dimensions {shape}; only 3-D (or 4-D with a frame) is read")
    if len(shape) == 4:
        if frame is None:
            raise VolumeError(volume_id, f"{path} is 4-D {shape} ({shape[3]} frames): choose one frame with "
                                         f"the manifest's `frame` column (0..{shape[3] - 1}) on this row")
        if not 0 <= frame < shape[3]:
            raise VolumeError(volume_id, f"{path}: frame {frame} (the manifest's `frame` column) out of range "
                                     f"(0..{shape[3] - 1})")
        image = image.slicer[..., frame]
    if min(image.shape) == 1:
        raise VolumeError(volume_id, f"{path} is a 2-D image {image.shape}, a volume is expected")
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
    if not (np.all(np.isfinite(zooms)) and np.all(zooms > 0)):
        raise VolumeError(volume_id, f"{path}: missing or non-positive voxel spacing (pixdim {tuple(zooms)})")
    codes = (int(image.header["qform_code"]), int(image.header["sform_code"])) \
        if "qform_code" in image.header else (1, 1)
    if codes == (0, 0):
        raise VolumeError(volume_id, f"{path}: no orientation (qform_code and sform_code are 0), "
                                     f"so left/right cannot be known")
    affine_spacing = nib.affines.voxel_sizes(image.affine)
    if not np.allclose(affine_spacing, zooms, rtol=_SPACING_RTOL):
        raise VolumeError(volume_id, f"{path}: inconsistent spacing: header pixdim {tuple(np.round(zooms, 4))} "
                                     f"vs affine {tuple(np.round(affine_spacing, 4))} mm")
    canonical = nib.as_closest_canonical(image)
    data = np.asarray(canonical.get_fdata(dtype=np.float32))
    if not np.isfinite(data).all():
        raise VolumeError(volume_id, f"{path}: non-finite voxel values")
    modality_warning(volume_id, data, modality, path)   # NIfTI says no modality: the intensities do
    return Volume(volume_id, data, np.asarray(canonical.affine, dtype=np.float64), modality,
                  tuple(int(n) for n in image.shape[:3]), np.asarray(image.affine, dtype=np.float64), path,
                  meta={"source_axcodes": "".join(nib.aff2axcodes(image.affine))})


def read_dicom_series(source: str | Path | list, *, volume_id: str | None = None, modality: str = "CT") -> Volume:
    """A folder of DICOM slice files (or a list of them), one series, as a Volume (CT in HU)."""
    pydicom = _pydicom()
    from pydicom.pixels import apply_modality_lut

    files = sorted(p for p in Path(source).iterdir() if p.is_file()) if not isinstance(source, list) \
        else [Path(p) for p in source]
    where = Path(source) if not isinstance(source, list) else (files[0] if len(files) == 1 else files[0].parent)
    volume_id = volume_id or where.name.split(".")[0]
    if not files:
        raise VolumeError(volume_id, f"no DICOM files in {where}")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except Exception as exc:  # not DICOM, truncated
            raise VolumeError(volume_id, f"cannot read {f} as DICOM: {type(exc).__name__}: {exc}") from None
        slices.append((f, ds))
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise VolumeError(volume_id, f"{where}: mixed series ({len(series)} SeriesInstanceUIDs); "
                                     f"give one series per volume")
    for f, ds in slices:
        for tag in ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"):
            if tag not in ds:
                raise VolumeError(volume_id, f"{f}: missing {tag} (spacing/orientation unknown)")
    if len(slices) < 2:
        raise VolumeError(volume_id, f"{where} is one 2-D slice, a volume is expected")
    found = {str(ds.get("Modality", "")) for _, ds in slices}
    if found & set(MODALITIES) and found != {modality}:
        # HU windows on an MR series (or MR normalisation of CT) would silently give nonsense.
        raise VolumeError(volume_id, f"{where}: the series' Modality is {', '.join(sorted(found))}, "
                                     f"the manifest says {modality}")
    orientation = np.asarray(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    for f, ds in slices:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=np.float64), orientation, atol=1e-4):
            raise VolumeError(volume_id, f"{f}: orientation differs from the rest of the series")
        if (int(ds.Rows), int(ds.Columns)) != (int(slices[0][1].Rows), int(slices[0][1].Columns)):
            raise VolumeError(volume_id, f"{f}: slice size differs from the rest of the series")
    slices.sort(key=lambda s: float(np.dot(np.asarray(s[1].ImagePositionPatient, dtype=np.float64), normal)))
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in slices])
    gaps = np.diff(positions @ normal)
    if np.any(gaps <= 0) or not np.allclose(gaps, gaps.mean(), rtol=_SLICE_GAP_RTOL):
        raise VolumeError(volume_id, f"{where}: inconsistent slice spacing (gaps {np.round(gaps, 3).tolist()} mm)")
    spacing_rc = np.asarray(slices[0][1].PixelSpacing, dtype=np.float64)   # (between rows, between columns)
    if not (np.all(np.isfinite(spacing_rc)) and np.all(spacing_rc > 0)):
        raise VolumeError(volume_id, f"{slices[0][0]}: missing or non-positive PixelSpacing {tuple(spacing_rc)}")
    # Array (column c, row r, slice s): the DICOM equation P = IPP + X·Δcol·c + Y·Δrow·r, slices along
    # the measured step between positions.
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * spacing_rc[1]
    affine_lps[:3, 1] = col_dir * spacing_rc[0]
    affine_lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    affine_lps[:3, 3] = positions[0]
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps      # DICOM LPS+ -> NIfTI RAS+
    data = np.stack([np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32).T
                     for _, ds in slices], axis=2)
    nib = _nibabel()
    image = nib.Nifti1Image(data, affine_ras)
    canonical = nib.as_closest_canonical(image)
    return Volume(volume_id, np.asarray(canonical.get_fdata(dtype=np.float32)),
                  np.asarray(canonical.affine, dtype=np.float64), modality, data.shape, affine_ras, Path(where),
                  meta={"source_axcodes": "".join(nib.aff2axcodes(affine_ras)), "dicom_modality": ",".join(found),
                        "n_slices": len(slices)})

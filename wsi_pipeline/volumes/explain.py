"""Explain a volume's prediction: per-instance scores → 3-D heatmap NIfTI on the scan's own grid,
a PNG montage of the axial slices with most signal, a CAM-thresholded lesion mask and its Dice.

The heatmap is first painted on the resampled canonical grid the instances index (each voxel: the
mean score of the instance boxes covering it, 0 outside every box), smoothed at half the instance
lattice step (`smooth_heatmap`), then carried onto the file's
grid (`source_shape`, `source_affine`) by nearest-neighbour sampling through both affines, so the
NIfTI written has the scan's exact shape and affine and lies over it in 3D Slicer / ITK-SNAP.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from ..exports.colormaps import apply_colormap
from ..io import atomic_path
from .intensity import window
from .resample import to_grid


def instance_heatmap(coords: np.ndarray, scores: np.ndarray, grid_shape, box_size) -> np.ndarray:
    """(I, J, K) float32: per voxel the mean score of the boxes (coords (N, 3) corners; `box_size`
    one (bi, bj, bk) for all, or (N, 3), each instance's own scale's) covering it; 0 where none does."""
    total = np.zeros(tuple(grid_shape), dtype=np.float64)
    count = np.zeros(tuple(grid_shape), dtype=np.float64)
    coords = np.asarray(coords)
    sizes = np.asarray(box_size, dtype=np.int64)
    sizes = np.broadcast_to(sizes, coords.shape) if sizes.ndim == 1 else sizes
    for (i0, j0, k0), (bi, bj, bk), score in zip(coords, sizes, np.asarray(scores, dtype=np.float64)):
        total[i0:i0 + bi, j0:j0 + bj, k0:k0 + bk] += score
        count[i0:i0 + bi, j0:j0 + bj, k0:k0 + bk] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


def smooth_heatmap(heat: np.ndarray, sigma_vox) -> np.ndarray:
    """Gaussian-smoothed heat (σ per axis in voxels), rescaled to the original maximum.

    Instance scores sample the volume every `stride_vox` (in-plane) and `slice_step` (axially); the
    box-painted map is piecewise constant on that lattice, so its maximum is a flat block whose
    centre can fall a voxel or two off a small lesion. Smoothing at half the lattice step (as
    slide heatmaps blur overlapping tiles) turns it into a continuous field whose peak is the centre
    of the high-scoring cluster."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(heat, dtype=np.float32), sigma=sigma_vox, mode="constant")
    top = float(smooth.max())
    return smooth * (float(heat.max()) / top) if top > 0 else smooth


def to_source_grid(array: np.ndarray, grid_affine: np.ndarray, source_shape, source_affine: np.ndarray,
                   order: int = 0) -> np.ndarray:
    """An array on the canonical (resampled) grid, on the file's own grid (nearest neighbour)."""
    return to_grid(array, grid_affine, source_shape, source_affine, order=order, cval=0.0)


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    """Write `array` with `affine` (qform and sform, code 1 = scanner) as .nii or .nii.gz, atomically."""
    import nibabel as nib

    path = Path(path)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.asarray(affine, dtype=np.float64))
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def heatmap_peak_vox(heat: np.ndarray) -> tuple[int, int, int]:
    """The voxel at the centre of the heatmap's maximum (centroid of the voxels within 0.1% of it,
    rounded), so a flat-topped box gives its centre, not its corner."""
    peak = heat >= heat.max() - 1e-3 * max(abs(float(heat.max())), 1e-12)
    centre = np.round(np.argwhere(peak).mean(axis=0)).astype(int)
    return tuple(int(v) for v in centre)


def cam_mask(heat: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Lesion mask: voxels whose heat reaches `threshold` × the volume's maximum heat (bool)."""
    top = float(heat.max())
    if top <= 0:
        return np.zeros(heat.shape, dtype=bool)
    return heat >= threshold * top


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def axial_montage(hu_or_intensity: np.ndarray, heat: np.ndarray, path: str | Path, *, n_slices: int = 6,
                  ct: bool = True, colormap: str = "jet", alpha: float = 0.45) -> list[int]:
    """PNG of the `n_slices` axial slices (k) with the most heat, grey scan with the heat overlaid.

    Both arrays (I, J, K) on the canonical (RAS) grid; tiles follow the radiological convention:
    the patient's right on the image's left, anterior up.
    Returns the slice indices shown."""
    per_slice = heat.reshape(-1, heat.shape[2]).sum(axis=0)
    chosen = sorted(np.argsort(per_slice)[::-1][:n_slices].tolist())
    if ct:
        grey = window(hu_or_intensity, 40.0, 400.0)
    else:
        low, high = np.percentile(hu_or_intensity, (1, 99))
        grey = np.clip((hu_or_intensity - low) / max(high - low, 1e-6), 0, 1)
    top = max(float(heat.max()), 1e-12)
    tiles = []
    for k in chosen:
        g = (grey[:, :, k].T[::-1, ::-1] * 255).astype(np.float32)               # i=R → right to left, j=A → bottom to top
        h = np.clip(heat[:, :, k].T[::-1, ::-1] / top, 0, 1)
        rgb = np.repeat(g[..., None], 3, axis=2)
        colour = apply_colormap(h, colormap).astype(np.float32)
        a = (alpha * (h > 0.05))[..., None]
        tiles.append((rgb * (1 - a) + colour * a).astype(np.uint8))
    cols = min(3, len(tiles))
    rows = -(-len(tiles) // cols)
    th, tw = tiles[0].shape[:2]
    sheet = np.zeros((rows * th, cols * tw, 3), dtype=np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        sheet[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tile
    with atomic_path(path) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return chosen

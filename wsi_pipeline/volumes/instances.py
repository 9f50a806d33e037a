"""Volume instances: 2.5-D patches over the body, their coords (N, 3) and features.

A volume is resampled to `target_spacing_mm` (isotropic by default), its body masked, and cut into
instances: an in-plane box of `patch_size_vox`² voxels every `stride_vox` along i and j, one slab of
`slice_step` axial slices thick every `slice_step` slices along k. Each instance is shown to a 2-D
encoder as one RGB image of its slab's centre slice k_c:

    channels="windows"  three CT windows of slice k_c (soft tissue, liver, bone by default); MR: the
                        normalised slice three times
    channels="slices"   slices k_c - 1, k_c, k_c + 1 in the first window (MR: normalised)

so any 2-D encoder (timm, or the parameter-free `stain_texture`) applies. Coords are the box
corner (i0, j0, k0) in voxels of the resampled canonical (RAS) grid; the instance covers
[i0, i0 + patch) × [j0, j0 + patch) × [k0, k0 + slice_step). coords.h5 / features.h5 record the
grid's spacing and affine and the file's own grid, so heatmaps go back onto the scan.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .intensity import DEFAULT_CT_WINDOWS, ct_windows, normalise_mri
from .mask import body_mask
from .resample import resample_to_spacing
from .volume import Volume, VolumeError

CHANNEL_MODES = ("windows", "slices")


@dataclass(frozen=True)
class VolumeInstanceParams:
    target_spacing_mm: float | None = 2.0     # None: keep the file's spacing
    patch_size_vox: int = 16                  # in-plane box side, voxels of the resampled grid
    stride_vox: int = 8                       # in-plane step between boxes (overlap = patch - stride)
    slice_step: int = 4                       # slab thickness and step along k, slices
    channels: str = "windows"
    windows: tuple = DEFAULT_CT_WINDOWS       # CT window presets or (centre, width) HU pairs
    min_body_fraction: float = 0.5            # of the box's voxels
    min_hu: float = -500.0                    # CT body threshold
    mri_normalisation: str = "percentile"

    def __post_init__(self):
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {self.channels!r}")
        if min(self.patch_size_vox, self.stride_vox, self.slice_step) < 1:
            raise ValueError("patch_size_vox, stride_vox and slice_step must be >= 1")

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass
class VolumeInstances:
    grid: Volume                  # the resampled canonical volume the coords index
    coords: np.ndarray            # (N, 3) int64 box corners (i0, j0, k0)
    body_fraction: np.ndarray     # (N,) float32
    channels: np.ndarray          # (3 or 1, I, J, K) float32 in [0, 1]: what the encoder sees
    body: np.ndarray              # (I, J, K) bool
    params: VolumeInstanceParams

    @property
    def box_size(self) -> tuple[int, int, int]:
        p = self.params
        return (p.patch_size_vox, p.patch_size_vox, p.slice_step)

    def attrs(self) -> dict:
        """What coords.h5 / features.h5 record about the grid and the instances."""
        v, p = self.grid, self.params
        return {
            "source_id": v.source_id, "volume_id": v.source_id, "name": v.source_id, "modality": v.modality,
            "spacing_mm": np.asarray(v.spacing), "affine": v.affine.astype(np.float64),
            "grid_shape": np.asarray(v.shape, dtype=np.int64),
            "source_shape": np.asarray(v.source_shape, dtype=np.int64),
            "source_affine": v.source_affine.astype(np.float64),
            "patch_size": p.patch_size_vox, "patch_size_vox": p.patch_size_vox, "stride_vox": p.stride_vox,
            "slice_step": p.slice_step, "channels": p.channels, "windows": json.dumps(list(p.windows)),
            "target_spacing_mm": -1.0 if p.target_spacing_mm is None else float(p.target_spacing_mm),
            "instance_config_hash": p.config_hash(),
        }


def prepare(volume: Volume, params: VolumeInstanceParams) -> tuple[Volume, np.ndarray, np.ndarray]:
    """(resampled volume, channels (C, I, J, K) in [0, 1], body mask (I, J, K))."""
    grid = volume if params.target_spacing_mm is None else resample_to_spacing(volume, params.target_spacing_mm)
    body = body_mask(grid, params.min_hu)
    if volume.modality == "CT":
        windows = params.windows if params.channels == "windows" else params.windows[:1]
        channels = ct_windows(grid.data, windows)
    else:
        channels = normalise_mri(grid.data, body, params.mri_normalisation)[None]
    return grid, channels.astype(np.float32), body


def volume_instances(volume: Volume, params: VolumeInstanceParams = VolumeInstanceParams()) -> VolumeInstances:
    """Instances over the body of `volume`, in raster order (k slowest, then j, then i)."""
    grid, channels, body = prepare(volume, params)
    p, s, t = params.patch_size_vox, params.stride_vox, params.slice_step
    n_i, n_j, n_k = grid.shape
    if n_i < p or n_j < p:
        raise VolumeError(volume.source_id, f"in-plane size {n_i}×{n_j} voxels at "
                                            f"{params.target_spacing_mm} mm is smaller than one patch ({p})")
    # Body fraction of every box by summed-area sums over (i, j) per slab.
    coords, fractions = [], []
    for k0 in range(0, n_k - t + 1, t):
        slab = body[:, :, k0:k0 + t].mean(axis=2)
        integral = np.pad(slab.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        for j0 in range(0, n_j - p + 1, s):
            for i0 in range(0, n_i - p + 1, s):
                total = (integral[i0 + p, j0 + p] - integral[i0, j0 + p] - integral[i0 + p, j0]
                         + integral[i0, j0]) / (p * p)
                if total >= params.min_body_fraction:
                    coords.append((i0, j0, k0))
                    fractions.append(total)
    if not coords:
        raise VolumeError(volume.source_id, "no instance covers enough body (check the modality, HU "
                                            "threshold or min_body_fraction)")
    return VolumeInstances(grid, np.asarray(coords, dtype=np.int64), np.asarray(fractions, dtype=np.float32),
                           channels, body, params)


def instance_images(instances: VolumeInstances, index: np.ndarray | None = None) -> np.ndarray:
    """(n, 3, patch, patch) uint8 RGB images of the instances (all, or those at `index`)."""
    p, t = instances.params.patch_size_vox, instances.params.slice_step
    channels = instances.channels
    n_k = channels.shape[3]
    coords = instances.coords if index is None else instances.coords[index]
    out = np.empty((len(coords), 3, p, p), dtype=np.uint8)
    for n, (i0, j0, k0) in enumerate(coords):
        kc = min(k0 + t // 2, n_k - 1)
        if instances.params.channels == "slices" or channels.shape[0] == 1:
            ks = [min(max(kc + d, 0), n_k - 1) for d in (-1, 0, 1)] if instances.params.channels == "slices" \
                else [kc] * 3
            planes = channels[0, i0:i0 + p, j0:j0 + p][..., ks]          # (p, p, 3)
            image = np.moveaxis(planes, -1, 0)
        else:
            image = channels[:3, i0:i0 + p, j0:j0 + p, kc]
        # Rows of the image follow j (anterior up after a flip would be cosmetic; encoders do not care).
        out[n] = np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)
    return out


@torch.no_grad()
def encode_instances(instances: VolumeInstances, encoder, batch_size: int = 256, device="cpu") -> np.ndarray:
    """(N, D) float32 features of every instance with a 2-D `Encoder` (encoders/registry.py).

    Encoders with learned weights see the images resized to their input size; the parameter-free
    descriptors take them as they are."""
    size = None if getattr(encoder.spec, "parameter_free", False) else encoder.input_size_px
    out = np.empty((len(instances.coords), encoder.out_dim), dtype=np.float32)
    for start in range(0, len(out), batch_size):
        index = np.arange(start, min(start + batch_size, len(out)))
        images = torch.from_numpy(instance_images(instances, index)).to(device)
        if size is not None and images.shape[-1] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        out[index] = encoder(images).float().cpu().numpy()
    if not np.isfinite(out).all():
        raise VolumeError(instances.grid.source_id, "the encoder gave non-finite features")
    return out

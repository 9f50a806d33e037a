"""Volume instances: boxes over the body, their coords (N, 3) and features.

A volume is resampled to `target_spacing_mm` (isotropic by default), its body masked, and cut into
instances: an in-plane box of `patch_size_vox`² voxels every `stride_vox` along i and j, one slab of
`slice_step` axial slices thick every `slice_step` slices along k. The geometry is normally given in
millimetres (`VolumeInstanceParams.from_mm`: box, stride, slab; the voxel numbers derived from the
target spacing and recorded with the mm values in coords.h5). An optional second, coarser scale
(`coarse`) adds its own boxes to the same bag; each instance's scale (0 fine, 1 coarse) is the
coords.h5 dataset `scale`, and the heatmap paints each instance with its own box.

3-D encoders (`spec.input_dims == 3`, e.g. `volume_texture_3d`, `monai_resnet10_3d`) see each
instance as a sub-volume (C, 2t, 2p, 2p) float in [0, 1]: the box with half its size again as
context on every side (the box is the central half along each axis; outside the grid: 0). 2-D
encoders see each instance as one RGB image of its slab's centre slice k_c (2.5-D):

    channels="windows"  three CT windows of slice k_c (soft tissue, liver, bone by default); MR: the
                        normalised slice three times
    channels="slices"   slices k_c - 1, k_c, k_c + 1 in the first window (MR: normalised)

so any 2-D encoder (timm, or the parameter-free `stain_texture`) applies.

CT windows are absolute HU (`window_reference="absolute"`) or relative to the scan
(`"body_median"`): each window's centre c is applied at c - 40 + the median HU of the body, the
presets being written for soft tissue at 40 HU, so a scanner's calibration offset (a few to tens of
HU) moves the windows with the scan instead of every instance's intensity. Coords are the box
corner (i0, j0, k0) in voxels of the resampled canonical (RAS) grid; the instance covers
[i0, i0 + patch) × [j0, j0 + patch) × [k0, k0 + slice_step). coords.h5 / features.h5 record the
grid's spacing and affine and the file's own grid, so heatmaps go back onto the scan.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from .intensity import CT_WINDOWS, DEFAULT_CT_WINDOWS, ct_windows, normalise_mri
from .mask import body_mask
from .resample import resample_to_spacing
from .volume import Volume, VolumeError

CHANNEL_MODES = ("windows", "slices")
WINDOW_REFERENCES = ("absolute", "body_median")
SOFT_TISSUE_HU = 40.0        # what the window presets assume the body's median is


def mm_to_vox(mm: float, spacing_mm: float) -> int:
    """A length in mm as a whole number of voxels of `spacing_mm` (at least 1)."""
    return max(1, int(round(float(mm) / float(spacing_mm))))


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
    window_reference: str = "absolute"        # or "body_median" (module docstring)
    # What the voxel numbers were derived from (None: given in voxels): box, stride, slab in mm.
    geometry_mm: tuple | None = None
    # A second, coarser scale in the same bag: (patch_size_vox, stride_vox, slice_step), and its mm.
    coarse: tuple | None = None
    coarse_mm: tuple | None = None

    def __post_init__(self):
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {self.channels!r}")
        if self.window_reference not in WINDOW_REFERENCES:
            raise ValueError(f"window_reference must be one of {WINDOW_REFERENCES}, got {self.window_reference!r}")
        if min(self.patch_size_vox, self.stride_vox, self.slice_step) < 1:
            raise ValueError("patch_size_vox, stride_vox and slice_step must be >= 1")
        if self.coarse is not None and (len(self.coarse) != 3 or min(self.coarse) < 1):
            raise ValueError(f"coarse must be (patch_size_vox, stride_vox, slice_step) >= 1, got {self.coarse!r}")

    @classmethod
    def from_mm(cls, target_spacing_mm: float, box_mm: float, stride_mm: float, slab_mm: float,
                coarse_mm: tuple | None = None, **kwargs) -> "VolumeInstanceParams":
        """Geometry in mm on a grid of `target_spacing_mm`: voxel numbers rounded (>= 1)."""
        if target_spacing_mm is None:
            raise ValueError("geometry in mm needs a target spacing (the file's own spacing differs per scan)")
        to_vox = lambda values: tuple(mm_to_vox(v, target_spacing_mm) for v in values)  # noqa: E731
        patch, stride, slab = to_vox((box_mm, stride_mm, slab_mm))
        coarse = to_vox(coarse_mm) if coarse_mm is not None else None
        return cls(target_spacing_mm=target_spacing_mm, patch_size_vox=patch, stride_vox=stride, slice_step=slab,
                   geometry_mm=(float(box_mm), float(stride_mm), float(slab_mm)), coarse=coarse,
                   coarse_mm=None if coarse_mm is None else tuple(float(v) for v in coarse_mm), **kwargs)

    def scales(self) -> list[tuple[int, int, int]]:
        """(patch_size_vox, stride_vox, slice_step) of each scale: the fine one, then the coarse one."""
        fine = (self.patch_size_vox, self.stride_vox, self.slice_step)
        return [fine] + ([tuple(int(v) for v in self.coarse)] if self.coarse is not None else [])

    def smallest_box_vox(self, in_plane: bool = False) -> int:
        """The smallest side of any scale's box, voxels (what an encoder's minimum input is checked
        against); `in_plane`: of the in-plane box only (what a 2-D encoder's image is)."""
        return min(p if in_plane else min(p, t) for p, _, t in self.scales())

    def config_hash(self) -> str:
        fields = asdict(self)
        # Settings added later enter the hash only when set, so earlier runs' tiles stay valid.
        for name, default in _LATER_DEFAULTS.items():
            if fields[name] == default:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:16]


_LATER_DEFAULTS = {"window_reference": "absolute", "geometry_mm": None, "coarse": None, "coarse_mm": None}


@dataclass
class VolumeInstances:
    grid: Volume                  # the resampled canonical volume the coords index
    coords: np.ndarray            # (N, 3) int64 box corners (i0, j0, k0)
    body_fraction: np.ndarray     # (N,) float32
    channels: np.ndarray          # (3 or 1, I, J, K) float32 in [0, 1]: what the encoder sees
    body: np.ndarray              # (I, J, K) bool
    params: VolumeInstanceParams
    scale: np.ndarray | None = None   # (N,) int8 scale index per instance (params.scales()); None: all 0

    def __post_init__(self):
        if self.scale is None:
            self.scale = np.zeros(len(self.coords), dtype=np.int8)

    @property
    def box_size(self) -> tuple[int, int, int]:
        p = self.params
        return (p.patch_size_vox, p.patch_size_vox, p.slice_step)

    def box_sizes(self) -> np.ndarray:
        """(N, 3) box size of every instance, voxels (its own scale's)."""
        return instance_box_sizes(self.params, self.scale)

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
            "instance_config_hash": p.config_hash(), "window_reference": p.window_reference,
            "scales_vox": json.dumps([list(s) for s in p.scales()]),
            **({"box_mm": p.geometry_mm[0], "stride_mm": p.geometry_mm[1], "slab_mm": p.geometry_mm[2]}
               if p.geometry_mm else {}),
            **({"coarse_mm": json.dumps(list(p.coarse_mm))} if p.coarse_mm else {}),
        }


def instance_box_sizes(params: VolumeInstanceParams, scale: np.ndarray | None, n: int | None = None) -> np.ndarray:
    """(N, 3) box sizes (patch, patch, slab) of instances at `scale` (None: all fine, `n` of them)."""
    table = np.asarray([(p, p, t) for p, _, t in params.scales()], dtype=np.int64)
    index = np.zeros(n, dtype=np.int64) if scale is None else np.asarray(scale, dtype=np.int64)
    return table[index]


def prepare(volume: Volume, params: VolumeInstanceParams) -> tuple[Volume, np.ndarray, np.ndarray]:
    """(resampled volume, channels (C, I, J, K) in [0, 1], body mask (I, J, K))."""
    grid = volume if params.target_spacing_mm is None else resample_to_spacing(volume, params.target_spacing_mm)
    body = body_mask(grid, params.min_hu)
    if volume.modality == "CT":
        windows = params.windows if params.channels == "windows" else params.windows[:1]
        if params.window_reference == "body_median":
            shift = float(np.median(grid.data[body])) - SOFT_TISSUE_HU if body.any() else 0.0
            windows = [(c + shift, w) for c, w in (CT_WINDOWS[x] if isinstance(x, str) else x for x in windows)]
        channels = ct_windows(grid.data, windows)
    else:
        channels = normalise_mri(grid.data, body, params.mri_normalisation)[None]
    return grid, channels.astype(np.float32), body


def volume_instances(volume: Volume, params: VolumeInstanceParams = VolumeInstanceParams()) -> VolumeInstances:
    """Instances over the body of `volume`: per scale (fine first), in raster order (k slowest, then j, then i)."""
    grid, channels, body = prepare(volume, params)
    n_i, n_j, n_k = grid.shape
    coords, fractions, scales = [], [], []
    for scale, (p, s, t) in enumerate(params.scales()):
        if n_i < p or n_j < p:
            raise VolumeError(volume.source_id, f"in-plane size {n_i}×{n_j} voxels at "
                                                f"{params.target_spacing_mm} mm is smaller than one box ({p})")
        # Body fraction of every box by summed-area sums over (i, j) per slab.
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
                        scales.append(scale)
    if not coords:
        raise VolumeError(volume.source_id, "no instance covers enough body (check the modality, HU "
                                            "threshold or min_body_fraction)")
    return VolumeInstances(grid, np.asarray(coords, dtype=np.int64), np.asarray(fractions, dtype=np.float32),
                           channels, body, params, np.asarray(scales, dtype=np.int8))


def instance_images(instances: VolumeInstances, index: np.ndarray | None = None) -> np.ndarray:
    """(n, 3, patch, patch) uint8 RGB images of the instances (all, or those at `index`), all of one
    scale (their box side is the first instance's)."""
    channels = instances.channels
    n_k = channels.shape[3]
    index = np.arange(len(instances.coords)) if index is None else np.asarray(index)
    coords = instances.coords[index]
    sizes = instances.box_sizes()[index]
    if len(sizes) and (sizes != sizes[0]).any():
        raise ValueError("instance_images: instances of several scales in one call")
    p, t = (int(sizes[0][0]), int(sizes[0][2])) if len(sizes) else (instances.params.patch_size_vox,
                                                                    instances.params.slice_step)
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


def instance_subvolumes(instances: VolumeInstances, index: np.ndarray | None = None) -> np.ndarray:
    """(n, C, 2t, 2p, 2p) float32 sub-volumes (k, j, i order, as 3-D networks take D, H, W) of the
    instances at `index`, all of one scale: each box with half its size of context on every side,
    0 outside the grid (module docstring)."""
    channels = instances.channels
    index = np.arange(len(instances.coords)) if index is None else np.asarray(index)
    sizes = instances.box_sizes()[index]
    if len(sizes) and (sizes != sizes[0]).any():
        raise ValueError("instance_subvolumes: instances of several scales in one call")
    p, t = (int(sizes[0][0]), int(sizes[0][2])) if len(sizes) else (instances.params.patch_size_vox,
                                                                    instances.params.slice_step)
    mi, mk = p // 2, t // 2
    pad = ((0, 0), (mi, p - mi), (mi, p - mi), (mk, t - mk))
    padded = np.pad(channels, pad)              # box corner (i0, j0, k0) is at (i0, j0, k0) + (mi, mi, mk) - margin
    out = np.empty((len(index), channels.shape[0], 2 * t, 2 * p, 2 * p), dtype=np.float32)
    for n, (i0, j0, k0) in enumerate(instances.coords[index]):
        block = padded[:, i0:i0 + 2 * p, j0:j0 + 2 * p, k0:k0 + 2 * t]   # (C, 2p, 2p, 2t) over i, j, k
        out[n] = np.transpose(block, (0, 3, 2, 1))
    return out


def encode_instances(instances: VolumeInstances, encoder, batch_size: int = 256, device="cpu") -> np.ndarray:
    """(N, D) float32 features of every instance with an `Encoder` (encoders/registry.py), scale by scale.

    2-D encoders see the instances as RGB images (`instance_images`), those with learned weights
    resized to their input size, the parameter-free descriptors as they are; 3-D encoders see the
    sub-volumes with context (`instance_subvolumes`), resized to their input size where they have one."""
    # torch here, not at module level: tiling a volume (this module's grid code) needs no torch,
    # and a tile job would pay its ~2 s import.
    import torch

    with torch.no_grad():
        return _encode_instances(torch, instances, encoder, batch_size, device)


def _encode_instances(torch, instances: VolumeInstances, encoder, batch_size: int, device) -> np.ndarray:
    import torch.nn.functional as F

    spec = encoder.spec
    three_d = getattr(spec, "input_dims", 2) == 3
    size = None if getattr(spec, "parameter_free", False) or (three_d and spec.resize_px is None) \
        else encoder.input_size_px
    out = np.empty((len(instances.coords), encoder.out_dim), dtype=np.float32)
    for scale in np.unique(instances.scale):
        members = np.flatnonzero(instances.scale == scale)
        for start in range(0, len(members), batch_size):
            index = members[start:start + batch_size]
            if three_d:
                # An entry with fewer channels than the windows takes the first ones (soft tissue first).
                n_channels = int(encoder.mean.shape[1])
                inputs = torch.from_numpy(instance_subvolumes(instances, index)[:, :n_channels]).to(device)
                if size is not None and inputs.shape[-1] != size:
                    inputs = F.interpolate(inputs, size=(size, size, size), mode="trilinear", align_corners=False)
            else:
                inputs = torch.from_numpy(instance_images(instances, index)).to(device)
                if size is not None and inputs.shape[-1] != size:
                    inputs = F.interpolate(inputs.float(), size=(size, size), mode="bilinear", align_corners=False)
            out[index] = encoder(inputs).float().cpu().numpy()
    if not np.isfinite(out).all():
        raise VolumeError(instances.grid.source_id, "the encoder gave non-finite features")
    return out

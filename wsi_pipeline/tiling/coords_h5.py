"""`coords.h5`: a slide's patch coordinates, the contract between tiling and feature extraction.

Layout (CLAM/TRIDENT-compatible: their readers take `f["coords"]` and its attrs; the same attrs
are also on the file root, for readers that look there):
  coords           (N, k) int64   k = 2 for slides: level-0 top-left (x, y); k = 3 for volumes:
                                  voxel corner (i, j, k) of the canonical RAS grid (volumes/instances.py)
  tissue_fraction  (N,)   float32 area fraction of tissue (body, for volumes) under each instance
  attrs on coords: coord_dims (k; files from before it have none and are k = 2),
                   patch_size (px at target_mpp), patch_size_level0, patch_level, downsample,
                   read_size_px, stride_level0, overlap_px, target_mpp, slide_mpp, mpp_source,
                   level0_width, level0_height, slide_id, name, config_hash, n_patches, format_version,
                   and the slide file's identity: slide_size_bytes, slide_mtime_ns, slide_fingerprint,
                   slide_level_dimensions (slides/identity.py; absent in files from before it),
                   level0_magnification and target_magnification (nominal, 10 / mpp: see below;
                   slides only, absent in files from before them)

Magnifications are nominal: TRIDENT's patcher (and most scanners' "40×" at 0.25 µm/px) convert with
magnification = 10 / mpp, so writing 10 / slide_mpp and 10 / target_mpp makes TRIDENT's level-0
footprint, patch_size · level0_magnification / target_magnification, equal our patch_size_level0.
They are a unit conversion, not the objective's power read from the file.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..io import atomic_path
from ..slides.identity import SlideIdentity
from ..sources import COORD_DIMS
from .grid import TileGrid

FORMAT_VERSION = 1
# µm: magnification = NOMINAL_MAGNIFICATION_UM / mpp (0.25 µm/px = 40×, 0.5 µm/px = 20×).
NOMINAL_MAGNIFICATION_UM = 10.0


def nominal_magnification(mpp: float) -> float:
    """The conventional objective power of `mpp` µm/px (10 / mpp), as TRIDENT converts it."""
    return NOMINAL_MAGNIFICATION_UM / float(mpp)


def magnification_attrs(slide_mpp: float, target_mpp: float) -> dict:
    """TRIDENT's `level0_magnification` / `target_magnification` for a slide (nominal, 10 / mpp)."""
    return {"level0_magnification": nominal_magnification(slide_mpp),
            "target_magnification": nominal_magnification(target_mpp)}


def write_coords_h5(path: str | Path, grid: TileGrid, *, slide_id: str, level0_wh: tuple[int, int],
                    mpp_source: str, config_hash: str, slide: SlideIdentity | None = None) -> None:
    """`slide`: the identity of the file tiled, so a rerun can tell when it was replaced."""
    g = grid.geometry
    attrs = {
        "patch_size": g.patch_size_px,
        "patch_size_level0": g.patch_size_level0,
        "patch_level": g.patch_level,
        "downsample": g.level_downsample,
        "read_size_px": g.read_size_px,
        "stride_level0": g.stride_level0,
        "overlap_px": g.overlap_px,
        "target_mpp": g.target_mpp,
        "slide_mpp": g.slide_mpp,
        "mpp_source": mpp_source,
        "level0_width": int(level0_wh[0]),
        "level0_height": int(level0_wh[1]),
        "slide_id": slide_id,
        "name": slide_id,  # CLAM's name for it
        "config_hash": config_hash,
        "n_grid_positions": int(grid.n_grid),
        **magnification_attrs(g.slide_mpp, g.target_mpp),
        **(slide.to_attrs() if slide is not None else {}),
    }
    write_instance_coords_h5(path, grid.coords, grid.tissue_fraction, attrs)


def write_instance_coords_h5(path: str | Path, coords: np.ndarray, tissue_fraction: np.ndarray,
                             attrs: dict, per_instance: dict | None = None) -> None:
    """Any source's instance coordinates: coords (N, k) int64 with k = 2 or 3, tissue_fraction (N,).

    `attrs` go on the `coords` dataset and on the file root (TRIDENT and CLAM read the dataset's,
    other readers the root's); `coord_dims`, `n_patches` and `format_version` are added.
    `per_instance`: more (N,) datasets by name (a volume's instance `scale`)."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] not in COORD_DIMS:
        raise ValueError(f"coords must be (N, 2) or (N, 3), got {coords.shape}")
    if len(tissue_fraction) != len(coords):
        raise ValueError(f"{len(tissue_fraction)} tissue fractions for {len(coords)} coords")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=coords.astype(np.int64))
            f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32))
            for name, values in (per_instance or {}).items():
                if len(values) != len(coords):
                    raise ValueError(f"{len(values)} values of {name!r} for {len(coords)} coords")
                f.create_dataset(name, data=np.asarray(values))
            for key, value in {**attrs, "coord_dims": int(coords.shape[1]), "n_patches": int(len(coords)),
                               "format_version": FORMAT_VERSION}.items():
                ds.attrs[key] = value
                f.attrs[key] = value


def read_coords_h5(path: str | Path) -> tuple[np.ndarray, dict]:
    """(coords (N, k) int64, attrs dict); `attrs["coord_dims"]` is k (2 for files from before it)."""
    with h5py.File(path, "r") as f:
        ds = f["coords"]
        attrs = {k: plain_attr(v) for k, v in ds.attrs.items()}
        attrs.setdefault("coord_dims", 2)
        return ds[()].astype(np.int64), attrs


def coords_h5_is_valid(path: str | Path, config_hash: str | None = None,
                       slide: SlideIdentity | None = None) -> bool:
    """True if `path` is a complete coords.h5 (readable, consistent counts, same config hash) and,
    if `slide` is given, was tiled from a file with that identity (a file without one, from before
    identities were recorded, cannot show it was and is not valid)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            ds = f["coords"]
            coord_dims = int(ds.attrs.get("coord_dims", 2))
            ok = (ds.ndim == 2 and ds.shape[1] == coord_dims and coord_dims in COORD_DIMS and ds.shape[0] == int(ds.attrs["n_patches"])
                  and f["tissue_fraction"].shape == (ds.shape[0],)
                  and int(ds.attrs.get("format_version", 0)) == FORMAT_VERSION)
            if config_hash is not None:
                ok = ok and ds.attrs.get("config_hash") == config_hash
            if ok and slide is not None:
                recorded = SlideIdentity.from_attrs(ds.attrs)
                ok = recorded is not None and slide.matches(recorded)
            return bool(ok)
    except (OSError, KeyError, ValueError):
        return False


def read_slide_identity(path: str | Path) -> SlideIdentity | None:
    """The identity of the slide file `path` was tiled from; None for files from before it."""
    with h5py.File(path, "r") as f:
        return SlideIdentity.from_attrs(f["coords"].attrs)


def plain_attr(value):
    """An h5 attribute as a plain Python value (bytes -> str, numpy scalar -> Python scalar)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value

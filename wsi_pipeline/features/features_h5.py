"""`features.h5`: a slide's patch features, the contract between extraction and MIL.

Layout (CLAM/TRIDENT names, so their readers work):
  features  (N, D) float32 (or float16 if configured)
  coords    (N, k) int64, identical to coords.h5 (slides k = 2: level-0 top-left x, y;
            volumes k = 3: voxel corner i, j, k of the canonical RAS grid)
  attrs (file): coord_dims (k; absent in files from before it, which are k = 2), encoder, weights_source, weights_sha256 ("random" when random on purpose),
                out_dim, input_size_px, mean, std, target_mpp, patch_size, patch_size_level0, ...
                (every coords.h5 attr, prefixed "coords_" where names clash: among them the
                slide file's identity, slide_size_bytes/_mtime_ns/_fingerprint/_level_dimensions),
                library versions, config_hash, n_patches, format_version
  attrs on coords: the coords.h5 attrs under their own names (patch_size, patch_size_level0,
                patch_level, level0_magnification, target_magnification, name, ...; TRIDENT's slide
                encoders read f["coords"].attrs["patch_size_level0"]), and coord_dims, n_patches.
                Files from before this have none there: `coords_attrs` reads them from the root.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..io import atomic_path
from ..sources import COORD_DIMS
from ..tiling.coords_h5 import plain_attr

FORMAT_VERSION = 1


def write_features_h5(path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: dict,
                      dtype: str = "float32", coords_attrs: dict | None = None) -> None:
    """`attrs` go on the file; `coords_attrs` (the coords.h5 attrs, as read) on the `coords` dataset."""
    if features.shape[0] != coords.shape[0]:
        raise ValueError(f"{features.shape[0]} features for {coords.shape[0]} coords")
    if coords.ndim != 2 or coords.shape[1] not in COORD_DIMS:
        raise ValueError(f"coords must be (N, 2) or (N, 3), got {coords.shape}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.astype(dtype))
            ds = f.create_dataset("coords", data=coords.astype(np.int64))
            shape_attrs = {"coord_dims": int(coords.shape[1]), "n_patches": int(len(coords))}
            for key, value in {**attrs, **shape_attrs, "format_version": FORMAT_VERSION}.items():
                f.attrs[key] = value
            for key, value in {**(coords_attrs or {}), **shape_attrs}.items():
                ds.attrs[key] = value


def read_features_h5(path: str | Path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, dict]:
    """(features (N, D) float32, coords (N, k) int64, attrs); `attrs["coord_dims"]` is k.
    `dtype=None` keeps the features in their stored dtype (converted on the device instead)."""
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v)
                 for k, v in f.attrs.items()}
        attrs.setdefault("coord_dims", 2)
        features = f["features"][()]
        if dtype is not None:
            features = features.astype(dtype, copy=False)
        return features, f["coords"][()].astype(np.int64, copy=False), attrs


def read_features_attrs(path: str | Path) -> dict:
    """The file's root attrs only (no arrays read): what the features were made from."""
    with h5py.File(path, "r") as f:
        attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
    attrs.setdefault("coord_dims", 2)
    return attrs


def coords_attrs(path: str | Path) -> dict:
    """The tiling attrs of a features.h5: those on `coords` (their coords.h5 names), or, for a file
    written before they were put there, the root's (where a name the encoder's attrs also use
    carries a "coords_" prefix, which is taken off)."""
    with h5py.File(path, "r") as f:
        on_coords = {k: plain_attr(v) for k, v in f["coords"].attrs.items()}
        if "patch_size" in on_coords or "patch_size_level0" in on_coords:
            return on_coords
        root = {k: plain_attr(v) for k, v in f.attrs.items()}
    unprefixed = {k[len("coords_"):]: v for k, v in root.items() if k.startswith("coords_")}
    return {**root, **unprefixed, **on_coords}


def features_h5_is_valid(path: str | Path, config_hash: str | None = None,
                         coords: np.ndarray | None = None) -> bool:
    """True if `path` is complete, made with `config_hash`, and (if given) matches `coords`."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            feats, c = f["features"], f["coords"]
            coord_dims = int(f.attrs.get("coord_dims", 2))
            ok = (feats.ndim == 2 and c.shape == (feats.shape[0], coord_dims) and coord_dims in COORD_DIMS
                  and feats.shape[0] == int(f.attrs["n_patches"])
                  and feats.shape[1] == int(f.attrs["out_dim"])
                  and int(f.attrs.get("format_version", 0)) == FORMAT_VERSION)
            if ok and config_hash is not None:
                ok = f.attrs.get("config_hash") == config_hash
            if ok and coords is not None:
                ok = c.shape[0] == len(coords) and np.array_equal(c[()], coords)
            return bool(ok)
    except (OSError, KeyError, ValueError):
        return False

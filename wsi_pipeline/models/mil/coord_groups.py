"""Spatial groups of a bag's instances: deterministic k-means on patch coordinates, cached per slide.

GMMamba splits a slide into groups of nearby patches. As in the reference
(github.com/titizheng/GMMamba datasets/pre_input_data.py, ``grouping.coords_grouping``),
:func:`kmeans_groups` clusters the raw level-0 patch coordinates with scikit-learn's ``KMeans``
(k-means++, ``n_init="auto"``, ``random_state`` = the seed, 0 by default as there) and a group is the
instances of one cluster label, in label order. :class:`GroupCache` keeps the result in memory
keyed by a hash of the coordinate array, so training epochs after the first do not recluster.

Groups never come back empty: k is capped by the number of distinct coordinates (the reference
would fail, or warn and return fewer clusters, on such a bag), and any cluster that ends empty is
dropped.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict

import numpy as np


def kmeans_groups(coords: np.ndarray, n_groups: int, seed: int = 0) -> list[np.ndarray]:
    """Cluster (L, k) coordinates (k = 2 or 3) into at most ``n_groups`` non-empty groups.

    Returns a list of int64 index arrays (ascending instance indices, so each group keeps the bag's
    order), in cluster-label order as in the reference. Deterministic for a given ``seed``
    (scikit-learn's ``random_state``). Fewer than ``n_groups`` groups come back when there are
    fewer distinct coordinates.
    """
    points = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)
    if len(points) == 0:
        raise ValueError("cannot group an empty bag")
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    n_clusters = min(int(n_groups), len(np.unique(points, axis=0)))
    if n_clusters == 1:
        return [np.arange(len(points), dtype=np.int64)]
    # Imported here: every model registry import (each train/heatmap job) would pay ~0.8 s for it.
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Duplicate coordinates can still leave fewer distinct centres than clusters; the empty
        # ones are dropped below, so the warning says nothing the caller must act on.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=n_clusters, random_state=seed, n_init="auto").fit(points).labels_
    return [g.astype(np.int64) for g in (np.flatnonzero(labels == label) for label in range(n_clusters))
            if len(g)]


def contiguous_groups(length: int, n_groups: int) -> list[np.ndarray]:
    """``min(n_groups, length)`` runs of consecutive indices of near-equal size (the fallback
    without coordinates; the reference's "sequential grouping")."""
    return [np.asarray(g, dtype=np.int64) for g in np.array_split(np.arange(length), max(1, min(n_groups, length)))]


def coords_key(coords: np.ndarray) -> str:
    """Content hash of a coordinate array (values and shape; int or float coords hash alike)."""
    array = np.ascontiguousarray(coords, dtype=np.float64)
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(repr(array.shape).encode())
    return digest.hexdigest()


class GroupCache:
    """LRU cache of :func:`kmeans_groups` results keyed by (coords hash, n_groups, seed).

    Bounded by the total number of cached instance indices (stored as int32): about 4 bytes per
    instance, 128 MB at the default ``max_instances``. ``hits``/``misses`` count look-ups.
    """

    def __init__(self, max_instances: int = 32_000_000):
        self.max_instances = max_instances
        self._entries: OrderedDict[tuple, list[np.ndarray]] = OrderedDict()
        self._size = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0

    def groups(self, coords: np.ndarray, n_groups: int, seed: int = 0) -> list[np.ndarray]:
        key = (coords_key(coords), int(n_groups), int(seed))
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return [g.astype(np.int64) for g in self._entries[key]]
        self.misses += 1
        groups = kmeans_groups(coords, n_groups, seed)
        self._entries[key] = [g.astype(np.int32) for g in groups]
        self._size += len(coords)
        while self._size > self.max_instances and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._size -= sum(len(g) for g in evicted)
        return groups


# One cache per process: the grouping is a pure function of the coordinates, so models built for
# different folds or runs can share it.
DEFAULT_GROUP_CACHE = GroupCache()

"""Spatial groups of a bag's instances: deterministic k-means on patch coordinates, cached per slide.

GMMamba splits a slide into groups of nearby patches. The reference clusters the level-0 patch
coordinates with scikit-learn's KMeans (k-means++, random_state 0) once per slide and stores the
groups on disk; here :func:`kmeans_groups` is a NumPy k-means++ / Lloyd with a fixed seed, and
:class:`GroupCache` keeps the result in memory keyed by a hash of the coordinate array, so training
epochs after the first do not recluster.

Groups never come back empty: k is capped by the number of distinct coordinates (k-means++ stops
when no point is left off a centre), clusters that empty out during Lloyd iterations are re-seeded,
and any that stay empty are dropped.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def kmeans_groups(coords: np.ndarray, n_groups: int, seed: int = 0, max_iter: int = 100,
                  tol: float = 1e-4) -> list[np.ndarray]:
    """Cluster (L, k) coordinates (k = 2 or 3) into at most ``n_groups`` non-empty groups.

    Returns a list of int64 index arrays (ascending instance indices, so each group keeps the bag's
    order); groups are ordered by their first instance. Deterministic for a given ``seed``. Fewer
    than ``n_groups`` groups come back when there are fewer distinct coordinates (or, rarely, when
    two centres converge and one cluster stays empty despite re-seeding). Lloyd
    iterations stop when the centres move less than ``tol`` × the mean coordinate variance (squared
    shift summed over centres, scikit-learn's criterion) or after ``max_iter`` iterations.
    """
    points = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)
    n_points = len(points)
    if n_points == 0:
        raise ValueError("cannot group an empty bag")
    axes = [np.ascontiguousarray(points[:, a]) for a in range(points.shape[1])]
    rng = np.random.default_rng(seed)

    def squared_distances(centre):
        total = np.zeros(n_points)
        for values, c in zip(axes, centre):
            total += (values - c) ** 2
        return total

    # k-means++ seeding: each new centre is drawn with probability ∝ squared distance to the nearest
    # centre so far. When every point sits on a centre there are no more distinct points: stop there.
    centres = [points[rng.integers(n_points)]]
    nearest = squared_distances(centres[0])
    while len(centres) < n_groups:
        total = nearest.sum()
        if total <= 0:
            break
        centres.append(points[rng.choice(n_points, p=nearest / total)])
        nearest = np.minimum(nearest, squared_distances(centres[-1]))
    centres = np.stack(centres)
    k = len(centres)
    threshold = tol * float(np.mean([values.var() for values in axes]))

    def assign():
        distances = np.stack([squared_distances(c) for c in centres], axis=1)     # (L, k)
        labels = distances.argmin(1)
        for empty in np.flatnonzero(np.bincount(labels, minlength=k) == 0):
            # Re-seed an empty cluster with the point farthest from its own centre.
            farthest = distances[np.arange(n_points), labels].argmax()
            labels[farthest] = empty
            distances[farthest] = 0.0
        return labels

    for _ in range(max_iter):
        labels = assign()
        counts = np.bincount(labels, minlength=k)
        previous = centres.copy()
        filled = counts > 0
        for axis, values in enumerate(axes):
            sums = np.bincount(labels, weights=values, minlength=k)
            centres[filled, axis] = sums[filled] / counts[filled]
        if ((centres - previous) ** 2).sum() <= threshold:
            break
    labels = assign()

    order = np.argsort(labels, kind="stable")
    groups = [g for g in np.split(order, np.cumsum(np.bincount(labels, minlength=k))[:-1]) if len(g)]
    groups.sort(key=lambda g: g[0])
    return groups


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

"""Mitotic hotspot: the square window of a given area holding the most points (exact).

A window is closed: [x, x + side] x [y, y + side]. Some best window has a point on its left edge
and a point on its top edge (slide any best window right/down until it touches one; it loses no
point), so only those (x_i, y_j) corners need counting: for each left edge, the points of that
vertical strip, sorted by y, are counted with two pointers. O(n² log n), exact.
"""

from __future__ import annotations

import numpy as np

HPF_AREA_MM2 = 0.237          # one high-power field (MIDOG / WHO grading convention)
HOTSPOT_AREA_MM2 = 10 * HPF_AREA_MM2


def hotspot(xy: np.ndarray, side: float) -> tuple[int, float, float]:
    """(count, x, y): the most points any side x side square holds, and its top-left corner.

    xy (N, 2) and side in the same unit. With no points: (0, 0, 0).
    """
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return 0, 0.0, 0.0
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    xs, ys = pts[:, 0], pts[:, 1]
    best = (0, 0.0, 0.0)
    for i in range(len(pts)):
        if i and xs[i] == xs[i - 1]:
            continue
        hi = np.searchsorted(xs, xs[i] + side, side="right")
        strip = np.sort(ys[i:hi])
        # For each top edge strip[j], the points with y <= strip[j] + side.
        ends = np.searchsorted(strip, strip + side, side="right")
        counts = ends - np.arange(len(strip))
        j = int(np.argmax(counts))
        if counts[j] > best[0]:
            best = (int(counts[j]), float(xs[i]), float(strip[j]))
    return best

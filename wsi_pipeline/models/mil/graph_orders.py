"""MamMIL's patch graph and its scan orders, computed per bag and cached in memory.

The reference (github.com/Vison307/MamMIL @ 64736e1, h5toPyG.ipynb ``pt2graph``) builds, offline per
slide, with nmslib HNSW, PyG and networkx:

1. spatial kNN: for every patch a, its 8 nearest patches b by L2 on the level-0 coords (the query
   asks for 9 and drops the first hit, the patch itself) → directed edges a → b, in patch order
   then neighbour rank (``edge_index``, shape (2, 8N); also the GENConv's message edges);
2. edge weight 1 − cos(feature_a, feature_b), stored as float32;
3. ``to_networkx(to_undirected=True)`` (PyG 2.5.2, "upper"): only the directed edges a → b with
   a < b are kept, so a pair appears iff the lower-index patch lists the higher one among its
   neighbours (b → a alone, b > a, is dropped);
4. ``networkx.minimum_spanning_tree`` (Kruskal: the kept edges stably sorted by weight; a forest
   where the graph is disconnected). A node's tree neighbours are in the order their edges entered
   the tree, i.e. by increasing weight;
5. orders: ``dfs_preorder_nodes`` and ``dfs_postorder_nodes`` without a source (components from
   node 0 upwards, children in that neighbour order), and per connected component (in order of
   their smallest node) ``[root] + bfs_edges`` targets from ``random.choice(component)``.

Here the kNN is exact (:func:`knn_edges`; ties in distance broken by patch index; HNSW is
approximate and its ties are unspecified) and the BFS root of each component is drawn by a
seeded generator (``bfs_seed``), so the orders are reproducible; everything else follows the
steps above, in plain numpy (no networkx / PyG needed). Bags of fewer than 9 patches use
``L − 1`` neighbours (the reference fails on them). The cache key is a hash of the coordinates
and the features the model is given (the weights depend on the features).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

KNN = 8


@dataclass(frozen=True)
class PatchGraph:
    """A bag's kNN edges (2, E) int64 (row 0 = the patch, row 1 = its neighbour: the message
    direction GENConv uses) and its four scan orders, each an (L,) permutation."""
    edge_index: np.ndarray
    identity: np.ndarray
    dfs_preorder: np.ndarray
    dfs_postorder: np.ndarray
    bfs: np.ndarray

    @property
    def orders(self) -> list[np.ndarray]:
        """The reference's order list: identity, DFS pre-order, DFS post-order, BFS level order."""
        return [self.identity, self.dfs_preorder, self.dfs_postorder, self.bfs]


def knn_edges(coords: np.ndarray, k: int = KNN) -> np.ndarray:
    """Exact k nearest neighbours by L2 (self excluded; equal distances: lower index first).

    Returns (2, L·k') int64 edges a → b, patch-major, neighbours nearest first; k' = min(k, L − 1).
    """
    points = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)
    n = len(points)
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((2, 0), dtype=np.int64)
    from scipy.spatial import cKDTree

    tree = cKDTree(points)
    # Ask for more than k + 1: every candidate tied with the k-th neighbour must be seen to break
    # ties by index; rows where the widest hit is still tied fall back to a radius query.
    extra = min(n, k + 1 + 16)
    _, hits = tree.query(points, k=extra)
    hits = hits.reshape(n, extra)
    d2 = ((points[hits] - points[:, None]) ** 2).sum(axis=-1)       # exact for integer pixel coords
    is_self = hits == np.arange(n)[:, None]
    d2[is_self] = np.inf                                             # self last, then dropped
    rank = np.lexsort((hits, d2), axis=-1)
    hits, d2 = np.take_along_axis(hits, rank, -1), np.take_along_axis(d2, rank, -1)
    neighbours = hits[:, :k].copy()
    if extra < n:
        # Rows whose farthest hit (other than self) ties the k-th neighbour may have more tied
        # patches beyond the query: redo those with a radius query.
        last = np.where(is_self.any(axis=1), extra - 2, extra - 1)
        for a in np.flatnonzero(d2[np.arange(n), last] <= d2[:, k - 1]):
            candidates = np.asarray(tree.query_ball_point(points[a], np.sqrt(d2[a, k - 1]) * (1 + 1e-9) + 1e-9))
            cd2 = ((points[candidates] - points[a]) ** 2).sum(axis=1)
            row = candidates[np.lexsort((candidates, cd2))]
            neighbours[a] = row[row != a][:k]
    return np.stack([np.repeat(np.arange(n, dtype=np.int64), k), neighbours.reshape(-1)])


def cosine_distance_weights(features: np.ndarray, edge_index: np.ndarray) -> np.ndarray:
    """1 − cos(f_a, f_b) per edge as float32 (as stored by the reference); 1 where a vector is zero."""
    f = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1)
    a, b = edge_index
    dots = np.einsum("ij,ij->i", f[a], f[b])
    denom = norms[a] * norms[b]
    cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom != 0)
    return (1.0 - cos).astype(np.float32)


def spanning_tree_adjacency(n: int, edge_index: np.ndarray, weights: np.ndarray) -> list[list[int]]:
    """Kruskal's minimum spanning forest of the undirected graph kept from the directed edges
    (a → b with a < b only, see the module docstring), returned as each node's tree neighbours in
    the order their edges entered the tree (networkx's adjacency order)."""
    a, b = edge_index
    keep = a < b
    a, b, w = a[keep], b[keep], weights[keep].astype(np.float64)
    # A pair listed twice (cannot happen with a < b from distinct kNN rows, but a row can only
    # list b once anyway); networkx's Graph would hold it once with the last weight.
    order = np.argsort(w, kind="stable")
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    adjacency: list[list[int]] = [[] for _ in range(n)]
    for e in order.tolist():
        u, v = int(a[e]), int(b[e])
        ru, rv = root(u), root(v)
        if ru != rv:
            parent[ru] = rv
            adjacency[u].append(v)
            adjacency[v].append(u)
    return adjacency


def dfs_orders(adjacency: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Pre- and post-order of a depth-first search from node 0, then every unvisited node in
    index order, children in adjacency order (networkx ``dfs_preorder_nodes`` /
    ``dfs_postorder_nodes`` without a source)."""
    n = len(adjacency)
    visited = np.zeros(n, dtype=bool)
    pre, post = [], []
    for start in range(n):
        if visited[start]:
            continue
        visited[start] = True
        pre.append(start)
        stack = [(start, iter(adjacency[start]))]
        while stack:
            parent, children = stack[-1]
            for child in children:
                if not visited[child]:
                    visited[child] = True
                    pre.append(child)
                    stack.append((child, iter(adjacency[child])))
                    break
            else:
                stack.pop()
                post.append(parent)
    return np.asarray(pre, dtype=np.int64), np.asarray(post, dtype=np.int64)


def components(adjacency: list[list[int]]) -> list[list[int]]:
    """Connected components, in order of their smallest node; each sorted ascending."""
    n = len(adjacency)
    label = np.full(n, -1)
    result = []
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start] = len(result)
        members, frontier = [start], [start]
        while frontier:
            node = frontier.pop()
            for nb in adjacency[node]:
                if label[nb] < 0:
                    label[nb] = len(result)
                    members.append(nb)
                    frontier.append(nb)
        result.append(sorted(members))
    return result


def bfs_order(adjacency: list[list[int]], roots: list[int]) -> np.ndarray:
    """Breadth-first level order of each component from its root (one root per component, in
    component order), children in adjacency order: ``[root] + [t for s, t in bfs_edges(T, root)]``."""
    n = len(adjacency)
    visited = np.zeros(n, dtype=bool)
    order = []
    for r in roots:
        visited[r] = True
        order.append(r)
        head = len(order) - 1
        while head < len(order):
            node = order[head]
            head += 1
            for child in adjacency[node]:
                if not visited[child]:
                    visited[child] = True
                    order.append(child)
    if len(order) != n:
        raise ValueError("bfs_order needs one root in every connected component")
    return np.asarray(order, dtype=np.int64)


def seeded_roots(parts: list[list[int]], seed: int) -> list[int]:
    """One BFS root per component, drawn uniformly with a generator seeded by ``seed`` (the
    reference's ``random.choice(component)`` is unseeded)."""
    rng = np.random.default_rng(seed)
    return [int(part[rng.integers(len(part))]) for part in parts]


def build_patch_graph(coords: np.ndarray, features: np.ndarray, k: int = KNN, bfs_seed: int = 0) -> PatchGraph:
    """The kNN edges and four orders of one bag: coords (L, 2), features (L, D)."""
    n = len(coords)
    if n == 0:
        raise ValueError("cannot build a patch graph of an empty bag")
    if len(features) != n:
        raise ValueError(f"coords ({n}) and features ({len(features)}) differ in length")
    edges = knn_edges(coords, k)
    adjacency = spanning_tree_adjacency(n, edges, cosine_distance_weights(features, edges))
    pre, post = dfs_orders(adjacency)
    bfs = bfs_order(adjacency, seeded_roots(components(adjacency), bfs_seed))
    return PatchGraph(edges, np.arange(n, dtype=np.int64), pre, post, bfs)


def graph_key(coords: np.ndarray, features: np.ndarray, k: int, bfs_seed: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for array in (np.ascontiguousarray(coords, dtype=np.float64), np.ascontiguousarray(features, dtype=np.float32)):
        digest.update(array.tobytes())
        digest.update(repr(array.shape).encode())
    digest.update(f"{k},{bfs_seed}".encode())
    return digest.hexdigest()


class GraphCache:
    """LRU cache of :func:`build_patch_graph` results by a hash of (coords, features, k, seed);
    bounded by the instances it holds (about 13 int64 per instance: edges and orders)."""

    def __init__(self, max_instances: int = 4_000_000):
        self.max_instances = max_instances
        self._entries: OrderedDict[str, PatchGraph] = OrderedDict()
        self._size = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def graph(self, coords: np.ndarray, features: np.ndarray, k: int = KNN, bfs_seed: int = 0) -> PatchGraph:
        key = graph_key(coords, features, k, bfs_seed)
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        graph = build_patch_graph(coords, features, k, bfs_seed)
        self._entries[key] = graph
        self._size += len(coords)
        while self._size > self.max_instances and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._size -= len(evicted.identity)
        return graph


# One per process: the graph is a pure function of its inputs, so models of different folds share it.
DEFAULT_GRAPH_CACHE = GraphCache()

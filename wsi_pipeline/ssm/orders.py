"""Scan orders: reversible re-orderings of a sequence axis, shared by MIL, detection and volume models.

An order maps a length-L sequence to a (possibly zero-padded) length-L' sequence in scan order;
``undo`` maps the scanned result back and drops the padding, so ``undo(apply(x), L) == x`` exactly.

- :class:`Identity`: the sequence as given.
- :class:`Reverse`: back to front (the second branch of BiMamba / Vision Mamba).
- :class:`Stride`: MambaMIL's SRMamba re-embedding: zero-pad L to a multiple of ``rate``, then visit
  positions 0, r, 2r, ..., 1, r+1, ... (a (L'/r, r) -> (r, L'/r) transpose). SegMamba's inter-slice
  scan is the same reordering with ``rate`` = tokens per slice.
- :class:`Raster2D`: a row-major (h, w) grid read by rows or columns, forwards or backwards (VM-UNet's
  SS2D uses all four).
- :class:`Raster3D`: a (z, y, x)-major (d, h, w) volume read with any axis order (six permutations),
  forwards or backwards; ``"zyx"`` is the identity.
- :class:`SliceStride`: SegMamba's inter-slice scan: the tokens at one in-slice position (y, x) in
  every slice, one after the other (``Raster3D`` ``"yxz"``; ``Stride(h * w)`` without padding).
- :class:`Explicit`: a stored permutation (MamMIL's graph orders: DFS / BFS over a spanning tree),
  optionally read back to front.
"""

from __future__ import annotations

import torch


class ScanOrder:
    """Base class. Subclasses define :meth:`padded_length` and :meth:`forward_index`."""

    def padded_length(self, length: int) -> int:
        """Length L' of the scanned sequence for an input of length L (L' >= L; extra entries are zeros)."""
        return length

    def forward_index(self, length: int) -> torch.Tensor:
        """(L',) int64: scanned position j reads padded input position ``forward_index(L)[j]``."""
        raise NotImplementedError

    def inverse_index(self, length: int) -> torch.Tensor:
        """(L',) int64 inverse permutation: padded position i is found at scanned position ``[i]``."""
        return torch.argsort(self.forward_index(length))

    def apply(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Reorder ``x`` along ``dim`` (length L) into scan order; the result has length L' along ``dim``."""
        length = x.shape[dim]
        padded = self.padded_length(length)
        if padded != length:
            pad_shape = list(x.shape)
            pad_shape[dim] = padded - length
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        return x.index_select(dim, self.forward_index(length).to(x.device))

    def undo(self, y: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """Inverse of :meth:`apply`: ``y`` has length L' along ``dim``; returns the original L positions."""
        restored = y.index_select(dim, self.inverse_index(length).to(y.device))
        return restored.narrow(dim, 0, length)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Identity(ScanOrder):
    """The sequence in its given order."""

    def forward_index(self, length):
        return torch.arange(length)

    def apply(self, x, dim=1):
        return x

    def undo(self, y, length, dim=1):
        return y


class Reverse(ScanOrder):
    """Back to front (BiMamba's backward branch)."""

    def forward_index(self, length):
        return torch.arange(length - 1, -1, -1)

    def apply(self, x, dim=1):
        return x.flip(dim)

    def undo(self, y, length, dim=1):
        return y.flip(dim)


class Stride(ScanOrder):
    """Every ``rate``-th element first (MambaMIL's SRMamba): pad to a multiple of ``rate`` with zeros,
    view as (L'/rate, rate), read column by column."""

    def __init__(self, rate: int):
        if rate < 1:
            raise ValueError(f"Stride rate must be >= 1, got {rate}")
        self.rate = int(rate)

    def padded_length(self, length):
        return -(-length // self.rate) * self.rate

    def forward_index(self, length):
        padded = self.padded_length(length)
        return torch.arange(padded).view(padded // self.rate, self.rate).t().reshape(-1)


class Raster2D(ScanOrder):
    """Scan of a row-major flattened (height, width) grid.

    direction: ``"row"`` (row by row, left to right: the identity), ``"row_rev"`` (its reverse),
    ``"col"`` (column by column, top to bottom), ``"col_rev"`` (its reverse).
    """

    DIRECTIONS = ("row", "row_rev", "col", "col_rev")

    def __init__(self, height: int, width: int, direction: str = "row"):
        if direction not in self.DIRECTIONS:
            raise ValueError(f"Raster2D direction must be one of {self.DIRECTIONS}, got {direction!r}")
        self.height, self.width, self.direction = int(height), int(width), direction

    def forward_index(self, length):
        if length != self.height * self.width:
            raise ValueError(
                f"Raster2D({self.height}x{self.width}) needs a sequence of {self.height * self.width}, got {length}"
            )
        grid = torch.arange(length).view(self.height, self.width)
        index = grid.reshape(-1) if self.direction.startswith("row") else grid.t().reshape(-1)
        return index.flip(0) if self.direction.endswith("_rev") else index


def ss2d_orders(height: int, width: int) -> list[Raster2D]:
    """The four scans of VM-UNet's SS2D: rows, columns, and both reversed."""
    return [Raster2D(height, width, d) for d in ("row", "col", "row_rev", "col_rev")]


class Raster3D(ScanOrder):
    """Scan of a (z, y, x)-major flattened (depth, height, width) volume.

    direction: the three axes from slowest to fastest, e.g. ``"zyx"`` (slice by slice, each slice
    row by row: the identity), ``"zxy"`` (each slice column by column), ``"yxz"`` (z fastest: the
    slices interleaved, SegMamba's inter-slice scan); a ``"_rev"`` suffix reads the same scan back
    to front. Twelve directions in all; the 2-D ``"row"`` / ``"col"`` of one slice are ``"zyx"`` /
    ``"zxy"`` with depth 1. No padding: the sequence must hold exactly depth * height * width tokens.
    """

    AXES = "zyx"
    DIRECTIONS = tuple(f"{a}{b}{c}{suffix}" for suffix in ("", "_rev")
                       for a in "zyx" for b in "zyx" for c in "zyx" if len({a, b, c}) == 3)

    def __init__(self, depth: int, height: int, width: int, direction: str = "zyx"):
        if direction not in self.DIRECTIONS:
            raise ValueError(f"Raster3D direction must be one of {self.DIRECTIONS}, got {direction!r}")
        if min(depth, height, width) < 1:
            raise ValueError(f"Raster3D needs depth, height, width >= 1, got {depth}x{height}x{width}")
        self.depth, self.height, self.width, self.direction = int(depth), int(height), int(width), direction

    def forward_index(self, length):
        n_tokens = self.depth * self.height * self.width
        if length != n_tokens:
            raise ValueError(f"{type(self).__name__}({self.depth}x{self.height}x{self.width}) needs a sequence "
                             f"of {n_tokens}, got {length}")
        volume = torch.arange(length).view(self.depth, self.height, self.width)     # axes (z, y, x)
        axes = self.direction.removesuffix("_rev")
        index = volume.permute(*(self.AXES.index(a) for a in axes)).reshape(-1)
        return index.flip(0) if self.direction.endswith("_rev") else index


class SliceStride(Raster3D):
    """SegMamba's inter-slice scan of a (depth, height, width) volume: for each in-slice position
    (row-major y, x) the tokens of all slices, z = 0 .. depth - 1, consecutively. Equals SegMamba's
    ``stack(xz.chunk(n_slices, -1), -1).flatten(-2)`` and :class:`Stride` with rate ``height * width``
    on a full volume; unlike Stride it checks the length and never pads. ``reverse`` reads it back to front.
    """

    def __init__(self, depth: int, height: int, width: int, reverse: bool = False):
        super().__init__(depth, height, width, "yxz_rev" if reverse else "yxz")

    def __repr__(self) -> str:
        reverse = self.direction.endswith("_rev")
        return f"SliceStride(depth={self.depth}, height={self.height}, width={self.width}, reverse={reverse})"


def raster3d_orders(depth: int, height: int, width: int) -> list[Raster3D]:
    """Six scans of a volume, SS2D generalised: each axis in turn the fastest (x: ``"zyx"``,
    y: ``"zxy"``, z: ``"yxz"`` = :class:`SliceStride`), forwards and backwards."""
    return [Raster3D(depth, height, width, d) for d in ("zyx", "zxy", "yxz", "zyx_rev", "zxy_rev", "yxz_rev")]


def segmamba_orders(depth: int, height: int, width: int) -> list[ScanOrder]:
    """SegMamba's tri-orientated scans (ToM): forward, backward and inter-slice over the flattened volume."""
    return [Raster3D(depth, height, width, "zyx"), Raster3D(depth, height, width, "zyx_rev"),
            SliceStride(depth, height, width)]



class Explicit(ScanOrder):
    """A given permutation of the L positions: scanned position j reads input position ``index[j]``.

    For orders computed from data (MamMIL's DFS / BFS traversals of a patch graph), so an order is
    built per bag. ``reverse`` reads it back to front (the backward branch of a bidirectional scan).
    No padding; the permutation must hold each of 0 .. L-1 exactly once (checked once, here).
    """

    def __init__(self, index, reverse: bool = False):
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if not torch.equal(torch.sort(index).values, torch.arange(len(index))):
            raise ValueError(f"Explicit order needs a permutation of 0..{len(index) - 1}")
        self.index = index.flip(0) if reverse else index
        self.reverse = reverse
        self._inverse = torch.argsort(self.index)

    def _check(self, length):
        if length != len(self.index):
            raise ValueError(f"Explicit order of {len(self.index)} positions applied to a sequence of {length}")

    def forward_index(self, length):
        self._check(length)
        return self.index

    def inverse_index(self, length):
        self._check(length)
        return self._inverse

    def __repr__(self) -> str:
        return f"Explicit(length={len(self.index)}, reverse={self.reverse})"

"""Bags read from disk as they are needed: one source for training, validation and test passes.

Why: a cohort's features do not fit in memory (1,000 slides x 10,000 patches x 1,536-d float32 is
~61 GB), so nothing holds every bag. A `BagSource` knows each bag by a `BagRef` (slide, label,
file, shape, dtype, features hash, provenance: what a scan of the file's header gives) and reads
the arrays when a pass asks for them:

- A bounded LRU cache (`cache_bytes`; `train.bag_cache_gb`, "auto" = `auto_cache_bytes()`, 0 = none)
  keeps recently read bags, counted by their arrays' bytes. A bag larger than the whole cache is
  read each time and never cached.
- `BagSet.iter(order)` yields bags in `order` while one reader thread reads up to `prefetch` bags
  ahead (h5py and file reads need no torch), so a step's compute overlaps the next bag's read.
  The order and the arrays are the same with or without prefetch or cache: results do not depend
  on them.
- Features stay in their stored dtype (float16 files stay float16 in the cache and on the queue);
  the trainer converts them to float32 after moving them to the device.

A bag whose file changed shape since the scan is a `SlideError` naming the slide. In-memory lists
of `Bag` (tests, callers with their own arrays) go through `as_bag_set`, with the same interface.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import SlideError
from .bags import Bag, read_bag

AUTO_CACHE_FRACTION = 0.1      # of physical memory ...
AUTO_CACHE_CAP_BYTES = 8 << 30  # ... at most 8 GiB: the machine stays usable beside a training job
DEFAULT_PREFETCH = 2


@dataclass(frozen=True)
class BagRef:
    """One labelled bag as its file's header describes it (no arrays)."""
    slide_id: str
    patient_id: str
    label: int
    path: Path
    n_instances: int
    dim: int
    dtype: str             # the stored features dtype (e.g. "float16")
    features_hash: str     # the features.h5 `config_hash` attr ("" where absent)
    provenance: dict | None = None

    @property
    def nbytes(self) -> int:
        """Bytes the bag's arrays take in memory (features in their stored dtype, int64 coords)."""
        return self.n_instances * self.dim * np.dtype(self.dtype).itemsize + self.n_instances * 3 * 8


def auto_cache_bytes() -> int:
    """The default cache: AUTO_CACHE_FRACTION of physical memory, at most AUTO_CACHE_CAP_BYTES."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return int(min(AUTO_CACHE_FRACTION * total, AUTO_CACHE_CAP_BYTES))


def cache_bytes_from_config(bag_cache_gb) -> int:
    """`train.bag_cache_gb` ("auto" or GiB >= 0) in bytes."""
    if bag_cache_gb == "auto":
        return auto_cache_bytes()
    return int(float(bag_cache_gb) * (1 << 30))


class BagSource:
    """Bags of `refs` read on demand through a bounded cache (module docstring)."""

    def __init__(self, refs: Iterable[BagRef], cache_bytes: int = 0, prefetch: int = DEFAULT_PREFETCH):
        self.refs = {r.slide_id: r for r in refs}
        self.cache_bytes = max(0, int(cache_bytes))
        self.prefetch = max(0, int(prefetch))
        self._cache: OrderedDict[str, Bag] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self.reads = 0          # bags read from disk
        self.bytes_read = 0     # their arrays' bytes
        self.hits = 0           # bags served from the cache

    def bag(self, slide_id: str) -> Bag:
        """The bag of `slide_id`, from the cache or its file."""
        with self._lock:
            bag = self._cache.get(slide_id)
            if bag is not None:
                self._cache.move_to_end(slide_id)
                self.hits += 1
                return bag
        ref = self.refs[slide_id]
        features, coords, _ = read_bag(ref.path, slide_id)
        if features.shape != (ref.n_instances, ref.dim) or str(features.dtype) != ref.dtype:
            raise SlideError(slide_id, f"{ref.path} changed since it was checked: features "
                                       f"{features.shape} {features.dtype}, were "
                                       f"({ref.n_instances}, {ref.dim}) {ref.dtype}")
        bag = Bag(ref.slide_id, ref.patient_id, ref.label, features, coords, ref.features_hash,
                  ref.provenance)
        size = features.nbytes + coords.nbytes
        with self._lock:
            self.reads += 1
            self.bytes_read += size
            if size <= self.cache_bytes and slide_id not in self._cache:
                self._cache[slide_id] = bag
                self._cached += size
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.features.nbytes + old.coords.nbytes
        return bag

    def subset(self, slide_ids: Sequence[str]) -> "BagSet":
        return BagSet(self, list(slide_ids))

    def cached_bytes(self) -> int:
        return self._cached


class BagSet:
    """Some bags of a source in a fixed order: what train_fold / evaluate_loss / predict_probs take."""

    def __init__(self, source: BagSource, slide_ids: list[str]):
        self.source = source
        self.slide_ids = slide_ids
        self.refs = [source.refs[s] for s in slide_ids]

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.refs], dtype=np.int64)

    def iter(self, order: Iterable[int] | None = None) -> Iterator[Bag]:
        """The bags at positions `order` (default: all, in order), read ahead by one thread."""
        ids = [self.slide_ids[i] for i in (range(len(self)) if order is None else order)]
        if self.source.prefetch == 0 or len(ids) < 2:
            return (self.source.bag(s) for s in ids)
        return _prefetched(self.source, ids, self.source.prefetch)


class InMemoryBagSet:
    """A list of `Bag` behind the BagSet interface."""

    def __init__(self, bags: Sequence[Bag]):
        self.bags = list(bags)

    def __len__(self) -> int:
        return len(self.bags)

    @property
    def labels(self) -> np.ndarray:
        return np.array([b.label for b in self.bags], dtype=np.int64)

    def iter(self, order: Iterable[int] | None = None) -> Iterator[Bag]:
        return (self.bags[i] for i in (range(len(self)) if order is None else order))


def as_bag_set(bags) -> BagSet | InMemoryBagSet:
    """A BagSet as it is, or a sequence of Bags wrapped."""
    return bags if isinstance(bags, (BagSet, InMemoryBagSet)) else InMemoryBagSet(bags)


_DONE = object()


def _prefetched(source: BagSource, ids: list[str], depth: int) -> Iterator[Bag]:
    """Yield source.bag(s) for s in ids while a daemon thread reads up to `depth` ahead; a read
    error is raised at the bag it belongs to; closing the generator stops the thread."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader():
        for s in ids:
            try:
                item = source.bag(s)
            except BaseException as exc:  # noqa: BLE001 — handed to the consumer, raised there
                put(exc)
                return
            if not put(item):
                return
        put(_DONE)

    thread = threading.Thread(target=reader, name="bag-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)

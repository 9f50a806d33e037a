"""Patch features for one slide: coords.h5 → patches → encoder → (N, D) features.

I/O is kept off the encoder's critical path: DataLoader workers each open the slide once, read
every patch at its pyramid level, resize it to the encoder's input size and ship uint8 tensors
(4× smaller than float); normalisation, AMP and channels_last happen on the device.
`plan_reader` picks how a worker reads: tiled TIFF/SVS levels tile by tile, each tile decoded once
per batch (slides/tile_reader.py), everything else through the slide's region reader; same pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..devices import resolve_device as _resolve_device
from ..encoders import Encoder
from ..errors import SlideError
from ..slides import open_slide


@dataclass(frozen=True)
class PatchSource:
    """Everything a worker needs to read one slide's patches (picklable, no open handles)."""
    slide_path: str
    slide_id: str
    backend: str
    mpp_override: float | None
    coords: np.ndarray          # (N, 2) int64 level-0 top-left
    patch_level: int
    read_size_px: int           # side read at patch_level
    out_size_px: int            # side the encoder gets
    # "region": Slide.read_region through `backend`; "direct": tiles of the TIFF level of size
    # `level_wh` (width, height px) decoded once per batch (slides/tile_reader.py), for slides
    # `plan_reader` found eligible. Both give the same pixels.
    reader: str = "region"
    level_wh: tuple[int, int] | None = None
    level_downsample: int = 1


class PatchDataset(Dataset):
    """Items: uint8 tensor (3, S, S). The slide is opened lazily, once per worker process."""

    def __init__(self, source: PatchSource):
        self.source = source
        self._slide = None
        self._tiles = None
        self._pid = self._tiles_pid = None

    def __len__(self) -> int:
        return len(self.source.coords)

    def _open(self):
        # A handle opened in the parent must not be shared across fork: reopen per process.
        if self._slide is None or self._pid != os.getpid():
            s = self.source
            self._slide = open_slide(s.slide_path, slide_id=s.slide_id, backend=s.backend,
                                     mpp_override=s.mpp_override)
            self._pid = os.getpid()
        return self._slide

    def _open_tiles(self):
        if self._tiles is None or self._tiles_pid != os.getpid():
            from ..slides.tile_reader import TiledLevel

            s = self.source
            try:
                self._tiles = TiledLevel(s.slide_path, s.level_wh)
            except Exception as exc:  # the file changed or vanished since plan_reader looked
                raise SlideError(s.slide_id, f"direct tile reader: {type(exc).__name__}: {exc}") from exc
            self._tiles_pid = os.getpid()
        return self._tiles

    def _read_direct(self, indices) -> list[torch.Tensor]:
        s = self.source
        tiles = self._open_tiles()
        xy_level = s.coords[np.asarray(indices, dtype=np.int64)] // s.level_downsample
        try:
            patches = tiles.read_patches(xy_level, s.read_size_px)
        except Exception as exc:  # a corrupt or truncated tile: name the slide, as the region path does
            raise SlideError(s.slide_id, f"cannot read patches at level {s.patch_level} "
                                         f"(direct tile reader): {type(exc).__name__}: {exc}") from exc
        return [self._to_tensor(p) for p in patches]

    def __getitem__(self, index: int) -> torch.Tensor:
        s = self.source
        if s.reader == "direct":
            return self._read_direct([index])[0]
        x, y = s.coords[index]
        patch = self._open().read_region((int(x), int(y)), s.patch_level, (s.read_size_px, s.read_size_px))
        return self._to_tensor(patch)

    def __getitems__(self, indices: list[int]) -> list:
        try:
            return self._read_batch(indices)
        except SlideError as exc:
            # Crossing the worker boundary as data: DataLoader re-raises a worker's exception as a
            # RuntimeError wrapping the worker's whole traceback; the main process raises this instead.
            return [_ReadFailure(exc.message)]

    def _read_batch(self, indices: list[int]) -> list[torch.Tensor]:
        """A batch's patches (the DataLoader's fetcher calls this with a whole batch's indices).

        Neighbours on one grid row are read as one region and cut apart: tiffslide then decodes each
        tile once instead of once per overlapping patch (2.6× faster, bench_extract); pixels are identical.
        """
        s = self.source
        if s.reader == "direct":
            return self._read_direct(indices)
        slide = self._open()
        downsample = slide.level_downsamples[s.patch_level]
        if downsample != round(downsample):
            return [self[i] for i in indices]  # cut offsets would not be whole level pixels
        downsample = int(round(downsample))
        coords = s.coords[np.asarray(indices, dtype=np.int64)]
        size = s.read_size_px
        out: list[torch.Tensor | None] = [None] * len(indices)
        for run in _row_runs(coords, size * downsample, downsample):
            x0, y0 = (int(v) for v in coords[run[0]])
            width = (int(coords[run[-1], 0]) - x0) // downsample + size
            region = slide.read_region((x0, y0), s.patch_level, (width, size))
            for k in run:
                dx = (int(coords[k, 0]) - x0) // downsample
                out[k] = self._to_tensor(region[:, dx:dx + size])
        return out

    def _to_tensor(self, patch: np.ndarray) -> torch.Tensor:
        s = self.source
        if s.read_size_px != s.out_size_px:
            # PIL's resize filters scale their support when shrinking: antialiased, like a BOX/area.
            patch = np.array(Image.fromarray(np.ascontiguousarray(patch)).resize(  # writable for torch
                (s.out_size_px, s.out_size_px), Image.Resampling.BILINEAR))
        return torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)


@dataclass(frozen=True)
class _ReadFailure:
    """A batch a worker could not read; `message` is the SlideError's text without the slide prefix."""
    message: str


def _collate(items: list) -> torch.Tensor | _ReadFailure:
    if items and isinstance(items[0], _ReadFailure):
        return items[0]
    return torch.stack(items)


MAX_RUN_PATCHES = 16  # bounds one region read (16 × 224 px wide) and the cost of gaps inside it


def _row_runs(coords: np.ndarray, size_level0: int, downsample: int) -> list[list[int]]:
    """Positions in `coords` grouped into runs read as one region: the same top y, each patch
    starting at most one patch width after the previous one, x offsets whole level pixels."""
    runs: list[list[int]] = []
    run_x0 = run_y = prev_x = None
    for k in np.lexsort((coords[:, 0], coords[:, 1])).tolist():
        x, y = int(coords[k, 0]), int(coords[k, 1])
        if (runs and y == run_y and 0 <= x - prev_x <= size_level0 and (x - run_x0) % downsample == 0
                and len(runs[-1]) < MAX_RUN_PATCHES):
            runs[-1].append(k)
        else:
            runs.append([k])
            run_x0, run_y = x, y
        prev_x = x
    return runs


READERS = ("auto", "direct", "region")


# Vendors (as the region reader names them) whose levels are plain tiled TIFF pages, each tile at
# its grid position: Aperio SVS and generic tiled TIFF. Others lay tiles out their own way (Ventana
# BIF overlaps them, Philips leaves sparse tiles, Leica SCN places several images on one canvas),
# which OpenSlide composes and a page-by-page read would not: they keep the region reader.
DIRECT_VENDORS = {"openslide": {"aperio", "generic-tiff"}, "tiffslide": {"aperio", "unknown", "generic"}}


def plan_reader(source: PatchSource, level_dimensions, level_downsamples, region_backend: str,
                vendor: str, requested: str = "auto") -> tuple[PatchSource, str, str]:
    """`source` with its patch reader chosen: (source, reader name for features.h5, why).
    `level_dimensions`, `level_downsamples`, `region_backend` and `vendor` are the opened `Slide`'s.

    "auto" reads tiled TIFF/SVS levels directly (3-7x OpenSlide's patches/s per process without resize,
    benchmarks/results/reader.md) and keeps the region reader (`region_backend`, the backend the
    slide opened with) for everything else; "direct" insists (a SlideError says why it cannot);
    "region" never reads directly.
    """
    if requested not in READERS:
        raise ValueError(f"extract.reader must be one of {READERS}, got {requested!r}")
    if requested == "region":
        return dataclasses.replace(source, reader="region"), region_backend, "extract.reader: region"
    from ..slides.tile_reader import direct_read_problem

    level = source.patch_level
    level_wh = tuple(int(v) for v in level_dimensions[level])
    downsample = float(level_downsamples[level])
    if vendor not in DIRECT_VENDORS.get(region_backend, ()):
        problem = f"{region_backend} vendor {vendor!r} is not a plain tiled TIFF layout"
    else:
        problem = direct_read_problem(source.slide_path, level_wh, downsample, source.coords)
    if problem is None:
        planned = dataclasses.replace(source, reader="direct", level_wh=level_wh,
                                      level_downsample=int(round(downsample)))
        return planned, "direct", f"tiled TIFF level {level} read tile by tile"
    if requested == "direct":
        raise SlideError(source.slide_id, f"extract.reader: direct: cannot read level {level} directly "
                                          f"({problem}); use auto or region")
    return dataclasses.replace(source, reader="region"), region_backend, f"region reader: {problem}"


def resolve_device(device: str) -> torch.device:
    return _resolve_device(device, "extract.device")


def autocast_for(device: torch.device, precision: str):
    """AMP context: bf16/fp16 on GPU when asked ("auto" → bf16 on GPU, fp32 on CPU)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    # On CPU the encoder itself needs the cores; one reader process hides decoding behind it.
    # On a GPU node the readers are the limit (H100, ViT-B/16 bf16: encoder 7,939 patches/s, 8 workers
    # ~2,300 end to end): use every core but two (the loop and pinning), up to 16.
    return min(16, max(1, cores - 2)) if device.type == "cuda" else 1


def make_loader(source: PatchSource, batch_size: int, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(PatchDataset(source), batch_size=batch_size, shuffle=False, collate_fn=_collate,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


@torch.inference_mode()
def extract_features(encoder: Encoder, source: PatchSource, *, batch_size: int | None = None,
                     num_workers: int | None = None, precision: str = "auto",
                     on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D) float32 features of `source`'s patches, in coords order."""
    # Buffers too: a parameter-free encoder (stain_texture) has only its normalisation buffers.
    device = next((t.device for t in (*encoder.parameters(), *encoder.buffers())), torch.device("cpu"))
    workers = default_workers(device) if num_workers is None else num_workers
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    loader = make_loader(source, batch_size, workers, pin_memory=device.type == "cuda")
    out = np.empty((len(source.coords), encoder.out_dim), dtype=np.float32)
    channels_last = device.type == "cuda"
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    start = 0
    with autocast_for(device, precision):
        for batch in loader:
            if isinstance(batch, _ReadFailure):
                raise SlideError(source.slide_id, batch.message)
            batch = batch.to(device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            feats = encoder(batch).float()
            n = feats.shape[0]
            out[start:start + n] = feats.cpu().numpy()
            start += n
            if on_batch is not None:
                on_batch(n)
    if start != len(out):
        raise RuntimeError(f"loader yielded {start} patches, expected {len(out)}")
    return out

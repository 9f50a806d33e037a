"""The µm footprint each peer tool's reading code sees in our files, and export times.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_interop.py
Makes the two tiny demo slides of tests/interop (the same 512 × 384 µm of tissue at 0.25 and
0.5 µm/px), tiles and extracts them (`stain_texture`) at 0.5 µm/px / 224 px and at 1.0 µm/px /
112 px (112 µm patches both times), exports to clam, trident and stamp, and reads every file with
the reader reproductions in tests/interop/readers.py (each cites the upstream code it follows).
Prints a markdown table: path read, footprint µm on the 0.25 and the 0.5 µm/px slide.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import h5py
import openslide

from tests.interop import conftest as fixtures
from tests.interop import readers
from wsi_pipeline.cli import main
from wsi_pipeline.demo.slides import DemoSlideSpec, write_demo_slide


def measure(folder: Path) -> None:
    paths = {}
    for i, (sid, (mpp, width, height)) in enumerate(fixtures.SLIDES.items()):
        paths[sid] = folder / f"{sid}.svs"
        write_demo_slide(paths[sid], DemoSlideSpec(width_px=width, height_px=height, mpp=mpp, seed=i, positive=i == 0))
    for target_mpp, patch_px in [(0.5, 224), (1.0, 112)]:
        work = folder / f"target_{target_mpp}"
        work.mkdir()
        run = fixtures._tiny_run(work, paths, target_mpp, patch_px, list(fixtures.SLIDES))
        outs, seconds = {}, {}
        for target in ("clam", "trident", "stamp"):
            outs[target] = work / f"out_{target}"
            t0 = time.perf_counter()
            assert main(["export", "--to", target, "--manifest", str(run.manifest), "--run", str(run.run),
                         "--out", str(outs[target]), "--config", str(run.config), "--no-progress"]) == 0
            seconds[target] = time.perf_counter() - t0
        rows: dict[str, dict] = {}
        for sid, (mpp, _, _) in fixtures.SLIDES.items():
            tiles, feats = run.run / "tiles" / f"{sid}.coords.h5", run.run / "features" / fixtures.ENCODER / f"{sid}.h5"
            attrs, _ = readers.trident_read_coords(tiles)
            rows.setdefault("TRIDENT | RUN/tiles/{id}.coords.h5 `coords.attrs` (WSIPatcher)", {})[mpp] = \
                readers.trident_patcher_level0_side(attrs) * mpp
            batch = readers.trident_slide_encoder_batch(feats)
            rows.setdefault("TRIDENT slide encoder | RUN/features/E/{id}.h5 `coords.attrs['patch_size_level0']`", {})[mpp] = \
                batch["attributes"]["patch_size_level0"] * mpp
            with openslide.OpenSlide(str(paths[sid])) as wsi:
                level, size, _, _ = readers.clam_bag_fp_reads(tiles, wsi)
                rows.setdefault("CLAM (wrong use) | RUN/tiles/{id}.coords.h5 read as CLAM patches", {})[mpp] = \
                    f"{readers.footprint_um_at(wsi.level_downsamples[level], size, mpp):g} (level {level}, {size} px)"
                level, size, _, _ = readers.clam_bag_fp_reads(outs["clam"] / "patches" / f"{sid}.h5", wsi)
                rows.setdefault("CLAM Whole_Slide_Bag_FP | OUT/patches/{id}.h5", {})[mpp] = \
                    f"{readers.footprint_um_at(wsi.level_downsamples[level], size, mpp):g} (level {level}, {size} px)"
            job = next(outs["trident"].glob("*x_*px_*px_overlap"))
            attrs, _ = readers.trident_read_coords(job / "patches" / f"{sid}_patches.h5")
            rows.setdefault(f"TRIDENT WSIPatcher | OUT/{job.name}/patches/{{id}}_patches.h5", {})[mpp] = \
                readers.trident_patcher_level0_side(attrs) * mpp
            with h5py.File(outs["stamp"] / "features" / f"{sid}.h5", "r") as h5:
                _, tile_size_um, tile_size_px = readers.stamp_get_coords(h5)
            rows.setdefault("STAMP get_coords | OUT/features/{id}.h5 `tile_size_um`", {})[mpp] = \
                f"{tile_size_um:g} (mpp {tile_size_um / tile_size_px:g})"
        print(f"\ntarget {target_mpp} µm/px, {patch_px} px (= {target_mpp * patch_px:g} µm)\n")
        print("| tool / reader | path | µm at 0.25 µm/px | µm at 0.5 µm/px |\n|---|---|---|---|")
        for name, by_mpp in rows.items():
            tool, path = name.split(" | ")
            print(f"| {tool} | {path} | {by_mpp[0.25]} | {by_mpp[0.5]} |")
        print("export wall time, 2 slides: " + ", ".join(f"{t} {s:.2f} s" for t, s in seconds.items()))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench_interop_") as tmp:
        measure(Path(tmp))

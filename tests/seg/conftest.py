"""Segmentation test data: a small demo cohort and noisy, coarse CAMs made from its ground truth.

The CAMs stand in for an imperfect stage-1 model: one score per 224 px patch (112 µm) of the tiling
grid, the patch's lesion fraction squeezed into [0.1, 0.95] plus Gaussian noise (sigma 0.12),
clipped to [0, 1] — patch-level, blocky at lesion borders and noisy everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

CAM_PATCH_PX = 224
CAM_NOISE = 0.12


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small models: one intra-op thread is as fast as two and robust to shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def simulated_cams(slide_path, lesion_class: str = "tumor", seed: int = 0, noise: float = CAM_NOISE):
    """PatchCams for a demo slide from its ground-truth lesion mask + tissue mask (see module doc)."""
    from PIL import Image

    from wsi_pipeline.segmentation import PatchCams, SlideGrid, read_grid_image
    from wsi_pipeline.slides import open_slide
    from wsi_pipeline.tiling.grid import plan_geometry, tile_tissue, tissue_fractions
    from wsi_pipeline.tiling.tissue import detect_tissue

    with open_slide(slide_path) as slide:
        grid = SlideGrid.for_mpp(slide.dimensions, slide.mpp, 8.0)
        image = read_grid_image(slide, grid)
        geometry = plan_geometry(slide.mpp, slide.level_downsamples, 0.5, CAM_PATCH_PX)
        level0_wh = slide.dimensions
    tissue = detect_tissue(image, grid.mpp)
    scale = (float(grid.downsample), float(grid.downsample))
    tiles = tile_tissue(level0_wh, geometry, tissue, scale, min_tissue_fraction=0.25)
    stem = str(slide_path)[: -len(".svs")]
    truth = np.asarray(Image.open(f"{stem}.lesion.png")) > 0
    from wsi_pipeline.demo.slides import GT_DOWNSAMPLE

    lesion_fraction = tissue_fractions(tiles.coords, geometry.patch_size_level0, truth,
                                       (float(GT_DOWNSAMPLE), float(GT_DOWNSAMPLE)))
    rng = np.random.default_rng(seed)
    scores = np.clip(0.1 + 0.85 * lesion_fraction + rng.normal(0.0, noise, len(lesion_fraction)), 0.0, 1.0)
    return PatchCams(tiles.coords, scores, geometry.patch_size_level0, lesion_class=lesion_class,
                     source="simulated: ground truth + noise")


@pytest.fixture(scope="session")
def seg_cohort(tmp_path_factory):
    """(manifest path, run folder) for a 2-slide demo cohort (DEMO-000 normal, DEMO-001 tumor,
    2048 x 1536 px at 0.5 µm/px) with simulated CAMs in RUN/segment/cams/."""
    from wsi_pipeline.demo.slides import make_demo_cohort
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.manifest import load_manifest
    from wsi_pipeline.segmentation import save_patch_cams

    root = tmp_path_factory.mktemp("seg_cohort")
    manifest = make_demo_cohort(root / "data", 2, width_px=2048, height_px=1536, mpp=0.5, seed=0)
    run = root / "run"
    for i, record in enumerate(load_manifest(manifest)):
        save_patch_cams(RunFolder(run).segment_dir / "cams" / f"{record.slide_id}.npz",
                        simulated_cams(record.path, seed=i))
    return manifest, run


TOY_FMAMIL_ARGS = {"d_model": 16, "n_layers": 1, "d_state": 4, "attention_dim": 8, "filter_size": 8}


def toy_fmamil_run(seg_cohort, root):
    """A run folder for the cohort's tumour slide with random 8-d features on its CAM patches, and
    where its one-fold fmamil ensemble goes → (record, RunFolder, coords, fold dir, fold meta)."""
    from wsi_pipeline.features.features_h5 import write_features_h5
    from wsi_pipeline.run.folder import RunFolder
    from wsi_pipeline.run.manifest import load_manifest
    from wsi_pipeline.segmentation import load_patch_cams

    manifest, seg_run = seg_cohort
    record = load_manifest(manifest).records[1]
    coords = load_patch_cams(seg_run / "segment" / "cams" / f"{record.slide_id}.npz").coords
    run = RunFolder(root / "run")
    write_features_h5(run.features_h5("toy", record.slide_id),
                      np.random.default_rng(0).normal(size=(len(coords), 8)).astype(np.float32), coords,
                      {"patch_size_level0": 224, "encoder": "toy"})
    meta = {"model": "fmamil", "in_dim": 8, "n_classes": 2, "classes": ["normal", "tumor"],
            "model_args": TOY_FMAMIL_ARGS, "encoder": "toy"}
    return record, run, coords, run.mil_dir("fmamil", record.cohort) / "fold_0", meta


def save_toy_fmamil(fold, meta, seed: int) -> None:
    """A freshly initialised (seeded) small fmamil saved as `fold`."""
    from wsi_pipeline.models.mil import create_aggregator
    from wsi_pipeline.training.checkpoints import save_fold_model

    torch.manual_seed(seed)
    save_fold_model(create_aggregator("fmamil", 8, 2, **TOY_FMAMIL_ARGS), fold, meta)

"""One volume through the pipeline's files: tile + extract (coords.h5, features.h5) and explain.

    extract_volume(record, run, encoder, params)   RUN/tiles/{id}.coords.h5, RUN/features/{enc}/{id}.h5
    explain_volume(record, run, models, ...)       RUN/heatmaps/{model}/{id}.heatmap.nii.gz, .montage.png,
                                                   .cam_mask.nii.gz, and numbers (peak, Dice)

The files are the slides' layouts with coords (N, 3) (`coord_dims` 3) and the volume's grid
recorded (spacing_mm, affine, source_shape, source_affine), so training (training/cv.py, the train stage) reads
volume bags exactly like slide bags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..features.features_h5 import read_features_h5, write_features_h5
from ..run.folder import RunFolder
from ..tiling.coords_h5 import write_instance_coords_h5
from .checks import load_truth_mask
from .explain import (axial_montage, cam_mask, dice, heatmap_peak_vox, instance_heatmap, smooth_heatmap, to_source_grid,
                      write_nifti)
from .instances import VolumeInstanceParams, encode_instances, instance_box_sizes, prepare, volume_instances
from .readers import open_volume


def extract_volume(record, run: RunFolder, encoder, encoder_name: str,
                   params: VolumeInstanceParams = VolumeInstanceParams()) -> Path:
    """Instances and features of one manifest row with a modality; returns the features.h5 path."""
    volume = open_volume(record.path, volume_id=record.slide_id, modality=record.modality, frame=record.frame)
    instances = volume_instances(volume, params)
    attrs = instances.attrs()
    config_hash = f"{params.config_hash()}-{encoder.weights_sha256[:12]}-{encoder_name}"
    write_instance_coords_h5(run.coords_h5(record.slide_id), instances.coords, instances.body_fraction,
                             {**attrs, "config_hash": params.config_hash()}, {"scale": instances.scale})
    features = encode_instances(instances, encoder)
    out = run.features_h5(encoder_name, record.slide_id)
    write_features_h5(out, features, instances.coords, {
        **attrs, "encoder": encoder_name, "weights_source": encoder.weights_source,
        "weights_sha256": encoder.weights_sha256, "out_dim": int(encoder.out_dim), "config_hash": config_hash})
    return out


def read_instance_scale(coords_path: Path, n: int) -> np.ndarray | None:
    """The `scale` of each instance from coords.h5 (None: one scale, or a file from before scales)."""
    import h5py

    if not Path(coords_path).is_file():
        return None
    with h5py.File(coords_path, "r") as f:
        if "scale" not in f:
            return None
        scale = f["scale"][()]
    if len(scale) != n:
        raise ValueError(f"{coords_path}: {len(scale)} instance scales for {n} features (re-extract)")
    return scale


@dataclass
class VolumeExplanation:
    volume_id: str
    heatmap_path: Path
    montage_path: Path
    mask_path: Path
    peak_source_vox: tuple[int, int, int]
    peak_in_lesion: bool | None      # None without a truth mask
    dice: float | None
    probs: dict                      # class name -> probability (mean over the models given)


def explain_volume(record, run: RunFolder, models, model_name: str, encoder_name: str,
                   params: VolumeInstanceParams = VolumeInstanceParams(), truth_path: str | Path | None = None,
                   cam_threshold: float = 0.5, smooth: bool = True) -> VolumeExplanation:
    """Heatmap, montage and CAM mask of one volume from fold `models` ([(model, meta)], as
    `load_ensemble` gives; pass the fold that held the volume out for an honest figure).
    `smooth`: Gaussian-smooth the box-painted map at half the instance lattice step (explain.py)."""
    from ..training.inference import ensemble_predict

    volume = open_volume(record.path, volume_id=record.slide_id, modality=record.modality, frame=record.frame)
    # The truth mask is checked before anything is written: on another grid its Dice means nothing.
    truth = None
    if truth_path is not None and Path(truth_path).is_file():
        truth = load_truth_mask(volume, truth_path)
    features, coords, attrs = read_features_h5(run.features_h5(encoder_name, record.slide_id))
    result = ensemble_predict(models, features, coords)
    grid, _, _ = prepare(volume, params)
    if not np.allclose(grid.affine, np.asarray(attrs["affine"])):
        raise ValueError(f"{record.slide_id}: the volume's grid differs from its features.h5 (re-extract)")
    # Each instance painted with its own scale's box (coords.h5 `scale`); smoothed at the fine lattice.
    scale = read_instance_scale(run.coords_h5(record.slide_id), len(coords))
    heat_grid = instance_heatmap(coords, result.instance_scores, grid.shape, instance_box_sizes(params, scale, len(coords)))
    if smooth:
        heat_grid = smooth_heatmap(heat_grid, (params.stride_vox / 2, params.stride_vox / 2, params.slice_step / 2))
    heat = to_source_grid(heat_grid, grid.affine, volume.source_shape, volume.source_affine)
    folder = run.heatmaps_dir(model_name)
    heatmap_path = write_nifti(folder / f"{record.slide_id}.heatmap.nii.gz", heat, volume.source_affine)
    montage_path = folder / f"{record.slide_id}.montage.png"
    axial_montage(grid.data, heat_grid, montage_path, ct=volume.modality == "CT")
    mask = cam_mask(heat, cam_threshold)
    mask_path = write_nifti(folder / f"{record.slide_id}.cam_mask.nii.gz", mask.astype(np.uint8),
                            volume.source_affine, dtype=np.uint8)
    peak = heatmap_peak_vox(heat)
    in_lesion = score = None
    if truth is not None:
        if truth.any():
            in_lesion = bool(truth[peak])
            score = dice(mask, truth)
    probs = {str(name): float(p) for name, p in zip(result.classes, result.probs)}
    return VolumeExplanation(record.slide_id, heatmap_path, montage_path, mask_path, peak, in_lesion, score, probs)

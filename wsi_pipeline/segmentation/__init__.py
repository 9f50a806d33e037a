"""Weakly supervised lesion segmentation from patch CAMs (FMaMIL stage 2), on plain arrays.

    coords, CAM scores --cam.cam_map--> CAM map on a working grid (grid.SlideGrid)
    CAM map, tissue    --pseudo_labels.make_pseudo_labels--> soft targets + pixel weights
    images, labels     --train.train_segmenter--> trained segmenter (labels self-corrected)
    image              --inference.predict_probability_map--> probability map (overlap-blended windows)
    probability        --export.lesion_mask / lesion_geojson / write_mask_tiff--> mask, GeoJSON, TIFF
    mask, truth        --metrics.score_mask--> Dice, IoU

`stages/segment.py` wires these to slides and the run folder. Torch is imported only inside the
functions that run a model.
"""

from .cam import PatchCams, cam_map, estimate_stride, load_patch_cams, patch_coverage, save_patch_cams
from .export import lesion_geojson, lesion_mask, write_mask_tiff
from .grid import SlideGrid, read_grid_image, resample
from .inference import (blending_window, predict_probability_map, segmenter_predictor,
                        sliding_window_predict)
from .metrics import dice, iou, mask_on_grid, score_mask
from .pseudo_labels import PseudoLabels, make_pseudo_labels
from .train import TrainHistory, TrainingSlide, TrainParams, segmentation_loss, self_correct, train_segmenter

__all__ = [
    "PatchCams", "cam_map", "estimate_stride", "load_patch_cams", "patch_coverage", "save_patch_cams",
    "lesion_geojson", "lesion_mask", "write_mask_tiff",
    "SlideGrid", "read_grid_image", "resample",
    "blending_window", "predict_probability_map", "segmenter_predictor", "sliding_window_predict",
    "dice", "iou", "mask_on_grid", "score_mask",
    "PseudoLabels", "make_pseudo_labels",
    "TrainHistory", "TrainingSlide", "TrainParams", "segmentation_loss", "self_correct", "train_segmenter",
]

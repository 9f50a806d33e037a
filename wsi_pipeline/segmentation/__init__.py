"""Weakly supervised lesion segmentation from patch CAMs (FMaMIL stage 2), on plain arrays.

    coords, CAM scores --cam.cam_map--> CAM map on a working grid (grid.SlideGrid)
    negative slides' CAM scores --calibration.calibrate_thresholds--> cam_high / gate above them
    CAM map, tissue    --pseudo_labels.make_pseudo_labels--> soft targets + pixel weights
    images, labels     --train.train_segmenter--> trained segmenter (labels self-corrected)
    image              --inference.predict_probability_map--> probability map (overlap-blended windows)
    probability        --export.lesion_mask / lesion_geojson / write_mask_tiff--> mask, GeoJSON, TIFF
    mask, truth        --metrics.score_mask--> Dice, IoU

`stages/segment.py` wires these to slides and the run folder. Torch is imported only inside the
functions that run a model.
"""

# Names are loaded on first use (PEP 562): `config` imports `segmentation.params` and must not pull
# scipy/tifffile in with it, or every CLI call would pay for them.
_MODULE_OF = {
    **dict.fromkeys(("PatchCams", "cam_map", "estimate_stride", "load_patch_cams", "patch_coverage",
                     "save_patch_cams"), "cam"),
    **dict.fromkeys(("CamThresholds", "calibrate_thresholds"), "calibration"),
    **dict.fromkeys(("lesion_geojson", "lesion_mask", "write_mask_tiff"), "export"),
    **dict.fromkeys(("SlideGrid", "read_grid_image", "resample"), "grid"),
    **dict.fromkeys(("blending_window", "predict_probability_map", "segmenter_predictor",
                     "sliding_window_predict"), "inference"),
    **dict.fromkeys(("dice", "iou", "mask_on_grid", "score_mask"), "metrics"),
    **dict.fromkeys(("PseudoLabels", "make_pseudo_labels"), "pseudo_labels"),
    **dict.fromkeys(("TrainHistory", "TrainingSlide", "TrainParams", "segmentation_loss", "self_correct",
                     "train_segmenter"), "train"),
}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "PatchCams", "cam_map", "estimate_stride", "load_patch_cams", "patch_coverage", "save_patch_cams",
    "CamThresholds", "calibrate_thresholds",
    "lesion_geojson", "lesion_mask", "write_mask_tiff",
    "SlideGrid", "read_grid_image", "resample",
    "blending_window", "predict_probability_map", "segmenter_predictor", "sliding_window_predict",
    "dice", "iou", "mask_on_grid", "score_mask",
    "PseudoLabels", "make_pseudo_labels",
    "TrainHistory", "TrainingSlide", "TrainParams", "segmentation_loss", "self_correct", "train_segmenter",
]

"""Radiology volumes (CT/MRI) as sources: read (NIfTI, DICOM series), canonical RAS, resample,
intensity windows, body mask, 2.5-D instances with coords (N, 3), and 3-D explanations (NIfTI
heatmaps, montages, CAM masks). nibabel and pydicom are optional (`pip install 'wsi-pipeline[volumes]'`):
this package imports without them and says so where they are needed."""

from .volume import MODALITIES, Volume, VolumeError
from .readers import open_volume, read_dicom_series, read_nifti
from .resample import resample_to_spacing, to_grid
from .intensity import CT_WINDOWS, ct_windows, normalise_mri, window
from .mask import body_mask, otsu_threshold
from .instances import VolumeInstanceParams, VolumeInstances, encode_instances, instance_images, volume_instances
from .explain import (axial_montage, cam_mask, dice, heatmap_peak_vox, instance_heatmap, smooth_heatmap, to_source_grid,
                      write_nifti)

__all__ = ["CT_WINDOWS", "MODALITIES", "Volume", "VolumeError", "VolumeInstanceParams", "VolumeInstances",
           "axial_montage", "body_mask", "cam_mask", "ct_windows", "dice", "encode_instances", "heatmap_peak_vox",
           "instance_heatmap", "instance_images", "normalise_mri", "open_volume", "otsu_threshold",
           "read_dicom_series", "read_nifti", "resample_to_spacing", "smooth_heatmap", "to_grid", "to_source_grid", "volume_instances",
           "window", "write_nifti"]

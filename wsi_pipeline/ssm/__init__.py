"""State-space (Mamba) core: selective scan with CUDA / native / reference backends, causal conv1d,
Mamba-1 blocks and reusable scan orders (1-D, 2-D, 3-D). Runs on CPU without mamba-ssm; uses its
kernels on GPU."""

from wsi_pipeline.ssm.backend import resolve_backend, set_backend, use_backend
from wsi_pipeline.ssm.conv1d import causal_conv1d
from wsi_pipeline.ssm.mamba_block import BranchedMambaBlock, MambaBlock, MultiOrderMamba, SSMBranch
from wsi_pipeline.ssm.orders import (Explicit, Identity, Raster2D, Raster3D, Reverse, ScanOrder, SliceStride, Stride,
                                     raster3d_orders, segmamba_orders, ss2d_orders)
from wsi_pipeline.ssm.scan import selective_scan, selective_scan_native, selective_scan_ref

__all__ = [
    "BranchedMambaBlock",
    "Explicit",
    "Identity",
    "MambaBlock",
    "MultiOrderMamba",
    "Raster2D",
    "Raster3D",
    "Reverse",
    "SSMBranch",
    "ScanOrder",
    "SliceStride",
    "Stride",
    "causal_conv1d",
    "raster3d_orders",
    "resolve_backend",
    "segmamba_orders",
    "selective_scan",
    "selective_scan_native",
    "selective_scan_ref",
    "set_backend",
    "ss2d_orders",
    "use_backend",
]

"""State-space (Mamba) core: selective scan with CUDA / native / reference backends, causal conv1d,
Mamba-1 blocks and reusable scan orders. Runs on CPU without mamba-ssm; uses its kernels on GPU."""

from wsi_pipeline.ssm.backend import resolve_backend, set_backend, use_backend
from wsi_pipeline.ssm.conv1d import causal_conv1d
from wsi_pipeline.ssm.mamba_block import BranchedMambaBlock, MambaBlock, MultiOrderMamba, SSMBranch
from wsi_pipeline.ssm.orders import Identity, Raster2D, Reverse, ScanOrder, Stride, ss2d_orders
from wsi_pipeline.ssm.scan import selective_scan, selective_scan_native, selective_scan_ref

__all__ = [
    "BranchedMambaBlock",
    "Identity",
    "MambaBlock",
    "MultiOrderMamba",
    "Raster2D",
    "Reverse",
    "SSMBranch",
    "ScanOrder",
    "Stride",
    "causal_conv1d",
    "resolve_backend",
    "selective_scan",
    "selective_scan_native",
    "selective_scan_ref",
    "set_backend",
    "ss2d_orders",
    "use_backend",
]

"""Vim4Path on a GPU: mamba-ssm's scan and causal-conv1d kernels (and our native scan on the device)
give the CPU-proven features. Marked ``gpu``; skipped without a CUDA device. Run: ``pytest -m gpu tests/gpu``."""

from __future__ import annotations

import pytest
import torch

from wsi_pipeline.encoders import get_spec
from wsi_pipeline.ssm import use_backend
from wsi_pipeline.ssm.backend import causal_conv1d_kernel_available, mamba_kernel_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend", ["native", "cuda"])
def test_vim4path_on_gpu_equals_cpu(backend):
    if backend == "cuda" and not (mamba_kernel_available() and causal_conv1d_kernel_available()):
        pytest.skip("mamba-ssm / causal-conv1d kernels not installed")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # true fp32
    try:
        torch.manual_seed(0)
        model = get_spec("vim4path_s").build(depth=2).eval()
        x = torch.randn(4, 3, 224, 224)
        with torch.no_grad(), use_backend("native"):
            want = model(x)
        with torch.no_grad(), use_backend(backend):
            got = model.cuda()(x.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)

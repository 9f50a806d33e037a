"""Backend choice: one resolver, env var, process-wide override, clear error for a missing kernel."""

import subprocess
import sys

import pytest
import torch

from wsi_pipeline.ssm import backend
from wsi_pipeline.ssm.backend import ENV_VAR, resolve_backend, set_backend, use_backend


@pytest.fixture(autouse=True)
def clean_backend_state(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_backend(None)
    yield
    set_backend(None)


def test_auto_on_cpu_is_native():
    assert resolve_backend(None, "cpu") == "native"
    assert resolve_backend("auto", torch.device("cpu")) == "native"


def test_precedence_argument_over_override_over_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "ref")
    assert resolve_backend(None, "cpu") == "ref"
    set_backend("native")
    assert resolve_backend(None, "cpu") == "native"
    assert resolve_backend("ref", "cpu") == "ref"


def test_use_backend_restores_previous_choice():
    set_backend("ref")
    with use_backend("native"):
        assert resolve_backend(None, "cpu") == "native"
    assert resolve_backend(None, "cpu") == "ref"


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown SSM backend"):
        set_backend("triton")
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend(None, "cpu")


def test_forcing_cuda_without_the_kernel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backend, "mamba_kernel_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pip install 'wsi-pipeline\[cuda\]'"):
        resolve_backend("cuda", "cpu")


def test_forcing_cuda_for_cpu_tensors_is_an_error(monkeypatch):
    monkeypatch.setattr(backend, "mamba_kernel_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA device"):
        resolve_backend("cuda", "cpu")


def test_cpu_path_never_imports_the_cuda_packages():
    code = (
        "import sys, torch\n"
        "from wsi_pipeline.ssm import MambaBlock, BranchedMambaBlock\n"
        "x = torch.randn(2, 12, 16, requires_grad=True)\n"
        "for block in (MambaBlock(16), BranchedMambaBlock(16)):\n"
        "    block(x).sum().backward()\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('mamba_ssm', 'causal_conv1d', "
        "'selective_scan_cuda', 'causal_conv1d_cuda')]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

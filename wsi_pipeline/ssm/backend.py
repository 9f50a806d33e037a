"""Where the selective-scan backend is chosen: one function, one env var, one override.

Backends:
- ``"cuda"``: mamba-ssm's compiled ``selective_scan_fn`` (and causal-conv1d's kernel); GPU tensors only.
- ``"native"``: our chunked PyTorch scan; runs on any device, exact up to float rounding. On CPU,
  ``WSI_SSM_CPU_KERNEL=1`` makes it use a fused C kernel where it applies (fp32, input-dependent B
  and C), built at first use with the system C compiler (:mod:`wsi_pipeline.ssm.cpu_kernel`).
- ``"ref"``: the short sequential reference; a test oracle, slow and memory-hungry.

Precedence, highest first: the ``backend=`` argument of a call or module, :func:`set_backend` /
:func:`use_backend`, the ``WSI_SSM_BACKEND`` environment variable, then ``"auto"`` (``cuda`` for GPU
tensors when the kernel is installed, ``native`` otherwise). mamba-ssm is never imported unless the
``cuda`` backend is actually chosen, so CPU runs never load it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os

import torch

ENV_VAR = "WSI_SSM_BACKEND"
BACKENDS = ("auto", "cuda", "native", "ref")
INSTALL_HINT = "install the GPU extra: pip install 'wsi-pipeline[cuda]'"

_override: str | None = None


def _validate(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown SSM backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend process-wide (``None`` or ``"auto"`` returns to the env var / automatic choice)."""
    global _override
    _override = None if name is None else _validate(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _module_present(name: str) -> bool:
    # find_spec locates a top-level module without executing it, so probing never imports mamba-ssm.
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def mamba_kernel_available() -> bool:
    """Whether mamba-ssm and its compiled ``selective_scan_cuda`` extension are installed."""
    return _module_present("mamba_ssm") and _module_present("selective_scan_cuda")


def causal_conv1d_kernel_available() -> bool:
    """Whether the causal-conv1d package and its compiled extension are installed."""
    return _module_present("causal_conv1d") and _module_present("causal_conv1d_cuda")


def requested_backend(requested: str | None = None) -> str:
    """The backend asked for, before looking at devices: argument, override, env var, else ``"auto"``."""
    if requested is not None:
        return _validate(requested, "backend argument")
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    if env:
        return _validate(env, f"environment variable {ENV_VAR}")
    return "auto"


def resolve_backend(requested: str | None, device: torch.device | str) -> str:
    """Choose ``"cuda"``, ``"native"`` or ``"ref"`` for tensors on ``device``.

    Raises RuntimeError when ``cuda`` is forced but the kernel is missing or the tensors are not on a GPU.
    """
    device = torch.device(device)
    name = requested_backend(requested)
    if name == "auto":
        return "cuda" if device.type == "cuda" and mamba_kernel_available() else "native"
    if name == "cuda":
        if not mamba_kernel_available():
            raise RuntimeError(f"SSM backend 'cuda' was forced but mamba-ssm's kernel is not installed; {INSTALL_HINT}")
        if device.type != "cuda":
            raise RuntimeError(f"SSM backend 'cuda' needs tensors on a CUDA device, got {device}; use 'native' or 'auto'")
    return name


def load_mamba_selective_scan_fn():
    """Import mamba-ssm's ``selective_scan_fn`` (only called once the ``cuda`` backend is chosen)."""
    module = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    return module.selective_scan_fn


def load_causal_conv1d_fn():
    """Import causal-conv1d's ``causal_conv1d_fn`` (only called for GPU tensors with the kernel installed)."""
    return importlib.import_module("causal_conv1d").causal_conv1d_fn

"""The one place a device name from a config or the CLI becomes a torch device."""

from __future__ import annotations

from .errors import PipelineError


def resolve_device(name: str, what: str = "device"):
    """auto -> cuda if available, else cpu; cuda asked for where there is none is a `PipelineError`
    naming the setting (`what`, e.g. "train.device"). Torch is imported here, not at module import,
    so config/CLI code that names devices stays light."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"{what} {name!r}: no CUDA device available (use auto or cpu)")
    return torch.device(name)
